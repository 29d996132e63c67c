"""Faults a hostile user or a failing machine can cause in the loaders and the tools:
non-finite states, crafted checkpoints, non-regular files, lost standard output, binary
standard input, huge perplexities and a package whose engine is not built.

The commands run in a real process, so that a memory limit on that process catches unbounded
reads.
"""
import json
import math
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
from checkpoint_files import CFG, good_metadata, layout_tensors, write_custom
from helpers import ROOT, assert_one_error_line, call, sentences

from cllm_cli._engine import parameter_layout as param_layout
from cllm_cli.api import CLLMModel
from cllm_cli.cli import inference
from cllm_cli.cli import tokenize as tokenize_cli
from cllm_cli.cli.train import main as train_main
from cllm_cli.errors import CheckpointError, SamplingError
from cllm_cli.formats.checkpoint import save_checkpoint
from cllm_cli.formats.checkpoint_load import load_checkpoint
from cllm_cli.model import CLLMConfig
from cllm_cli.model.sampling import sample_from_logits
from cllm_cli.progress import fmt_loss, fmt_ppl, ppl_text
from cllm_cli.tokenizers import Tokenizer

MEMORY_LIMIT = 2 << 30     # bytes of address space for a process that must not read forever


def run_tool(module, *argv, memory_limit=None, **kwargs):
    """`python -m cllm_cli.cli.<module> argv` as a real process, its output captured unless
    redirected (memory_limit catches unbounded reads)."""
    def limit():
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs["capture_output"] = True
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-m", f"cllm_cli.cli.{module}", *map(str, argv)],
                          cwd=ROOT, preexec_fn=limit, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """final_model.cllm (an untrained model: its logits are finite) and its vocab.txt."""
    d = tmp_path_factory.mktemp("model")
    tokenizer = Tokenizer.build([sentences(60, seed=5, punct=".!?")], "word", vocab_size=80)
    tokenizer.save(d / "vocab.txt")
    cfg = CLLMConfig(vocab_size=len(tokenizer), embed_dim=16, num_layers=1, num_heads=2,
                     seq_len=16)
    CLLMModel(cfg, seed=3).save(d / "final_model.cllm",
                                meta={"tokenizer": "word", "vocab_hash": tokenizer.vocab_hash})
    return d


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


# --- sampling ----------------------------------------------------------------------------

LOGITS = np.random.default_rng(11).standard_normal(50) * 3.0

# ids drawn by the sampler before it handled non-finite cases (model.sample_from_logits at
# commit 388bc17), 12 draws from default_rng(7) per option set
PINNED = {(1.0, 0, 1.0): [10, 40, 30, 2, 8, 37, 1, 36, 34, 10, 8, 5],
          (0.8, 40, 0.95): [10, 37, 16, 2, 2, 37, 1, 30, 19, 10, 2, 2],
          (0.5, 5, 1.0): [10, 10, 10, 2, 10, 10, 1, 10, 10, 10, 10, 10],
          (1.3, 0, 0.9): [16, 42, 34, 2, 8, 37, 1, 36, 34, 10, 8, 6],
          (0.0, 0, 1.0): [10] * 12,
          (2.0, 10, 0.5): [10, 42, 10, 1, 2, 42, 1, 10, 10, 2, 2, 2]}


