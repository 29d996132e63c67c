"""Starting points other than a seeded model: train_model
--init-from (a transformers GPT-2 directory or a .cllm file) and --tokenizer-file (an existing
tokenizer.json), a bpe run resumed, and cllm_inference streaming byte-level tokens. Every model
and tokenizer is built here, small and random; nothing is downloaded."""
import io
import json

import numpy as np
import pytest
import torch
from helpers import assert_bit_identical, assert_one_error_line, call, sentences, tensors, write
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

from cllm_cli import CLLMModel
from cllm_cli.cli.inference import main as inference_main
from cllm_cli.cli.tokenize import main as tokenize_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.model.generation import stream
from cllm_cli.tokenizers import BPETokenizer
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.trainer import Trainer

TINY_RUN = ["--batch-size", "8", "--micro-batch", "2", "--max-steps", "3", "--warmup-steps", "1",
            "--eval-interval", "0", "--quiet", "--learning-rate", "3e-3"]


@pytest.fixture(scope="module")
def text():
    return sentences(400, seed=21, punct=".,!?") + "Ünïcödé, 世界 and emoji 🙂\ttabs\r\n"


@pytest.fixture
def unicode_corpus(tmp_path, text):
    """`text` (seeded sentences and a line of non-ASCII text, tabs and CRLF) as corpus.txt."""
    return write(tmp_path / "corpus.txt", text)


