"""Input faults that once crashed a tool or left a file behind, each checked with real
processes and real readers: a transformers model with a padded vocabulary (config.json's
vocab_size above the tokenizer's size), one with a NaN weight, an export killed by SIGKILL,
an absurd bpe --vocab-size, an empty corpus with bpe, and a prompt holding a byte that is
not UTF-8. Every model and tokenizer is built here, small and random; nothing is downloaded."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_error_line, call, gpt2_directory, sentences, write
from transformers import AutoModelForCausalLM, AutoTokenizer

from cllm_cli import CLLMModel
from cllm_cli.cli.export import main as export_main
from cllm_cli.cli.inference import main as inference_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.errors import ConversionError
from cllm_cli.formats.model_files import load_model_files
from cllm_cli.tokenizers import BPETokenizer

BIN = os.path.dirname(sys.executable)
TINY_RUN = ["--batch-size", "4", "--micro-batch", "2", "--warmup-steps", "1",
            "--eval-interval", "0", "--quiet", "--learning-rate", "3e-3", "--threads", "1"]
PADDED = 350        # config.json's vocab_size; the tokenizer has 300 tokens


@pytest.fixture(scope="module")
def text():
    return sentences(300, seed=13, punct=".,!?") + "Ünïcödé, 世界 and emoji 🙂\n"


@pytest.fixture
def corpus(tmp_path, text):
    return write(tmp_path / "corpus.txt", text)


def run_tool(name, *argv, timeout=300):
    return subprocess.run([os.path.join(BIN, name), *[os.fsdecode(a) if isinstance(a, bytes)
                                                      else str(a) for a in argv]],
                          capture_output=True, text=True, timeout=timeout)


# --- 4: padded vocabularies ---------------------------------------------------------------

def test_padded_vocabulary_trains_samples_runs_and_exports(corpus, text, tmp_path, capsys):
    src = gpt2_directory(tmp_path / "padded", text, vocab_size=PADDED)
    cfg, flat, tok = load_model_files(src)[:3]
    assert cfg.vocab_size == PADDED and len(tok) == 300
    logits = CLLMModel.from_flat(cfg, flat).logits(np.array([tok.encode("the old")]))[0, -1]
    assert int(np.argmax(logits)) >= len(tok)       # premise: an unmasked argmax is padding

    ck = tmp_path / "ck"
    code, out, err = call(capsys, train_main, corpus, "--init-from", src, "--checkpoint-dir", ck,
                          "--max-steps", "2", "--sample-every", "1", "--prompt", "The old",
                          *TINY_RUN)
    assert code == 0, err
    assert "Traceback" not in err
    model = CLLMModel.load(ck / "final_model.cllm")
    assert model.config.vocab_size == PADDED          # the padding rows are kept

    for temperature in ("0", "1.0"):
        code, out, err = call(capsys, inference_main, ck, "--prompt", "The old",
                              "--max-tokens", "20", "--temperature", temperature, "--top-k", "0",
                              "--top-p", "1")
        assert code == 0, err
        assert out.startswith("The old") and "Traceback" not in err
    ids = list(model.generate(tok.encode("The old"), max_tokens=50, temperature=0, seed=1,
                              num_tokens=len(tok)))
    ids += list(model.generate(tok.encode("The old"), max_tokens=50, temperature=5.0, seed=2,
                               num_tokens=len(tok)))
    assert ids and max(ids) < len(tok)

    code, _, err = call(capsys, export_main, ck, tmp_path / "hf")
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == PADDED
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.get_input_embeddings().weight.shape[0] == PADDED
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = hf_tok("The old woman")["input_ids"]
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0].numpy()
    ours = model.logits(np.array([prompt]))[0]
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()

    code, _, err = call(capsys, export_main, ck, tmp_path / "model.gguf", "--format", "gguf")
    assert code == 0, err
    import gguf
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == PADDED
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert PADDED in [int(n) for n in embd.shape]


# --- 13: NaN or Inf weights in a transformers directory -----------------------------------

def _poison(model):
    model.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")


def test_init_from_a_model_with_a_nan_weight_is_refused_at_load(corpus, text, tmp_path, capsys):
    src = gpt2_directory(tmp_path / "nan", text, change=_poison)
    capsys.readouterr()         # transformers' progress bar
    with pytest.raises(ConversionError) as e:
        load_model_files(src)
    assert "transformer.h.1.mlp.c_fc.weight" in str(e.value) and "NaN" in str(e.value)
    ck = tmp_path / "ck"
    code, out, err = call(capsys, train_main, corpus, "--init-from", src, "--checkpoint-dir", ck,
                          "--max-steps", "3", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "transformer.h.1.mlp.c_fc.weight", "NaN")
    assert not (ck / "final_model.cllm").exists()
    assert "skipped" not in out + err


def test_an_inf_weight_is_refused_by_inference(text, tmp_path, capsys):
    def inf(model):
        model.transformer.wpe.weight[0, 0] = float("inf")
    src = gpt2_directory(tmp_path / "inf", text, change=inf)
    capsys.readouterr()
    code, out, err = call(capsys, inference_main, src, "--prompt", "The", "--max-tokens", "3")
    assert_one_error_line(code, err, "cllm_inference", "transformer.wpe.weight", "Inf")
    assert out == ""


# --- 5: an absurd bpe --vocab-size --------------------------------------------------------

def test_absurd_bpe_vocab_size_is_refused_before_training(corpus, tmp_path):
    ck = tmp_path / "ck"
    result = run_tool("train_model", corpus, "--vocab-size", "1000000000", "--checkpoint-dir", ck,
                      "--max-steps", "1", *TINY_RUN, timeout=120)
    assert_one_error_line(result.returncode, result.stderr, "train_model", "--vocab-size",
                          "1,000,000", "1,000,000,000")
    assert not ck.exists()
    assert "1,000,000" in run_tool("train_model", "--help").stdout.replace("\n", " ")


def test_a_bpe_vocab_size_below_its_bytes_names_the_option(corpus, tmp_path, capsys):
    code, _, err = call(capsys, train_main, corpus, "--vocab-size", "100", "--checkpoint-dir",
                        tmp_path / "ck", "--max-steps", "1", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "--vocab-size must be at least 260", "100")
    assert not (tmp_path / "ck").exists()


def test_bpe_vocab_size_bound_in_the_tokenizer_itself(text):
    from cllm_cli.errors import DataError
    with pytest.raises(DataError, match="at most 1,000,000"):
        BPETokenizer.train([text], 10**9)
    # capped by what the text can give: the largest allowed size costs nothing and learns
    # the same merges as any size above what the text holds
    small = text[:3000]
    assert (BPETokenizer.train([small], 1_000_000).vocab_hash
            == BPETokenizer.train([small], 260 + 3 * len(small)).vocab_hash)


# --- 6: an empty corpus with bpe ----------------------------------------------------------

@pytest.mark.parametrize("layout", ["one empty file", "a directory of empty files"])
def test_empty_corpus_with_bpe_says_so(layout, tmp_path, capsys):
    if layout == "one empty file":
        data = tmp_path / "empty.txt"
        data.write_bytes(b"")
    else:
        data = tmp_path / "texts"
        data.mkdir()
        for name in ("a.txt", "b.txt"):
            (data / name).write_bytes(b"")
    ck = tmp_path / "ck"
    code, _, err = call(capsys, train_main, data, "--checkpoint-dir", ck, "--max-steps", "1",
                        *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "corpus is empty", "0 bytes")
    assert not ck.exists()           # the run's directory is gone again, with everything in it


def test_a_corpus_of_one_byte_without_tokens_is_counted_in_the_singular(tmp_path, capsys):
    data = tmp_path / "newline.txt"
    data.write_bytes(b"\n")
    code, _, err = call(capsys, train_main, data, "--checkpoint-dir", tmp_path / "ck",
                        "--tokenizer", "word", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "no tokens in 1 file (1 byte)")


def test_empty_corpus_with_a_given_tokenizer_leaves_no_file(text, tmp_path, capsys):
    BPETokenizer.train([text], 300).save(tmp_path / "given.json")
    (tmp_path / "empty.txt").write_bytes(b"")
    ck = tmp_path / "ck"
    code, _, err = call(capsys, train_main, tmp_path / "empty.txt", "--tokenizer-file",
                        tmp_path / "given.json", "--checkpoint-dir", ck, *TINY_RUN)
    assert_one_error_line(code, err, "train_model", "corpus is empty")
    assert not ck.exists()


# --- 7: a prompt holding bytes that are not UTF-8 -----------------------------------------

BAD_PROMPT = b"The ab\xff"        # what a shell passes for $'The ab\xff'
SMALL_MODEL = ["--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16"]


def run_bytes(name, *argv):
    """A tool run with argv given as bytes (so that a byte that is not UTF-8 reaches it as
    it would from a shell); stdout and stderr as bytes."""
    args = [os.fsencode(os.path.join(BIN, name))]
    args += [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in argv]
    env = dict(os.environ, LC_ALL="C.UTF-8")
    return subprocess.run(args, capture_output=True, timeout=300, env=env)


def test_replace_undecodable():
    from cllm_cli.tokenizers import replace_undecodable
    assert replace_undecodable("plain é") == ("plain é", [])
    argv_text = os.fsdecode(b"a\xffb\xe4\xb8")     # one bad byte, one cut character
    assert replace_undecodable(argv_text) == (b"a\xffb\xe4\xb8".decode("utf-8", "replace"),
                                              [b"\xff", b"\xe4\xb8"])
    assert replace_undecodable("x\ud800") == ("x\ufffd", ["\ud800"])


def test_bpe_prompt_with_a_byte_that_is_not_utf8(corpus, tmp_path):
    ck = tmp_path / "ck"
    result = run_bytes("train_model", corpus, "--checkpoint-dir", ck, "--vocab-size", "300",
                       "--max-steps", "2", "--sample-every", "1", "--prompt", BAD_PROMPT,
                       "--sample-tokens", "8", *SMALL_MODEL, *TINY_RUN)
    err = result.stderr.decode("utf-8")         # every line the tool writes is UTF-8
    assert result.returncode == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "not UTF-8" in line]
    assert warnings == ["train_model: warning: --prompt holds bytes that are not UTF-8, read as "
                        "U+FFFD: b'\\xff'"]
    assert (ck / "final_model.cllm").exists()

    result = run_bytes("cllm_inference", ck, "--prompt", BAD_PROMPT, "--max-tokens", "8",
                       "--seed", "3")
    err = result.stderr.decode("utf-8")
    assert result.returncode == 0, err
    assert err.splitlines() == ["cllm_inference: warning: the prompt holds bytes that are not "
                                "UTF-8, read as U+FFFD: b'\\xff'"]
    out = result.stdout.decode("utf-8")          # valid UTF-8: the byte is shown as U+FFFD
    assert out.startswith("The ab\ufffd")
    tok = BPETokenizer.load(ck / "tokenizer.json")
    assert list(tok.encode(os.fsdecode(BAD_PROMPT))) == list(tok.encode("The ab\ufffd"))


# --- 10: an export killed by SIGKILL ------------------------------------------------------

def big_checkpoint(directory, text):
    """A run directory with a model of some 100 MB, so that writing it takes a while."""
    from cllm_cli import CLLMConfig
    tok = BPETokenizer.train([text], 300)
    cfg = CLLMConfig(vocab_size=len(tok), embed_dim=512, num_layers=8, num_heads=8, seq_len=64)
    model = CLLMModel(cfg, seed=1)
    directory.mkdir()
    model.save(directory / "final_model.cllm", {"tokenizer": "bpe", "vocab_hash": tok.vocab_hash})
    tok.save(directory / "tokenizer.json")
    return model


def leftovers(parent, name):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def test_a_killed_export_is_cleaned_up_by_the_next(text, tmp_path, capsys):
    model = big_checkpoint(tmp_path / "run", text)
    out = tmp_path / "exported"
    proc = subprocess.Popen([os.path.join(BIN, "cllm_export"), str(tmp_path / "run"), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.monotonic() + 120
    while partial is None and proc.poll() is None and time.monotonic() < deadline:
        for name in leftovers(tmp_path, "exported"):
            weights = tmp_path / name / "model.safetensors"
            if weights.exists() and weights.stat().st_size > 0:
                partial = tmp_path / name
                break
        else:
            time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial is not None, "the export ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert leftovers(tmp_path, "exported") == [partial.name]      # premise: the leftover
    assert f".{proc.pid}." in partial.name                         # the writer's pid in its name
    size = (partial / "model.safetensors").stat().st_size
    assert size < os.path.getsize(tmp_path / "run" / "final_model.cllm")

    # a live writer's directory is never touched
    alive = tmp_path / f".exported.{os.getpid()}.{partial.name.split('.')[3]}.abcdef.tmp"
    alive.mkdir()
    code, _, err = call(capsys, export_main, tmp_path / "run", out)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cllm_export: cleaned up 1 temporary "
                                                   "directory of killed exports"), err
    assert partial.name in lines[0] and str(proc.pid) in lines[0]
    assert leftovers(tmp_path, "exported") == [alive.name]
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.get_input_embeddings().weight.shape == (model.config.vocab_size, 512)


def test_a_previous_export_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    from cllm_cli.formats.hf_export import _host_tag, remove_stale
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".exported.{dead.pid}.{_host_tag()}.0123456789ab.old"
    newer = tmp_path / f".exported.{dead.pid}.{_host_tag()}.0123456789ab.tmp"
    other_host = tmp_path / f".exported.{dead.pid}.ffffffff.0123456789ab.tmp"
    for d in (aside, newer, other_host):
        d.mkdir()
    (aside / "config.json").write_text("{}")
    done = remove_stale(tmp_path / "exported")
    assert sorted(what for _, _, what in done) == ["put back", "removed"]
    assert (tmp_path / "exported" / "config.json").exists()
    assert leftovers(tmp_path, "exported") == [other_host.name]     # another host's: kept


def test_a_vocabulary_of_another_kind_is_named_as_such(trained, tmp_path, capsys):
    """--vocab with another kind's file (a bpe tokenizer.json for a word run) says which kind
    each is, instead of a parse error of the file as the wrong kind."""
    from cllm_cli.tokenizers import BPETokenizer
    other = tmp_path / "tokenizer.json"
    BPETokenizer.train([sentences(200, seed=1, punct=".,")], 300).save(str(other))
    code, _, err = call(capsys, inference_main, trained, "--vocab", other, "--prompt", "the")
    assert_one_error_line(code, err, "cllm_inference", f"--vocab {other} is a bpe tokenizer's",
                          "trained with a word tokenizer", "vocab.txt")
    code, out, err = call(capsys, inference_main, trained, "--vocab", trained / "vocab.txt",
                          "--prompt", "the", "--max-tokens", "3")
    assert code == 0, err


# --- a damaged safetensors header or shard index in a transformers directory ---------------

def _rewrite_header(path, change):
    """Rewrites the safetensors header of `path` with change(header, entry of the embedding)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header, header["transformer.wte.weight"])
    packed = json.dumps(header).encode()
    packed += b" " * (-len(packed) % 8)
    path.write_bytes(len(packed).to_bytes(8, "little") + packed + raw[8 + n:])