@pytest.mark.parametrize("options", sorted(PINNED))
def test_ordinary_options_keep_their_ids(options):
    rng = np.random.default_rng(7)
    assert [sample_from_logits(LOGITS, *options, rng) for _ in range(12)] == PINNED[options]


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300, 1e-306])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (40, 0.95), (3, 0.5)])
def test_temperature_so_small_that_logits_overflow_is_greedy(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    ids = {sample_from_logits(LOGITS, temperature, top_k, top_p, rng) for _ in range(20)}
    assert ids == {int(np.argmax(LOGITS))}


def test_exact_ties_share_a_tiny_temperature():
    logits = np.array([1.0, 4.0, -2.0, 4.0, 3.999999])
    rng = np.random.default_rng(0)
    ids = [sample_from_logits(logits, 1e-310, 0, 1.0, rng) for _ in range(200)]
    assert set(ids) == {1, 3}
    rng = np.random.default_rng(0)
    assert ids == [sample_from_logits(logits, 1e-310, 0, 1.0, rng) for _ in range(200)]


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1e-310])
def test_nan_logits_are_never_chosen(temperature):
    logits = LOGITS.copy()
    best = int(np.argmax(logits))
    logits[best] = np.nan
    logits[0] = np.nan
    rng = np.random.default_rng(1)
    ids = [sample_from_logits(logits, temperature, 0, 1.0, rng) for _ in range(50)]
    assert best not in ids and 0 not in ids
    if temperature < 1e-300:
        assert set(ids) == {int(np.nanargmax(logits))}


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1e-310, 1e6])
def test_infinite_logits_take_all_the_probability(temperature):
    logits = LOGITS.copy()
    logits[[4, 9]] = np.inf
    logits[[1, 2]] = -np.inf
    rng = np.random.default_rng(2)
    ids = {sample_from_logits(logits, temperature, 5, 0.9, rng) for _ in range(50)}
    assert ids <= {4, 9} and (temperature == 0 or ids == {4, 9})


def test_logits_without_any_usable_value_are_an_error():
    for logits in (np.full(6, np.nan), np.full(6, -np.inf)):
        for temperature in (0.0, 1.0):
            with pytest.raises(SamplingError):
                sample_from_logits(logits, temperature, 0, 1.0, np.random.default_rng(0))


@pytest.mark.parametrize("options", [(math.nan, 0, 1.0), (math.inf, 0, 1.0), (-1.0, 0, 1.0),
                                     (1.0, -1, 1.0), (1.0, 0, math.nan), (1.0, 0, 0.0)])
def test_sampler_refuses_options_it_cannot_honour(options):
    with pytest.raises(ValueError):
        sample_from_logits(LOGITS, *options, np.random.default_rng(0))


def test_inference_with_a_tiny_temperature_is_greedy(capsys, model_dir):
    path = model_dir / "final_model.cllm"
    runs = [call(capsys, inference.main, path, "--prompt", "the old king", "--max-tokens", "12",
                 "--temperature", t) for t in ("1e-310", "0")]
    assert runs[0] == runs[1]
    assert runs[0][0] == 0 and runs[0][2] == ""


class NaNDecoder:
    """A key/value cache whose forward pass overflows: NaN logits at every position."""

    def __init__(self, cfg, flat, threads=1, precision="fp32"):
        self.vocab_size, self.length = cfg.vocab_size, 0

    def feed(self, token):
        self.length += 1
        return np.full(self.vocab_size, np.nan, dtype=np.float32)

    def prefill(self, tokens):
        self.length += len(tokens)
        return np.full(self.vocab_size, np.nan, dtype=np.float32)

    def truncate(self, length):
        self.length = length


def test_inference_with_nan_logits_everywhere_is_one_line(capsys, model_dir, monkeypatch):
    """Finite weights whose forward pass overflows: no id can be drawn."""
    monkeypatch.setattr("cllm_cli.model.generation.Decoder", NaNDecoder)
    monkeypatch.setattr(CLLMModel, "logits", lambda self, ids: np.full(
        (1, len(ids), self.config.vocab_size), np.nan, dtype=np.float32))
    code, _, err = call(capsys, inference.main, model_dir / "final_model.cllm", "--prompt", "the")
    assert_one_error_line(code, err, "cllm_inference", "no finite value", status=1)


# --- non-finite states -------------------------------------------------------------------

def finite_buffers(seed=0):
    n = sum(math.prod(shape) for _, shape, _ in param_layout(CFG))
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(2)] + \
        [np.abs(rng.standard_normal(n)).astype(np.float32)]