def gpt2_style_tokenizer_json(text, vocab_size=300):
    """A tokenizer.json as GPT-2's is made: byte-level BPE, one special token <|endoftext|>
    (no <pad>, no <unk>)."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator([text], trainer)
    return tk.to_str()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, text):
    """A random GPT2LMHeadModel saved by transformers, with a tokenizer.json beside it."""
    directory = tmp_path_factory.mktemp("gpt2")
    tokenizer_json = gpt2_style_tokenizer_json(text)
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    vocab = len(json.loads(tokenizer_json)["model"]["vocab"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():       # non-zero biases and LayerNorm parameters, so they are checked too
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def transformers_logits(directory, ids):
    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def starting_model(unicode_corpus, tmp_path, **options):
    """The model a run with these options starts from (before any step)."""
    cfg = TrainConfig(checkpoint_dir=str(tmp_path / "start"), threads=1, **options)
    with Trainer([unicode_corpus], cfg, given=set(options)) as trainer:
        return trainer.model, trainer.tokenizer, trainer.cfg


def relative(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_init_from_a_transformers_directory_starts_from_its_logits(unicode_corpus, tmp_path, gpt2_dir):
    model, tokenizer, cfg = starting_model(unicode_corpus, tmp_path, init_from=str(gpt2_dir))
    assert (cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.seq_len) == (32, 2, 4, 32)
    assert cfg.tokenizer == "bpe" and tokenizer.eos_id == tokenizer._tk.token_to_id("<|endoftext|>")
    assert tokenizer.pad_id == -1        # GPT-2's vocabulary has no <pad>: every target counts
    ids = tokenizer.encode("The old woman walked home, 世界!")[None, :20]
    theirs = transformers_logits(gpt2_dir, ids)
    assert relative(model.logits(ids), theirs) <= 1e-4


def test_init_from_fine_tunes_bit_identically_for_1_and_2_threads(unicode_corpus, tmp_path, gpt2_dir,
                                                                  capsys):
    finals = []
    for threads in (1, 2):
        ck = tmp_path / f"ck{threads}"
        code, _, err = call(capsys, train_main, unicode_corpus, "--init-from", gpt2_dir,
                            "--checkpoint-dir", ck, "--threads", threads, *TINY_RUN)
        assert code == 0, err
        finals.append(ck / "final_model.cllm")
        assert (ck / "tokenizer.json").read_bytes() == (gpt2_dir / "tokenizer.json").read_bytes()
    assert_bit_identical(*finals)
    start = transformers_logits(gpt2_dir, [[5, 6, 7]])
    tuned = CLLMModel.load(finals[0]).logits(np.array([[5, 6, 7]]))
    assert relative(tuned, start) > 1e-3, "three steps of fine-tuning changed nothing"
    meta = CLLMModel.load(finals[0]).meta
    assert meta["tokenizer"] == "bpe" and meta["train_config"]["init_from"] == str(gpt2_dir)


def test_init_from_with_a_shorter_seq_len_keeps_the_first_positions(unicode_corpus, tmp_path, gpt2_dir):
    model, tokenizer, cfg = starting_model(unicode_corpus, tmp_path, init_from=str(gpt2_dir), seq_len=16)
    assert cfg.seq_len == model.config.seq_len == 16
    ids = tokenizer.encode("the king saw a small boat near the bridge")[None, :16]
    assert relative(model.logits(ids), transformers_logits(gpt2_dir, ids)) <= 1e-4


def test_init_from_a_cllm_file(unicode_corpus, tmp_path, capsys):
    ck = tmp_path / "first"
    code, _, err = call(capsys, train_main, unicode_corpus, "--checkpoint-dir", ck, "--tokenizer", "char",
                        "--embed-dim", "16", "--num-layers", "1", "--num-heads", "2",
                        "--seq-len", "16", *TINY_RUN)
    assert code == 0, err
    first = CLLMModel.load(ck / "final_model.cllm")
    model, tokenizer, cfg = starting_model(unicode_corpus, tmp_path,
                                           init_from=str(ck / "final_model.cllm"))
    assert cfg.tokenizer == "char" and cfg.embed_dim == 16 and cfg.num_layers == 1
    assert model.flat.tobytes() == first.flat.tobytes()


@pytest.mark.parametrize("argv,fragments", [
    (["--embed-dim", "64"], ["--embed-dim 64", "32"]),
    (["--seq-len", "64"], ["--seq-len 64", "32"]),
    (["--tokenizer", "word"], ["--tokenizer word", "bpe"]),
    (["--tokenizer-file", "x.json"], ["--tokenizer-file", "--init-from"]),
])
def test_init_from_refuses_options_it_cannot_honour(unicode_corpus, ckpt_dir, gpt2_dir, capsys, argv,
                                                    fragments):
    code, _, err = call(capsys, train_main, unicode_corpus, "--init-from", gpt2_dir, "--checkpoint-dir",
                        ckpt_dir, *TINY_RUN, *argv)
    assert_one_error_line(code, err, "train_model", *fragments)
    assert not ckpt_dir.exists()


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "2"]])
@pytest.mark.parametrize("named", ["the directory", "its final model", "a link to it"])
def test_init_from_the_directory_a_new_run_would_clear_is_refused(unicode_corpus, tmp_path,
                                                                  capsys, lora, named):
    """--init-from a model inside the --checkpoint-dir that --overwrite would clear: refused
    before anything is deleted (paths compared after following links)."""
    ck = tmp_path / "run"
    code, _, err = call(capsys, train_main, unicode_corpus, "--checkpoint-dir", ck,
                        "--tokenizer", "char", "--embed-dim", "16", "--num-layers", "1",
                        "--num-heads", "2", "--seq-len", "16", *TINY_RUN)
    assert code == 0, err
    (tmp_path / "link").symlink_to(ck)
    model = {"the directory": ck, "its final model": ck / "final_model.cllm",
             "a link to it": tmp_path / "link"}[named]
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    code, _, err = call(capsys, train_main, unicode_corpus, "--init-from", model,
                        "--checkpoint-dir", ck, "--overwrite", *TINY_RUN, *lora)
    assert_one_error_line(code, err, "train_model", "the --init-from model",
                          "use another --checkpoint-dir")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_init_from_refuses_a_model_it_cannot_represent(unicode_corpus, tmp_path, gpt2_dir, capsys):
    other = tmp_path / "relu"
    other.mkdir()
    for f in gpt2_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["activation_function"] = "relu"
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = call(capsys, train_main, unicode_corpus, "--init-from", other, "--checkpoint-dir",
                        tmp_path / "ck", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "activation_function", "relu")
    code, _, err = call(capsys, train_main, unicode_corpus, "--init-from", tmp_path / "nothing",
                        "--checkpoint-dir", tmp_path / "ck", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "nothing")
    assert not (tmp_path / "ck").exists()


TINY_MODEL = ["--embed-dim", "16", "--num-layers", "2", "--num-heads", "2", "--seq-len", "16"]


def test_tokenizer_file_trains_resumes_and_serves_every_tool(unicode_corpus, tmp_path, text, capsys):
    tokenizer_json = tmp_path / "gpt2-like.json"
    tokenizer_json.write_text(gpt2_style_tokenizer_json(text, 280), encoding="utf-8")
    given = BPETokenizer.read(tokenizer_json)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = call(capsys, train_main, unicode_corpus, "--tokenizer-file", tokenizer_json,
                        "--checkpoint-dir", straight, *TINY_MODEL, *TINY_RUN, "--max-steps", "4")
    assert code == 0, err
    assert (straight / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    model = CLLMModel.load(straight / "final_model.cllm")
    assert model.config.vocab_size == len(given)
    assert model.meta["vocab_hash"] == given.vocab_hash

    code, _, err = call(capsys, train_main, unicode_corpus, "--tokenizer-file", tokenizer_json,
                        "--checkpoint-dir", resumed, *TINY_MODEL, *TINY_RUN, "--max-steps", "2",
                        "--save-interval", "2")
    assert code == 0, err
    code, _, err = call(capsys, train_main, unicode_corpus, "--checkpoint-dir", resumed, "--resume",
                        "--max-steps", "4", "--quiet")
    assert code == 0, err
    assert_bit_identical(straight / "final_model.cllm", resumed / "final_model.cllm")

    code, out, err = call(capsys, inference_main, straight, "--prompt", "The Old", "--max-tokens",
                          "8", "--seed", "3")
    assert code == 0 and out.startswith("The Old"), err
    sample = tmp_path / "sample.txt"
    sample.write_text("Ünïcödé 世界 🙂 stays as it is.\n", encoding="utf-8")
    code, out, err = call(capsys, tokenize_main, sample, "--vocab", straight / "tokenizer.json")
    assert code == 0, err
    ids = [int(i) for i in out.split()]
    assert ids == given.encode(sample.read_text(encoding="utf-8")).tolist()
    code, out, err = call(capsys, tokenize_main, sample, "--vocab", straight / "tokenizer.json",
                          "--stats")
    assert code == 0 and "unknown tokens: 0" in out, err


def test_tokenizer_file_refusals(unicode_corpus, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json", encoding="utf-8")
    code, _, err = call(capsys, train_main, unicode_corpus, "--tokenizer-file", bad, "--checkpoint-dir",
                        tmp_path / "ck", *TINY_MODEL, *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "bad.json")
    code, _, err = call(capsys, train_main, unicode_corpus, "--tokenizer-file", tmp_path, "--checkpoint-dir",
                        tmp_path / "ck", *TINY_MODEL, *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "--tokenizer-file")


def test_bpe_run_resumed_equals_straight(unicode_corpus, tmp_path, capsys):
    args = ["--tokenizer", "bpe", "--vocab-size", "300", *TINY_MODEL, *TINY_RUN]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = call(capsys, train_main, unicode_corpus, "--checkpoint-dir", straight, *args,
                        "--max-steps", "4")
    assert code == 0, err
    code, _, err = call(capsys, train_main, unicode_corpus, "--checkpoint-dir", resumed, *args,
                        "--max-steps", "2", "--save-interval", "2")
    assert code == 0, err
    code, _, err = call(capsys, train_main, unicode_corpus, "--checkpoint-dir", resumed, "--resume",
                        "--max-steps", "4", "--quiet")
    assert code == 0, err
    assert_bit_identical(straight / "final_model.cllm", resumed / "final_model.cllm")
    assert tensors(straight / "final_model.cllm")["wte"].shape[0] == 300


class ScriptedModel:
    """Stands in for CLLMModel.generate: yields the ids it was given."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, prompt_ids, **options):
        yield from self.ids