@pytest.mark.parametrize("change", [
    lambda h, e: e.update(dtype=["F32"]),
    lambda h, e: e.update(shape=[1e400, 32]),
    lambda h, e: e.update(shape=[300.5, 32]),
    lambda h, e: e.update(data_offsets=[10**30, 10**30 + 300 * 32 * 4]),
], ids=["dtype a list", "shape infinite", "shape a fraction", "offset past a C long"])
def test_a_damaged_safetensors_header_entry_is_one_line(change, corpus, text, tmp_path, capsys):
    """--init-from a directory whose model.safetensors names a tensor with a dtype that is not
    a string, or a shape or offsets that are not whole numbers inside the file: one line
    naming the file and the tensor, not a traceback, nor a shape of 300.5 read as 300."""
    src = gpt2_directory(tmp_path / "src", text)
    capsys.readouterr()
    _rewrite_header(src / "model.safetensors", change)
    ck = tmp_path / "ck"
    code, _, err = call(capsys, train_main, corpus, "--init-from", src, "--checkpoint-dir", ck,
                        "--max-steps", "2", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", f"{src}/model.safetensors",
                          "malformed header entry", "transformer.wte.weight")
    assert not ck.exists()


@pytest.mark.parametrize("shard", [["model-1.safetensors"], 5, ""])
def test_a_shard_index_naming_no_file_is_one_line(shard, text, tmp_path, capsys):
    """A model.safetensors.index.json whose weight_map gives a tensor a list, a number or an
    empty name instead of a file name: one line naming the index and the tensor."""
    src = gpt2_directory(tmp_path / "src", text)
    capsys.readouterr()
    (src / "model.safetensors").rename(src / "model-1.safetensors")
    write(src / "model.safetensors.index.json", json.dumps(
        {"weight_map": {"transformer.wte.weight": "model-1.safetensors", "lm_head": shard}}))
    code, out, err = call(capsys, inference_main, src, "--prompt", "The", "--max-tokens", "3")
    assert_one_error_line(code, err, "cllm_inference", "model.safetensors.index.json",
                          "'lm_head'", "not a file name")
    assert out == ""