@pytest.mark.parametrize("which, prefix", [(0, ""), (1, "adam.m."), (2, "adam.v.")])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_never_saved(tmp_path, which, prefix, value):
    buffers = finite_buffers()
    name, _, offset = param_layout(CFG)[5]
    buffers[which][offset + 1] = value
    path = tmp_path / "checkpoint_step_7.cllm"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, CFG, *buffers, {"step": 7})
    msg = str(info.value)
    assert f"'{prefix}{name}'" in msg and "non-finite" in msg and "\n" not in msg
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tensor", ["wte", "h.1.mlp.c_proj.bias", "adam.m.ln_f.weight",
                                    "adam.v.h.0.attn.c_attn.weight"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_hand_made_file_with_non_finite_values_is_refused(tmp_path, tensor, value):
    t = layout_tensors(adam=True)
    t[tensor].reshape(-1)[-1] = value
    path = tmp_path / "bad.cllm"
    write_custom(path, t, good_metadata())          # valid checksums
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f"'{tensor}'" in msg and "non-finite" in msg and str(path) in msg and "\n" not in msg


def test_negative_second_moment_is_refused(tmp_path):
    t = layout_tensors(adam=True)
    t["adam.v.wpe"][2, 3] = -1e-3
    path = tmp_path / "bad.cllm"
    write_custom(path, t, good_metadata())
    with pytest.raises(CheckpointError, match="'adam.v.wpe' holds negative values"):
        load_checkpoint(path)


def test_inference_refuses_a_nan_model_in_one_line(model_dir, tmp_path):
    ckpt = load_checkpoint(model_dir / "final_model.cllm")
    layout = param_layout(ckpt.config)
    name, _, offset = layout[3]
    ckpt.params[offset] = np.nan
    t = {n: ckpt.params[o:o + math.prod(s)].reshape(s) for n, s, o in layout}
    md = good_metadata(cfg=ckpt.config, meta=ckpt.meta)
    write_custom(tmp_path / "final_model.cllm", t, md)
    shutil.copy(model_dir / "vocab.txt", tmp_path / "vocab.txt")
    p = run_tool("inference", tmp_path / "final_model.cllm", "--max-tokens", "3")
    assert_one_error_line(p.returncode, p.stderr, "cllm_inference", f"'{name}'", "non-finite")


# --- crafted metadata --------------------------------------------------------------------

def good_meta():
    return {"state": {"step": 4, "epoch": 0, "batch_in_epoch": 4, "adam_t": 4, "bad_steps": 0},
            "generator": {"kind": "numpy", "seed": 1, "epoch": 0, "batch_in_epoch": 4},
            "tokenizer": "word", "vocab_hash": "ab" * 32, "dataset_key": "0f" * 32,
            "train_config": {"batch_size": 8}}


CRAFTED_META = [
    ("state.step", -5), ("state.epoch", "3"), ("state.adam_t", 1.5), ("state.bad_steps", True),
    ("state.batch_in_epoch", 2**63), ("state.step", None), ("state", [4]),
    ("generator.seed", -1), ("generator", "x"), ("tokenizer", "bpe2"), ("tokenizer", 1),
    ("vocab_hash", "xyz"), ("vocab_hash", "AB" * 32), ("dataset_key", 5),
    ("train_config", [8]),
]


@pytest.mark.parametrize("field, value", CRAFTED_META)
def test_crafted_meta_field_is_refused_by_name(tmp_path, field, value):
    meta = good_meta()
    *groups, last = field.split(".")
    target = meta[groups[0]] if groups else meta
    target[last] = value
    path = tmp_path / "crafted.cllm"
    write_custom(path, layout_tensors(adam=True), good_metadata(meta=meta))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f"bad meta field {field}" in msg and str(path) in msg and "\n" not in msg


def test_missing_state_field_is_refused(tmp_path):
    meta = good_meta()
    del meta["state"]["adam_t"]
    path = tmp_path / "crafted.cllm"
    write_custom(path, layout_tensors(adam=True), good_metadata(meta=meta))
    with pytest.raises(CheckpointError, match="bad meta field state.adam_t: missing"):
        load_checkpoint(path)


def test_well_formed_meta_loads(tmp_path):
    path = tmp_path / "ok.cllm"
    write_custom(path, layout_tensors(adam=True), good_metadata(meta=good_meta()))
    assert load_checkpoint(path).meta == good_meta()