class Pieces(io.StringIO):
    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


def test_streaming_holds_back_partial_characters(text):
    tokenizer = BPETokenizer.train([sentences(50, seed=2, punct=".")], 300)
    reply = "a 世界 🙂 é!"
    ids = tokenizer.encode(reply).tolist()
    assert len(ids) > len(reply), "the premise: some characters take several tokens"
    out = Pieces()
    generated = stream(ScriptedModel(ids + [tokenizer.eos_id]), tokenizer, "Say: ", out,
                       max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    assert generated == ids
    assert out.getvalue() == "Say: " + reply + "\n"
    assert not any("\ufffd" in p for p in out.pieces), out.pieces
    assert len(out.pieces) > 3, "tokens are shown as they come, not all at the end"


def test_a_given_vocabulary_smaller_than_a_trained_bpe(unicode_corpus, tmp_path, text, capsys):
    # a word model exported by cllm_export (a WordLevel tokenizer.json of a few dozen ids),
    # and a Metaspace BPE without byte tokens: their sizes are their own, not a --vocab-size
    # that a trained byte-level BPE must reach
    from cllm_cli.cli.export import main as export_main
    word_run = tmp_path / "word"
    code, _, err = call(capsys, train_main, unicode_corpus, "--tokenizer", "word", "--vocab-size",
                        "40", "--checkpoint-dir", word_run, *TINY_MODEL, *TINY_RUN)
    assert code == 0, err
    code, _, err = call(capsys, export_main, word_run, tmp_path / "hf")
    assert code == 0, err
    code, _, err = call(capsys, train_main, unicode_corpus, "--init-from", tmp_path / "hf",
                        "--checkpoint-dir", tmp_path / "from-hf", *TINY_RUN)
    assert code == 0, err
    assert CLLMModel.load(tmp_path / "from-hf" / "final_model.cllm").config.vocab_size == 40

    tk = HFTokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, show_progress=False,
                                                       special_tokens=["<unk>", "</s>"]))
    small = write(tmp_path / "metaspace.json", tk.to_str())
    for given in (small, tmp_path / "hf" / "tokenizer.json"):
        run = tmp_path / f"given-{given.stem}"
        code, _, err = call(capsys, train_main, unicode_corpus, "--tokenizer-file", given,
                            "--checkpoint-dir", run, *TINY_MODEL, *TINY_RUN)
        assert code == 0, err
        code, out, err = call(capsys, inference_main, run, "--prompt", "the", "--max-tokens", "3")
        assert code == 0 and out.startswith("the"), err