# --- an instruction record with nothing to train --------------------------------------------

def test_a_record_of_no_tokens_is_named_by_its_line(corpus, tmp_path, capsys):
    """A prompt-completion record whose prompt and completion are both empty is its end of
    text alone, the first token of its window, which nothing predicts: it was a window without
    a target, silently trained on (a file of such records had every step skipped 'for
    non-finite values', status 1) and cllm_eval printed loss n/a, ppl nan for it. Now both
    tools name the record's line."""
    from cllm_cli.cli.evaluate import main as eval_main
    records = write(tmp_path / "chat.jsonl", '{"prompt": "the old miller", "completion": " sang"}\n'
                                             '{"prompt": "", "completion": ""}\n')
    ck = tmp_path / "ck"
    code, out, err = call(capsys, train_main, records, "--tokenizer", "word", "--embed-dim", "16",
                          "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
                          "--checkpoint-dir", ck, "--max-steps", "4", *TINY_RUN)
    assert_one_error_line(code, err, "train_model", f"{records}:2", "no answer token")
    assert not ck.exists()
    code, out, err = call(capsys, train_main, corpus, "--tokenizer", "word", "--embed-dim", "16",
                          "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
                          "--checkpoint-dir", ck, "--max-steps", "1", *TINY_RUN)
    assert code == 0, err
    code, out, err = call(capsys, eval_main, ck, records)
    assert_one_error_line(code, err, "cllm_eval", f"{records}:2", "no answer token")
    assert out == ""


# --- a chat template that renders nothing ---------------------------------------------------

def test_a_chat_template_that_renders_nothing_is_refused(corpus, tmp_path, capsys):
    """cllm_chat --template of a file that renders no text (an empty file): refused in one
    line before the first prompt; it once took the message, then stopped with a ValueError
    traceback ('generation needs at least one prompt id')."""
    ck = tmp_path / "ck"
    code, out, err = call(capsys, train_main, corpus, "--vocab-size", "300", "--embed-dim", "16",
                          "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
                          "--checkpoint-dir", ck, "--max-steps", "1", *TINY_RUN)
    assert code == 0, err
    empty = write(tmp_path / "empty.jinja", "")
    result = subprocess.run([sys.executable, "-m", "cllm_cli.cli.chat", str(ck), "--template",
                             str(empty), "--threads", "1"], input="hello there\n", cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert_one_error_line(result.returncode, result.stderr, "cllm_chat", str(empty),
                          "renders a conversation as no tokens")
    assert result.stdout == ""