@pytest.mark.parametrize("field, value", [("num_heads", "2"), ("embed_dim", 0), ("seq_len", -6),
                                          ("ff_dim", 32.0), ("num_layers", True),
                                          ("vocab_size", None), ("num_layers", 10**9),
                                          ("num_heads", 3)])
def test_crafted_model_config_is_refused_by_name(tmp_path, field, value):
    md = good_metadata()
    md["model_config"] = json.dumps(dict(CFG.to_dict(), **{field: value}))
    path = tmp_path / "crafted.cllm"
    write_custom(path, layout_tensors(), md)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "bad model_config" in msg and field in msg and "\n" not in msg


@pytest.mark.parametrize("key", ["meta", "model_config"])
def test_deeply_nested_json_is_refused(tmp_path, key):
    md = good_metadata()
    md[key] = "[" * 100000 + "]" * 100000
    path = tmp_path / "nested.cllm"
    write_custom(path, layout_tensors(), md)
    with pytest.raises(CheckpointError, match=f"bad {key}"):
        load_checkpoint(path)


@pytest.fixture
def trained(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(120, seed=11, punct=".!?"), encoding="utf-8")
    ck = tmp_path / "ck"
    argv = [corpus, "--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len",
            "16", "--batch-size", "8", "--micro-batch", "4", "--max-steps", "4",
            "--warmup-steps", "1", "--tokenizer", "word", "--vocab-size", "120", "--threads", "2", "--quiet",
            "--checkpoint-dir", ck]
    assert call(capsys, train_main, *argv)[0] == 0
    return argv, ck


def test_resume_from_a_negative_step_is_one_line(trained, capsys):
    argv, ck = trained
    path = sorted(ck.glob("checkpoint_step_*.cllm"))[-1]
    ckpt = load_checkpoint(path)
    ckpt.meta["state"]["step"] = -5
    save_checkpoint(path, ckpt.config, ckpt.params, ckpt.adam_m, ckpt.adam_v,
                    ckpt.meta)                           # valid checksums
    code, _, err = call(capsys, train_main, *argv, "--resume")
    assert_one_error_line(code, err, "train_model", path.name, "state.step", "-5")


# --- files that are not regular files ----------------------------------------------------

def not_regular_cases(model_dir, fifo, tmp_path):
    ckpt, vocab = model_dir / "final_model.cllm", model_dir / "vocab.txt"
    text = tmp_path / "text.txt"
    text.write_text("the old king\n", encoding="utf-8")
    return {
        "checkpoint": ("inference", "cllm_inference", [fifo], [ckpt]),
        "inference --vocab": ("inference", "cllm_inference", [ckpt, "--vocab", fifo],
                              [ckpt, "--vocab", vocab]),
        "tokenize --vocab": ("tokenize", "cllm_tokenize", [text, "--vocab", fifo],
                             [text, "--vocab", vocab]),
        "plot metrics": ("plot", "cllm_plot", [fifo, "-o", tmp_path / "x.png"], None),
    }


@pytest.mark.parametrize("case", ["checkpoint", "inference --vocab", "tokenize --vocab",
                                  "plot metrics"])
@pytest.mark.parametrize("kind", ["a FIFO", "a character device", "a directory"])
def test_non_regular_files_are_refused_at_once(model_dir, fifo, tmp_path, case, kind):
    module, prog, argv, _ = not_regular_cases(model_dir, fifo, tmp_path)[case]
    other = {"a FIFO": fifo, "a character device": "/dev/zero", "a directory": tmp_path}[kind]
    argv = [other if a == fifo else a for a in argv]
    if case == "checkpoint" and kind == "a directory":
        expected = "no final_model.cllm"        # a directory means the checkpoint it holds
    else:
        expected = f"{kind}, not"
    p = run_tool(module, *argv, memory_limit=MEMORY_LIMIT)
    assert_one_error_line(p.returncode, p.stderr, prog, str(other), expected)


# --- standard output that fails ----------------------------------------------------------

def tool_argv(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sentences(200, seed=2, punct=".!?"), encoding="utf-8")
    return {"inference": ("cllm_inference", [model_dir / "final_model.cllm", "--prompt", "the",
                                             "--max-tokens", "200"]),
            "tokenize": ("cllm_tokenize", [text, text, text, "--vocab",
                                               model_dir / "vocab.txt"])}


