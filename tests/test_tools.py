"""The companion tools: cllm_inference, cllm_tokenize, cllm_plot, man pages.

Bad input must give exactly one line on stderr starting with "<tool>: error:", exit status 2
and no traceback. The commands run in-process through their main(argv); one case per tool
runs a real process. The model is trained for a few steps once per module.
"""
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, assert_one_error_line, call, sentences

from cllm_cli.cli import evaluate as evaluate_cli
from cllm_cli.cli import inference
from cllm_cli.cli import plot as plot_cli
from cllm_cli.cli import tokenize as tokenize_cli
from cllm_cli.errors import MissingDependency
from cllm_cli.tokenizers import EOS, UNK, Tokenizer
from cllm_cli.training import plot
from cllm_cli.training.loop import train

WORDS = ("the a old young quiet brave small green river hill town market baker miller king "
         "queen child dog cat horse boat road bridge house door bread apple fish stone tree "
         "walked ran saw found gave took made sang told carried opened watched slowly never "
         "there here and but with under over near into from to of in on at").split()


def corpus_text(n_sentences, seed=3):
    return sentences(n_sentences, seed, punct=(".", "!", "?"), words=WORDS, max_words=10,
                     capitalize=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint directory of a tiny model trained for a few steps."""
    root = tmp_path_factory.mktemp("tools")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(150), encoding="utf-8")
    ck = root / "ck"
    train([str(corpus)], checkpoint_dir=str(ck), tokenizer="word", embed_dim=16, num_layers=1, num_heads=2,
          seq_len=16, batch_size=8, micro_batch=4, max_steps=6, warmup_steps=1, threads=2,
          eval_interval=3, metrics_file=str(root / "metrics.jsonl"), quiet=True)
    return ck


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return Tokenizer.load(run_dir / "vocab.txt", "word")


# --- cllm_inference ----------------------------------------------------------------------

def generate(capsys, run_dir, *extra):
    return call(capsys, inference.main, run_dir / "final_model.cllm", "--prompt", "the old miller",
                "--max-tokens", "20", *extra)


def test_same_seed_same_text_different_seed_different_text(capsys, run_dir):
    code_a, a, err_a = generate(capsys, run_dir, "--seed", "5")
    code_b, b, _ = generate(capsys, run_dir, "--seed", "5")
    code_c, c, _ = generate(capsys, run_dir, "--seed", "6")
    assert code_a == code_b == code_c == 0, err_a
    assert err_a == ""
    assert a == b
    assert a != c
    assert a.startswith("the old miller")
    assert len(a.split()) > 3


def test_greedy_is_deterministic_without_a_seed(capsys, run_dir):
    _, a, _ = generate(capsys, run_dir, "--temperature", "0", "--seed", "1")
    _, b, _ = generate(capsys, run_dir, "--temperature", "0", "--seed", "2")
    assert a == b


def test_output_ends_with_one_newline(capsys, run_dir):
    code, out, _ = generate(capsys, run_dir)
    assert code == 0
    assert out.endswith("\n") and not out.endswith("\n\n")


class Recorder:
    """A stdout that remembers each write and whether it was flushed before the next one."""

    def __init__(self):
        self.writes, self.flushed = [], []

    def write(self, text):
        self.writes.append(text)
        self.flushed.append(False)

    def flush(self):
        if self.flushed:
            self.flushed[-1] = True


def test_tokens_are_streamed_and_decoded_incrementally(run_dir, tokenizer):
    from cllm_cli.api import CLLMModel
    model = CLLMModel.load(run_dir / "final_model.cllm")
    out = Recorder()
    prompt = "The old miller "
    ids = inference.stream(model, tokenizer, prompt, out, 15, 1.0, 0, 1.0, 9)
    assert len(out.writes) >= 1 + len(ids)           # the prompt, then a piece per token
    assert all(out.flushed), "every piece must be flushed as it is written"
    prompt_ids = tokenizer.encode(prompt).tolist()
    head = tokenizer.decode(prompt_ids)
    continuation = tokenizer.decode(prompt_ids + ids)[len(head):]
    assert "".join(out.writes) == "The old miller" + continuation + "\n"


class FakeModel:
    def __init__(self, ids):
        self.ids = ids

    def generate(self, prompt_ids, **kw):
        yield from self.ids


def test_generation_stops_at_eos(tokenizer):
    a, b, c = (tokenizer.stoi[w] for w in ("the", "king", "river"))
    out = io.StringIO()
    ids = inference.stream(FakeModel([a, b, EOS, c]), tokenizer, "", out, 10, 1.0, 0, 1.0, 0)
    assert ids == [a, b]
    assert out.getvalue() == "the king\n"


def test_punctuation_is_spaced_like_text(tokenizer):
    ids = [tokenizer.stoi[w] for w in ("the", "dog", "ran", ".", "the", "cat", "!")]
    out = io.StringIO()
    inference.stream(FakeModel(ids), tokenizer, "", out, 10, 1.0, 0, 1.0, 0)
    assert out.getvalue() == "the dog ran. the cat!\n"


def test_unknown_prompt_words_warn_once_and_still_generate(capsys, run_dir):
    code, out, err = call(capsys, inference.main, run_dir, "--prompt",
                          "the zzyzx walked to qwerty and zzyzx", "--max-tokens", "5")
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cllm_inference: warning:")
    assert "'zzyzx'" in lines[0] and "'qwerty'" in lines[0]
    assert lines[0].count("zzyzx") == 1
    assert out.startswith("the zzyzx walked to qwerty and zzyzx")


def test_checkpoint_directory_means_its_final_model(capsys, run_dir):
    _, a, _ = generate(capsys, run_dir, "--seed", "3")
    _, b, _ = call(capsys, inference.main, run_dir, "--prompt", "the old miller",
                   "--max-tokens", "20", "--seed", "3")
    assert a == b


def test_vocabulary_of_another_run_is_refused(capsys, run_dir, tmp_path):
    lines = (run_dir / "vocab.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    token, count = lines[10].rstrip("\n").split("\t")
    lines[10] = f"{token}\t{int(count) + 1}\n"          # same tokens, other counts: other run
    other = tmp_path / "vocab.txt"
    other.write_text("".join(lines), encoding="utf-8")
    code, out, err = call(capsys, inference.main, run_dir / "final_model.cllm", "--vocab", other)
    assert_one_error_line(code, err, "cllm_inference", str(other), "not the vocabulary")
    assert out == ""


def test_missing_vocab_next_to_the_checkpoint(capsys, run_dir, tmp_path):
    shutil.copy(run_dir / "final_model.cllm", tmp_path / "model.cllm")
    code, _, err = call(capsys, inference.main, tmp_path / "model.cllm")
    assert_one_error_line(code, err, "cllm_inference", "vocab.txt", "--vocab")


def damaged(tmp_path, run_dir):
    data = (run_dir / "final_model.cllm").read_bytes()
    path = tmp_path / "damaged.cllm"
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("argv, fragment", [
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "many"], "--max-tokens"),
    (["--seed", "-3"], "--seed"),
    (["--no-such-option"], "--no-such-option"),
    (["--vocab", "{tmp}/missing.txt"], "missing.txt"),
    (["--vocab", "{tmp}/garbage.txt"], "garbage.txt"),
])
def test_bad_options_are_one_line(capsys, run_dir, tmp_path, argv, fragment):
    (tmp_path / "garbage.txt").write_text("this is not a vocabulary\n", encoding="utf-8")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = call(capsys, inference.main, run_dir / "final_model.cllm", *argv)
    assert_one_error_line(code, err, "cllm_inference", fragment)
    assert out == ""


@pytest.mark.parametrize("which", ["missing", "damaged", "empty directory", "not a model"])
def test_bad_checkpoints_are_one_line(capsys, run_dir, tmp_path, which):
    path = {"missing": lambda: tmp_path / "nope.cllm",
            "damaged": lambda: damaged(tmp_path, run_dir),
            "empty directory": lambda: tmp_path,
            "not a model": lambda: run_dir / "vocab.txt"}[which]()
    code, _, err = call(capsys, inference.main, path)
    assert_one_error_line(code, err, "cllm_inference", path.name)


def test_ctrl_c_exits_130_quietly(capsys, run_dir, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "stream", interrupted)
    code, _, err = generate(capsys, run_dir)
    assert code == 130
    assert err == ""


SECOND_SIGNAL = """
import os, signal, sys
from cllm_cli.cli.common import run_main

def command():
    raise KeyboardInterrupt                  # the first Ctrl-C

def on_interrupt():
    os.kill(os.getpid(), signal.SIGINT)      # a second one while the first is handled
    print("handled", flush=True)

status = run_main("tool", command, on_interrupt=on_interrupt, command_line=COMMAND_LINE)
os.kill(os.getpid(), signal.SIGINT)          # a third one while the process ends
print("ending", status, signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
sys.exit(status)
"""


@pytest.mark.parametrize("command_line", [True, False])
def test_a_second_ctrl_c_while_the_first_is_handled_changes_nothing(command_line):
    """Ctrl-C pressed twice: the second signal reaches the tool while it handles the first
    (here: sent from the interrupt's own handling) and must not turn the clean exit into a
    traceback. On the command line the stop signals stay ignored until the process ends (a
    third Ctrl-C changes nothing either); a caller in the same process gets its handlers back
    (the third then interrupts the caller, as it should)."""
    p = subprocess.run([sys.executable, "-c",
                        SECOND_SIGNAL.replace("COMMAND_LINE", str(command_line))],
                       cwd=ROOT, capture_output=True, text=True)
    if command_line:
        assert (p.returncode, p.stdout, p.stderr) == (130, "handled\nending 130 True\n", "")
    else:
        assert p.stdout == "handled\n"
        assert p.returncode == -signal.SIGINT and p.stderr.rstrip().endswith("KeyboardInterrupt")


def test_real_process_bad_input_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.inference", str(tmp_path / "x.cllm")],
                       cwd=ROOT, capture_output=True, text=True)
    assert_one_error_line(p.returncode, p.stderr, "cllm_inference", "x.cllm")


# --- cllm_tokenize -----------------------------------------------------------------------

TEXT = "the old miller walked to the market. the king saw a dog!\n"


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_tokenize_prints_ids_per_file(capsys, run_dir, tokenizer, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("the river", encoding="utf-8")
    code, out, err = call(capsys, tokenize_cli.main, text_file, other, "--vocab",
                          run_dir / "vocab.txt")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert [int(i) for i in lines[0].split()] == tokenizer.encode(TEXT).tolist()
    assert [int(i) for i in lines[1].split()] == tokenizer.encode("the river").tolist()


def test_tokenize_takes_a_word_runs_directory_for_its_vocabulary(capsys, run_dir, tokenizer,
                                                                text_file):
    """--vocab RUN (a word run's checkpoint directory) reads RUN/vocab.txt, as --vocab RUN of
    a bpe run reads its tokenizer.json (it was refused: "a directory ... and it holds none")."""
    code, out, err = call(capsys, tokenize_cli.main, text_file, "--vocab", run_dir)
    assert code == 0, err
    assert [int(i) for i in out.split()] == tokenizer.encode(TEXT).tolist()


def test_tokenize_reads_directories_like_train_model(capsys, run_dir, tokenizer, tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("the river", encoding="utf-8")
    (d / "sub" / "a.txt").write_text(TEXT, encoding="utf-8")
    (d / "notes.md").write_text("the king", encoding="utf-8")
    code, out, err = call(capsys, tokenize_cli.main, d, "--vocab", run_dir / "vocab.txt")
    assert code == 0, err
    # every *.txt below the directory, in sorted path order; notes.md is not read
    assert [[int(i) for i in line.split()] for line in out.splitlines()] == [
        tokenizer.encode("the river").tolist(), tokenizer.encode(TEXT).tolist()]
    code, out, err = call(capsys, tokenize_cli.main, d, "--vocab", run_dir / "vocab.txt",
                          "--glob", "*.md")
    assert code == 0, err
    assert [int(i) for i in out.split()] == tokenizer.encode("the king").tolist()


def test_tokenize_json_and_decode_round_trip(capsys, run_dir, tokenizer, text_file, tmp_path,
                                             monkeypatch):
    vocab = run_dir / "vocab.txt"
    code, out, _ = call(capsys, tokenize_cli.main, text_file, "--vocab", vocab, "--json")
    assert code == 0
    record = json.loads(out)
    assert record == {"file": str(text_file), "ids": tokenizer.encode(TEXT).tolist()}
    # plain ids from a file
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(" ".join(map(str, record["ids"])) + "\n", encoding="utf-8")
    code, decoded, _ = call(capsys, tokenize_cli.main, ids_file, "--vocab", vocab, "--decode")
    assert code == 0
    assert decoded == tokenizer.decode(record["ids"]) + "\n"
    # the --json output, on standard input
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(out.encode("utf-8"))))
    code, again, _ = call(capsys, tokenize_cli.main, "-", "--vocab", vocab, "--decode")
    assert code == 0
    assert again == decoded


def test_decoding_restores_normalised_text(capsys, run_dir, text_file):
    vocab = run_dir / "vocab.txt"
    _, ids, _ = call(capsys, tokenize_cli.main, text_file, "--vocab", vocab)
    assert UNK not in map(int, ids.split())           # every word of TEXT is in the corpus
    ids_file = text_file.with_name("ids.txt")
    ids_file.write_text(ids, encoding="utf-8")
    _, text, _ = call(capsys, tokenize_cli.main, ids_file, "--vocab", vocab, "--decode")
    assert text == TEXT


def test_tokenize_stats(capsys, run_dir, tokenizer, tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("the the the king zzyzx zzyzx qqq.", encoding="utf-8")
    vocab = run_dir / "vocab.txt"
    code, out, _ = call(capsys, tokenize_cli.main, p, "--vocab", vocab, "--stats", "--json",
                        "--top", "2")
    assert code == 0
    stats = json.loads(out)
    n = len(tokenizer.tokens(p.read_text()))
    unknown = sum(1 for t in tokenizer.tokens(p.read_text()) if t not in tokenizer.stoi)
    assert stats["tokens"] == n
    assert stats["unknown"] == unknown >= 3
    assert math.isclose(stats["unknown_rate"], unknown / n)
    assert len(stats["top"]) == 2
    assert stats["top"][0][1] >= stats["top"][1][1]
    assert ["zzyzx", 2] in stats["unknown_top"]
    code, text, _ = call(capsys, tokenize_cli.main, p, "--vocab", vocab, "--stats")
    assert code == 0
    assert f"tokens:         {n}" in text
    assert "unknown tokens:" in text and "zzyzx" in text


def test_tokenize_stats_of_an_exported_word_tokenizer(capsys, tmp_path):
    """A word model's tokenizer.json (what cllm_export writes) counts the words it reads as
    <unk> under their own spelling, as the vocab.txt it came from does."""
    words = Tokenizer.build(["the cat sat on the mat."], "word", 100)
    (tmp_path / "tokenizer.json").write_bytes(words.tokenizer_json())
    words.save(tmp_path / "vocab.txt")
    p = tmp_path / "s.txt"
    p.write_text("The dog sat, the dog sat.", encoding="utf-8")
    stats = {}
    for vocab in ("vocab.txt", "tokenizer.json"):
        code, out, err = call(capsys, tokenize_cli.main, p, "--vocab", tmp_path / vocab,
                              "--stats", "--json")
        assert code == 0, err
        stats[vocab] = json.loads(out)
    assert stats["tokenizer.json"]["unknown_top"] == [["dog", 2], [",", 1]]
    assert stats["tokenizer.json"]["unknown_top"] == stats["vocab.txt"]["unknown_top"]
    assert stats["tokenizer.json"]["unknown"] == stats["vocab.txt"]["unknown"] == 3


def test_char_vocabulary_is_detected(capsys, tmp_path):
    tok = Tokenizer.build(["Hello, World!\nhello again"], kind="char", vocab_size=100)
    tok.save(tmp_path / "vocab.txt")
    p = tmp_path / "t.txt"
    p.write_text("Hello\n", encoding="utf-8")
    _, out, _ = call(capsys, tokenize_cli.main, p, "--vocab", tmp_path / "vocab.txt")
    assert [int(i) for i in out.split()] == tok.encode("Hello\n").tolist()
    (tmp_path / "ids.txt").write_text(out, encoding="utf-8")
    _, text, _ = call(capsys, tokenize_cli.main, tmp_path / "ids.txt", "--vocab",
                      tmp_path / "vocab.txt", "--decode")
    assert text == "Hello\n"


@pytest.mark.parametrize("case, fragment", [
    ("missing vocab", "missing-vocab.txt"),
    ("missing file", "missing.txt"),
    ("binary file", "blob.bin"),
    ("bad id", "'seven'"),
    ("id out of range", "99999"),
    ("bad json", "not valid JSON"),
    ("negative top", "--top"),
    ("decode and stats", "--stats"),
    ("no vocab option", "--vocab"),
    ("stdin twice", "standard input"),
])
def test_tokenize_bad_input_is_one_line(capsys, run_dir, text_file, tmp_path, case, fragment):
    vocab = ["--vocab", run_dir / "vocab.txt"]
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "bad-ids.txt").write_text("4 5 seven 6", encoding="utf-8")
    (tmp_path / "big-ids.txt").write_text("4 99999", encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"ids": [4, 5]\n', encoding="utf-8")
    argv = {
        "missing vocab": [text_file, "--vocab", tmp_path / "missing-vocab.txt"],
        "missing file": [tmp_path / "missing.txt", *vocab],
        "binary file": [tmp_path / "blob.bin", *vocab],
        "bad id": [tmp_path / "bad-ids.txt", "--decode", *vocab],
        "id out of range": [tmp_path / "big-ids.txt", "--decode", *vocab],
        "bad json": [tmp_path / "bad.json", "--decode", *vocab],
        "negative top": [text_file, "--stats", "--top", "-1", *vocab],
        "decode and stats": [text_file, "--decode", "--stats", *vocab],
        "no vocab option": [text_file],
        "stdin twice": ["-", "-", *vocab],
    }[case]
    code, out, err = call(capsys, tokenize_cli.main, *argv)
    assert_one_error_line(code, err, "cllm_tokenize", fragment)
    assert out == ""


# --- cllm_plot -----------------------------------------------------------------------------

def test_plot_writes_a_png(capsys, run_dir, tmp_path):
    assert importlib.util.find_spec("matplotlib"), "matplotlib: make installs it"
    metrics = run_dir.parent / "metrics.jsonl"
    out = tmp_path / "loss.png"
    assert plot.plot_metrics(metrics, out) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    local = tmp_path / "m.jsonl"
    shutil.copy(metrics, local)
    code, stdout, err = call(capsys, plot_cli.main, local)      # default: METRICS.png
    assert code == 0, err
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_metrics_reading(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 4.5},
            {"step": 2, "loss": 3.9}, {"step": 3, "loss": float("nan")}]   # a resume repeats 2
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    train_curve, val_curve = plot.read_metrics(p)
    assert train_curve[:2] == [(1, 5.0), (2, 3.9)]
    assert math.isnan(train_curve[2][1])
    assert val_curve == [(2, 4.5)]


def test_plot_draws_a_run_with_a_skipped_step(capsys, tmp_path):
    # train_model writes the loss of a skipped step as null (JSON has no NaN): a gap
    p = tmp_path / "m.jsonl"
    rows = [{"step": 1, "loss": 5.0, "grad_norm": 1.0}, {"step": 2, "loss": None, "grad_norm": None},
            {"step": 3, "loss": 4.0, "grad_norm": 1.0}, {"step": 3, "val_loss": None}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train_curve, val_curve = plot.read_metrics(p)
    assert [step for step, _ in train_curve] == [1, 2, 3] and math.isnan(train_curve[1][1])
    assert len(val_curve) == 1 and math.isnan(val_curve[0][1])
    code, _, err = call(capsys, plot_cli.main, p, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_leaves_out_a_last_record_cut_mid_write(capsys, tmp_path):
    # a disk that filled while train_model wrote the record: the run went on without metrics
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo',
                 encoding="utf-8")
    train_curve, _ = plot.read_metrics(p)
    assert train_curve == [(1, 5.0), (2, 4.0)]
    p.write_text('{"step": 1, "lo\n{"step": 2, "loss": 4.0}\n', encoding="utf-8")
    code, _, err = call(capsys, plot_cli.main, p, "-o", tmp_path / "x.png")
    assert_one_error_line(code, err, "cllm_plot", f"{p}:1:")     # not the last line: damaged


@pytest.mark.parametrize("title", ["loss at lr $\\foo$", None])
def test_plot_title_is_plain_text(capsys, tmp_path, title):
    # dollar signs are text, not matplotlib's mathtext ("$\foo$" failed to parse); the
    # default title is the metrics file's name, which may hold them too
    p = tmp_path / "run_$\\x$.jsonl"
    p.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n', encoding="utf-8")
    argv = [p, "-o", tmp_path / "x.png"] + (["--title", title] if title else [])
    code, _, err = call(capsys, plot_cli.main, *argv)
    assert code == 0, err
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, fragment", [
    ("", "no training or validation loss"),
    ('{"step": NaN, "loss": 2.0}\n', ":1: expected an object with a whole \"step\" number"),
    ('{"step": Infinity, "loss": 2.0}\n', ":1: expected an object with a whole \"step\" number"),
    ('{"step": 1.5, "loss": 2.0}\n', ":1: expected an object with a whole \"step\" number"),
    ('{"step": 1, "loss": 2.0}\nnot json\n', ":2:"),
    ('{"loss": 2.0}\n', "step"),
    ('{"step": 1, "loss": "low"}\n', "loss"),
])
def test_plot_bad_metrics_are_one_line(capsys, tmp_path, content, fragment):
    p = tmp_path / "m.jsonl"
    p.write_text(content, encoding="utf-8")
    code, _, err = call(capsys, plot_cli.main, p, "-o", tmp_path / "x.png")
    assert_one_error_line(code, err, "cllm_plot", fragment)
    assert not (tmp_path / "x.png").exists()


def test_plot_missing_metrics_file(capsys, tmp_path):
    code, _, err = call(capsys, plot_cli.main, tmp_path / "none.jsonl")
    assert_one_error_line(code, err, "cllm_plot", "none.jsonl")


def test_plot_without_matplotlib(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    with pytest.raises(MissingDependency, match="pip install matplotlib"):
        plot.require_matplotlib()
    code, _, err = call(capsys, plot_cli.main, run_dir.parent / "metrics.jsonl", "-o",
                        tmp_path / "x.png")
    assert_one_error_line(code, err, "cllm_plot", "matplotlib is not installed: "
                          "pip install matplotlib", status=1)


# --- help and man pages -----------------------------------------------------------------

@pytest.mark.parametrize("module, groups, default", [
    (inference, ["generation", "sampling", "files"], "(default: 0.95)"),
    (tokenize_cli, ["vocabulary", "mode", "output"], "(default: 10)"),
    (plot_cli, ["output"], "(default: METRICS with the extension .png)"),
    (evaluate_cli, ["what is evaluated", "text files", "model", "output"],
     "(default: *.txt)"),
])
def test_help_groups_options_and_shows_defaults(module, groups, default):
    text = " ".join(module.build_parser().format_help().split())
    for g in groups:
        assert f"{g}:" in text
    assert default in text
    assert "(default: None)" not in text


def normalised(page):
    """A man page without its generation date."""
    return re.sub(r'^(\.TH \S+ "\d+") "[^"]*"', r'\1 "DATE"', page, count=1, flags=re.M)


def test_man_pages_are_up_to_date(tmp_path):
    """`make man` output for the current parsers equals the committed man/*.1 files."""
    assert importlib.util.find_spec("argparse_manpage"), "argparse-manpage: make installs it"
    make = shutil.which("make")
    assert make is not None, "make is not installed"
    runner = (f"{sys.executable} -c 'import sys; from argparse_manpage.cli import main; "
              f"sys.exit(main())'")
    p = subprocess.run([make, "-s", "-C", ROOT, "man-pages", f"MAN_DIR={tmp_path}",
                        f"ARGPARSE_MANPAGE={runner}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    made = sorted(f.name for f in tmp_path.iterdir())
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        commands = tomllib.load(f)["project"]["scripts"]
    assert made == sorted(f"{name}.1" for name in commands), "every command has a man page"
    committed = os.path.join(ROOT, "man")
    assert sorted(os.listdir(committed)) == made, "man/ holds other files than `make man` makes"
    stale = [name for name in made
             if normalised((tmp_path / name).read_text(encoding="utf-8"))
             != normalised(open(os.path.join(committed, name), encoding="utf-8").read())]
    assert not stale, f"man pages out of date (run `make man`): {', '.join(stale)}"


def test_char_vocabulary_of_a_text_without_white_space(capsys, tmp_path):
    # a char run on a text with no space or line break: its vocab.txt lists single
    # characters only, which the tools must still read as a char vocabulary
    from cllm_cli.cli.train import main as train_main
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abcab" * 40, encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", run, "--tokenizer", "char",
                        "--embed-dim", "8", "--num-layers", "1", "--num-heads", "2",
                        "--seq-len", "8", "--batch-size", "2", "--micro-batch", "1",
                        "--max-steps", "1", "--threads", "1", "--quiet")
    assert code == 0, err
    vocab = run / "vocab.txt"
    tokenizer = Tokenizer.load(vocab, "char")
    code, out, err = call(capsys, tokenize_cli.main, corpus, "--vocab", vocab)
    assert code == 0, err
    assert [int(i) for i in out.split()] == tokenizer.encode("abcab" * 40).tolist()
    assert UNK not in [int(i) for i in out.split()]
    for main, argv in ((inference.main, ["--prompt", "ab", "--max-tokens", "2"]),
                       (evaluate_cli.main, [corpus])):
        code, out, err = call(capsys, main, run, "--vocab", vocab, "--threads", "1", *argv)
        assert code == 0, err