@pytest.mark.parametrize("module", ["inference", "tokenize"])
def test_full_disk_on_stdout_is_one_line(model_dir, tmp_path, module):
    prog, argv = tool_argv(model_dir, tmp_path)[module]
    with open("/dev/full", "w") as full:
        p = run_tool(module, *argv, stdout=full, stderr=subprocess.PIPE)
    assert_one_error_line(p.returncode, p.stderr, prog, "cannot write output",
                          "No space left on device", status=1)


def stdout_on_small_tmpfs(tmp_path, size, module, *argv):
    """`python -m cllm_cli.cli.<module> argv > MNT/out` with a tmpfs of `size` at MNT, mounted
    in a mount namespace of its own; (the completed process, the bytes of out). Skips when no
    tmpfs can be mounted (a user namespace is not allowed here)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = ('mount -t tmpfs -o size="$SIZE" cllm-test "$MNT" || exit 99\n'
              '"$@" >"$MNT/out"; status=$?\n'
              'cp "$MNT/out" "$MNT/../out"\n'
              'exit $status\n')
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script,
                        "sh", sys.executable, "-m", f"cllm_cli.cli.{module}", *map(str, argv)],
                       cwd=ROOT, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "MNT": str(mnt), "SIZE": size})
    if p.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {p.stderr.strip()}")
    return p, (tmp_path / "out").read_bytes()


def test_a_disk_that_fills_during_one_long_write_is_one_line(model_dir, tmp_path):
    """One JSON line far longer than the space left: the first write takes what fits and
    returns a short count, the error comes only with the next write, which must be made."""
    text = tmp_path / "text.txt"
    text.write_text(sentences(6000, seed=2, punct=".!?"), encoding="utf-8")
    p, out = stdout_on_small_tmpfs(tmp_path, "64k", "tokenize", text, "--json",
                                   "--vocab", model_dir / "vocab.txt")
    # premise: the output is one line much longer than the tmpfs holds
    assert out.count(b"\n") == 0 and len(out) == 64 << 10, len(out)
    assert_one_error_line(p.returncode, p.stderr, "cllm_tokenize", "cannot write output",
                          "No space left on device", status=1)


@pytest.mark.parametrize("module", ["inference", "tokenize"])
def test_closed_pipe_ends_quietly(model_dir, tmp_path, module):
    _, argv = tool_argv(model_dir, tmp_path)[module]
    read_end, write_end = os.pipe()
    os.close(read_end)                  # the reader is gone before the first write
    try:
        p = run_tool(module, *argv, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert p.returncode == 1 and p.stderr == ""


def test_closed_stdout_is_one_line(model_dir, tmp_path):
    """`cllm_inference ... >&-`: the process starts without file descriptor 1."""
    prog, argv = tool_argv(model_dir, tmp_path)["inference"]
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.inference", *map(str, argv)], cwd=ROOT,
                       stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: os.close(1))
    assert_one_error_line(p.returncode, p.stderr, prog, "cannot write output",
                          "Bad file descriptor", status=1)


def test_plot_on_a_full_disk_still_writes_the_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n"
                               for s in range(1, 20)))
    with open("/dev/full", "w") as full:
        p = run_tool("plot", metrics, "-o", tmp_path / "loss.png", stdout=full,
                     stderr=subprocess.PIPE)
    assert_one_error_line(p.returncode, p.stderr, "cllm_plot", "No space left on device",
                          status=1)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


TRAIN = ["--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
         "--batch-size", "8", "--micro-batch", "4", "--max-steps", "30", "--warmup-steps", "1",
         "--tokenizer", "word", "--vocab-size", "120", "--threads", "2", "--log-interval", "1"]


@pytest.mark.parametrize("output", ["/dev/full", "closed pipe"])
def test_lost_stdout_never_loses_the_training(tmp_path, output):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(120, seed=11, punct=".!?"), encoding="utf-8")
    ck = tmp_path / "ck"
    argv = [corpus, *TRAIN, "--checkpoint-dir", ck]
    if output == "/dev/full":
        stdout = os.open("/dev/full", os.O_WRONLY)
    else:
        read_end, stdout = os.pipe()
        os.close(read_end)
    try:
        p = run_tool("train", *argv, stdout=stdout, stderr=subprocess.PIPE)
    finally:
        os.close(stdout)
    reason = "No space left on device" if output == "/dev/full" else "Broken pipe"
    assert "Traceback" not in p.stderr, p.stderr
    assert f"cannot write to standard output ({reason})" in p.stderr
    assert p.returncode == 0, p.stderr
    assert load_checkpoint(ck / "final_model.cllm").meta["state"]["step"] == 30


# --- small ones --------------------------------------------------------------------------

def test_huge_losses_and_perplexities_stay_short():
    assert ppl_text(2.5) == " (ppl 12.18)" and fmt_loss(2.5) == "2.5000"
    assert fmt_ppl(14.5) == "1.98e+06"
    assert ppl_text(2.7e7) == " (ppl inf)" and fmt_loss(2.7e7) == "2.7e+07"
    assert ppl_text(700.0) == " (ppl 1.01e+304)"
    assert ppl_text(math.inf) == " (ppl inf)" and fmt_loss(math.inf) == "inf"
    assert ppl_text(math.nan) == "" and fmt_loss(math.nan) == "n/a"


def test_binary_standard_input_is_refused_at_once(model_dir):
    with open("/dev/zero", "rb") as zero:
        p = run_tool("tokenize", "-", "--vocab", model_dir / "vocab.txt", stdin=zero,
                     memory_limit=MEMORY_LIMIT)
    assert_one_error_line(p.returncode, p.stderr, "cllm_tokenize", "<stdin>", "NUL byte at offset 0")


@pytest.mark.parametrize("data, fragment", [
    (b"the king\n" * 10000 + b"\x00", "not a text file (NUL byte at offset 90000)"),
    (b"the king \xff\x00", "not valid UTF-8 (bad byte at offset 9)")])
def test_binary_standard_input_names_the_first_bad_byte(model_dir, data, fragment):
    p = run_tool("tokenize", "-", "--vocab", model_dir / "vocab.txt", input=data,
                 text=False)
    assert_one_error_line(p.returncode, p.stderr.decode(), "cllm_tokenize", fragment)


def test_standard_input_text_is_encoded(capsys, model_dir, monkeypatch):
    text = sentences(3, seed=1, punct=".")
    tokenizer = Tokenizer.load(model_dir / "vocab.txt")

    class Stdin:
        buffer = __import__("io").BytesIO(text.encode() * 3000)

    monkeypatch.setattr(sys, "stdin", Stdin)
    code, out, _ = call(capsys, tokenize_cli.main, "-", "--vocab", model_dir / "vocab.txt")
    assert code == 0
    assert out.split() == [str(i) for i in tokenizer.encode(text * 3000)]


def test_unknown_prompt_word_warning_comes_first_on_its_own_line(model_dir):
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.inference",
                        str(model_dir / "final_model.cllm"), "--prompt", "the zzyzx",
                        "--max-tokens", "8"], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    lines = p.stdout.splitlines()
    assert p.returncode == 0
    assert lines[0] == ("cllm_inference: warning: prompt token not in the vocabulary, read as "
                        "<unk>: 'zzyzx'")
    assert lines[1].startswith("the zzyzx") and len(lines) == 2


def test_unbuilt_engine_gives_a_clear_import_error(tmp_path):
    """A source checkout without the compiled engine: no "circular import" riddle. The
    interpreter runs without site (-S), so that no installed copy of cllm_cli is found."""
    shutil.copytree(os.path.join(ROOT, "cllm_cli"), tmp_path / "cllm_cli",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    site_packages = os.path.dirname(os.path.dirname(np.__file__))
    p = subprocess.run([sys.executable, "-S", "-c", "import cllm_cli"], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{site_packages}"),
                       capture_output=True, text=True)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "not built" in last
    assert "make build" in last and "pip install -e ." in last and "circular" not in p.stderr
