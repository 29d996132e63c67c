"""train_model on the command line: bad input files and option values, checkpoint directories
and resuming, Ctrl-C, the metrics file and the loss plot.

Bad input must give exactly one line on stderr starting with "train_model: error:", exit
status 2 and no traceback. Most cases call cllm_cli.cli.train.main(argv) in-process; the ones that
need a real process (signals, what a user's terminal shows) run it as a subprocess.
"""
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, TINY_RUN, assert_bit_identical, assert_one_error_line, call, corpus_text

from cllm_cli.cli.train import main

TINY = TINY_RUN


def cli(capsys, *argv):
    """train_model's main(argv) in-process: (exit status, stdout, stderr)."""
    return call(capsys, main, *argv)


def snapshot(directory):
    """{name: bytes} of every file in a directory (to show nothing was damaged)."""
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --- bad input files ------------------------------------------------------------------------

def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    code, _, err = cli(capsys, missing, "--checkpoint-dir", tmp_path / "ck", *TINY)
    assert_one_error_line(code, err, "train_model", "no-such-corpus.txt")


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, _, err = cli(capsys, empty, "--checkpoint-dir", tmp_path / "ck", *TINY)
    assert_one_error_line(code, err, "train_model", "empty")


def test_whitespace_only_file(tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n\t \n")
    code, _, err = cli(capsys, blank, "--checkpoint-dir", tmp_path / "ck", *TINY)
    assert_one_error_line(code, err, "train_model")


def test_directory_without_txt_files(tmp_path, capsys):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "notes.md").write_text(corpus_text(50))
    (d / "sub").mkdir()
    code, _, err = cli(capsys, d, "--checkpoint-dir", tmp_path / "ck", *TINY)
    assert_one_error_line(code, err, "train_model", "texts")


def test_binary_file(tmp_path, capsys):
    data = corpus_text(60).encode()
    offset = 1234
    binary = tmp_path / "image.txt"
    binary.write_bytes(data[:offset] + b"\x00\x01\x02" + data[offset:])
    code, _, err = cli(capsys, binary, "--checkpoint-dir", tmp_path / "ck", *TINY)
    line = assert_one_error_line(code, err, "train_model", "image.txt", offset)
    assert "text" in line.lower() or "nul" in line.lower()


def non_utf8(tmp_path, offset=2345):
    data = corpus_text(120).encode()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(data[:offset] + "café".encode("latin-1") + data[offset:])
    return bad, offset + 3       # the byte after "caf"


def test_non_utf8_file_names_the_byte_offset(tmp_path, capsys):
    bad, offset = non_utf8(tmp_path)
    code, _, err = cli(capsys, bad, "--checkpoint-dir", tmp_path / "ck", *TINY)
    line = assert_one_error_line(code, err, "train_model", "latin1.txt", offset)
    assert "utf-8" in line.lower()
    assert not (tmp_path / "ck" / "dataset.bin").exists()


def test_encoding_errors_replace_accepts_non_utf8(tmp_path, capsys):
    bad, _ = non_utf8(tmp_path)
    code, out, err = cli(capsys, bad, "--checkpoint-dir", tmp_path / "ck", *TINY,
                         "--encoding-errors", "replace")
    assert code == 0, err
    assert (tmp_path / "ck" / "final_model.cllm").is_file()


def test_corpus_shorter_than_one_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words here.\n")
    code, _, err = cli(capsys, short, "--checkpoint-dir", tmp_path / "ck", *TINY)
    assert_one_error_line(code, err, "train_model", "seq-len")


# --- impossible option values -------------------------------------------------------------------

def with_option(option, value):
    """TINY with one option replaced (or added)."""
    argv = list(TINY)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


@pytest.mark.parametrize("option,value,names", [
    ("--threads", "0", "--threads"),
    ("--threads", "-1", "--threads"),
    ("--batch-size", "0", "--batch-size"),
    ("--micro-batch", "0", "--micro-batch"),
    ("--embed-dim", "15", "--num-heads"),
    ("--learning-rate", "0", "--learning-rate"),
    ("--learning-rate", "nan", "--learning-rate"),
    ("--val-fraction", "1.5", "--val-fraction"),
    ("--val-fraction", "-0.1", "--val-fraction"),
    ("--seq-len", "0", "--seq-len"),
    ("--vocab-size", "3", "--vocab-size"),
    ("--threads", "100000", "from 1 to 1024"),
    ("--learning-rate", "1e30", "--learning-rate must be a positive number of at most 100"),
    ("--batch-size", "200000000", "fewer than 2**31 tokens"),
    ("--embed-dim", "1000000000", "too large for the default --ff-dim"),
])
def test_impossible_option_values(corpus, ckpt_dir, capsys, option, value, names):
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ckpt_dir,
                       *with_option(option, value))
    assert_one_error_line(code, err, "train_model", names)
    assert not ckpt_dir.exists()


@pytest.mark.parametrize("option, value, names", [
    ("max_steps", 2.5, "--max-steps must be an integer, got 2.5"),
    ("micro_batch", 2.5, "--micro-batch must be an integer"),
    ("batch_size", 8.0, "--batch-size must be an integer"),
    ("threads", 2.0, "--threads must be an integer"),
    ("seed", True, "--seed must be an integer"),
    ("learning_rate", "0.1", "--learning-rate must be a number"),
    ("grad_clip", None, None),
    ("dropout", "0.1", "--dropout must be a number"),
    ("quiet", "no", "--quiet must be true or false"),
    ("metrics_file", 3, "--metrics-file must be a string"),
])
def test_train_refuses_keywords_of_the_wrong_type(corpus, ckpt_dir, option, value, names):
    """train()'s keywords are TrainConfig's types: a float step count (which ran 3 steps for
    2.5), a bool seed, a string number are refused with the UsageError naming the option
    before anything is written, not taken as another value or failed on deep inside."""
    from cllm_cli.errors import UsageError
    from cllm_cli.training import train
    options = dict(checkpoint_dir=str(ckpt_dir), tokenizer="word", vocab_size=120, embed_dim=16,
                   num_layers=2, num_heads=2, seq_len=16, batch_size=8, micro_batch=2,
                   max_steps=2, threads=2, quiet=True)
    options[option] = value
    if names is None:           # None is the default of an option with none only
        names = f"--{option.replace('_', '-')} must be a number, got None"
    with pytest.raises(UsageError, match=re.escape(names)):
        train([str(corpus)], **options)
    assert not ckpt_dir.exists()


def test_train_takes_none_where_an_option_means_none(corpus, ckpt_dir):
    from cllm_cli.training import train
    result = train([str(corpus)], checkpoint_dir=str(ckpt_dir), tokenizer="word", vocab_size=120,
                   embed_dim=16, num_layers=2, num_heads=2, seq_len=16, batch_size=8,
                   micro_batch=2, max_steps=1, threads=2, quiet=True, metrics_file=None,
                   tensorboard=None, eval_tokens=None)
    assert result["step"] == 1 and not (ckpt_dir / "metrics.jsonl").exists()


def test_an_empty_data_path_is_refused(corpus, tmp_path, capsys, monkeypatch):
    """DATA "" (a shell variable that is not set, "$CORPUS") names no file: it is refused,
    not read as the current directory, whose every *.txt was trained on."""
    monkeypatch.chdir(corpus.parent)
    ckpt_dir = tmp_path / "ck"
    code, _, err = cli(capsys, "", "--checkpoint-dir", ckpt_dir, *TINY)
    assert_one_error_line(code, err, "train_model", "empty path")
    assert not ckpt_dir.exists()


@pytest.mark.parametrize("argv", [["--no-such-option"], ["--threads", "two"],
                                  ["--tokenizer", "bpe"]])
def test_argparse_errors_exit_2(corpus, ckpt_dir, capsys, argv):
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ckpt_dir, *TINY, *argv)
    assert code == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("train_model: error:"), err


def test_unwritable_checkpoint_directory(corpus, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("a regular file\n")
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", afile / "ckpt", *TINY)
    assert_one_error_line(code, err, "train_model", "afile")
    assert afile.read_text() == "a regular file\n"


# --- --resume ---------------------------------------------------------------------------------

def test_resume_without_checkpoint(corpus, ckpt_dir, capsys):
    ck = ckpt_dir
    ck.mkdir()
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ck, *TINY, "--resume")
    assert_one_error_line(code, err, "train_model", "resume")


def test_resume_with_truncated_newest_checkpoint(corpus, trained, capsys):
    newest = trained / "checkpoint_step_4.cllm"
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])
    before = snapshot(trained)
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--resume")
    assert_one_error_line(code, err, "train_model", "checkpoint_step_4.cllm")
    assert snapshot(trained) == before, "a refused resume changed the checkpoint directory"


def test_resume_after_corpus_changed(corpus, trained, capsys):
    original = corpus.read_bytes()
    ckpts = {k: v for k, v in snapshot(trained).items() if k.endswith(".cllm")}
    corpus.write_bytes(original + b"An extra sentence about the river.\n")
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--resume")
    assert_one_error_line(code, err, "train_model", "corpus")
    after = {k: v for k, v in snapshot(trained).items() if k.endswith(".cllm")}
    assert after == ckpts
    # with the original corpus back, the same directory resumes fine
    corpus.write_bytes(original)
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--resume")
    assert code == 0, err


def test_checkpoint_directory_inside_the_data_directory(tmp_path, capsys):
    """A directory input never includes the checkpoint directory (its vocab.txt would
    otherwise become part of the corpus, and --resume would see a changed corpus)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_text(corpus_text(120))
    ck = data / "ck"
    code, _, err = cli(capsys, data, "--checkpoint-dir", ck, *TINY, "--save-interval", "2",
                       "--max-steps", "4")
    assert code == 0, err
    assert (ck / "vocab.txt").is_file()
    code, out, err = cli(capsys, data, "--checkpoint-dir", ck,
                         *[a for a in TINY if a != "--quiet"], "--resume")
    assert code == 0, err
    assert "corpus: 1 file, " in out, out


# --- metrics file -----------------------------------------------------------------------------

def test_a_metrics_fifo_is_written_only_while_a_process_reads_it(corpus, tmp_path, capsys):
    """A FIFO nothing reads is refused before the corpus is read (opening it would wait for a
    reader, and no stop signal ends that wait); one that a process reads gets the records."""
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", tmp_path / "ck", *TINY,
                       "--metrics-file", fifo)
    assert_one_error_line(code, err, "train_model", str(fifo), "no process reads")
    assert not (tmp_path / "ck").exists()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)      # the reader, started first
    try:
        code, _, err = cli(capsys, corpus, "--checkpoint-dir", tmp_path / "ck", *TINY,
                           "--metrics-file", fifo)
        assert code == 0, err
        received = b""
        while chunk := os.read(reader, 1 << 16):
            received += chunk
    finally:
        os.close(reader)
    rows = [json.loads(line) for line in received.decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_validation_share_too_small_for_one_window_is_said(corpus, tmp_path, capsys):
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", tmp_path / "ck",
                       *with_option("--val-fraction", "0.0002"))
    assert code == 0, err
    assert err.splitlines() == ["train_model: warning: --val-fraction 0.0002 holds out no whole "
                                "window of this corpus: the run has no validation loss; raise it "
                                "(or give 0 to say so)"]
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", tmp_path / "ck0",
                       *with_option("--val-fraction", "0"))
    assert code == 0 and err == "", err


def test_resume_appends_after_a_metrics_record_cut_mid_write(corpus, tmp_path, capsys):
    """A run stopped while writing a record (a full disk, kill -9) leaves it without its
    newline: the resumed run drops that piece, so that every line stays one record."""
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ck, *with_option("--max-steps", "2"),
                       "--metrics-file", metrics)
    assert code == 0, err
    with open(metrics, "a") as f:
        f.write('{"step": 3, "epoch": 1, "lo')
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ck, *TINY, "--resume",
                       "--metrics-file", metrics)
    assert code == 0, err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("where, fragment", [
    ("no-dir/m.jsonl", "its directory {tmp}/no-dir does not exist"),
    ("a-dir", "it is a directory"),
    ("notes.txt/m.jsonl", "{tmp}/notes.txt is not a directory"),
    ("ck", "it is a directory (the --checkpoint-dir)"),      # which the run is to create
])
def test_a_metrics_file_that_cannot_be_written_is_refused_before_the_corpus_is_read(
        corpus, tmp_path, capsys, where, fragment):
    """Refused with one line before tokenizing, so the run leaves nothing behind: no
    checkpoint directory (the run would have created it), no dataset.bin."""
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a directory\n")
    ck = tmp_path / "ck"
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ck,
                       "--metrics-file", tmp_path / where)
    assert_one_error_line(code, err, "train_model", f"cannot write --metrics-file {tmp_path / where}",
                          fragment.format(tmp=tmp_path))
    assert not ck.exists()


def test_tensorboard_and_metrics_file_at_one_path_are_refused_before_the_corpus_is_read(
        corpus, tmp_path, capsys):
    ck, both = tmp_path / "ck", tmp_path / "out"
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ck, "--metrics-file", both,
                       "--tensorboard", both)
    assert_one_error_line(code, err, "train_model", f"--tensorboard {both} is the --metrics-file")
    assert not ck.exists() and not both.exists()


def test_metrics_file_keys(corpus, tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", tmp_path / "ck",
                       *with_option("--eval-interval", "2"), "--metrics-file", metrics)
    assert code == 0, err
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(steps) + len(evals) == len(rows)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert set(r) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}, r
        assert r["epoch"] >= 1
        assert all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for k in r)
        assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r) == {"step", "val_loss", "val_ppl", "val_bpb"}, r
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)


# --- a real process -----------------------------------------------------------------------------

def real_process(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def test_real_process_bad_input_is_one_line(tmp_path):
    """What a user sees: `python -m cllm_cli.cli.train` on a missing file prints one line."""
    p = real_process(tmp_path / "missing.txt", "--checkpoint-dir", tmp_path / "ck", *TINY)
    assert_one_error_line(p.returncode, p.stderr, "train_model", "missing.txt")


def test_console_script_entry_bad_input_is_one_line(tmp_path):
    """Every installed command is cllm_launch's function of its name, which calls the main()
    of its cllm_cli.cli module; train_model exits with main's value."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts and all(target == f"cllm_launch:{name}" for name, target in scripts.items())
    code = "import sys, cllm_launch; sys.exit(cllm_launch.train_model())"
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.txt"),
                        "--threads", "0"], cwd=ROOT, capture_output=True, text=True)
    assert_one_error_line(p.returncode, p.stderr, "train_model")


# a command module that takes Ctrl-C while it loads (as one may, in the few tenths of a second
# numpy, scipy and the engine take), and once more when its main() runs
SLOW_TO_LOAD = """import os, signal
os.kill(os.getpid(), signal.SIGINT)
print("loaded", flush=True)

def main():
    os.kill(os.getpid(), signal.SIGINT)
    return 0
"""


def test_ctrl_c_while_a_command_loads_ends_it_quietly(tmp_path):
    """Ctrl-C before the command's module is loaded: the process ends at once as the signal
    ends it (status 130 in a shell), with no traceback; in main() Ctrl-C is Python's
    KeyboardInterrupt again, for the command's own handling."""
    (tmp_path / "slow_to_load.py").write_text(SLOW_TO_LOAD)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cllm_launch; "
            "cllm_launch._command('slow_to_load')")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (-signal.SIGINT, "", "")
    (tmp_path / "slow_to_load.py").write_text(SLOW_TO_LOAD.replace(
        'os.kill(os.getpid(), signal.SIGINT)\nprint', 'print', 1))
    p = subprocess.run([sys.executable, "-c", code + "()", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.stdout == "loaded\n" and p.stderr.rstrip().endswith("KeyboardInterrupt")


# Steps of ~0.3 s (longer than the 0.1 s the main thread waits on the spheres between checks
# for Ctrl-C), so the SIGINT lands inside a step and the abort path is the one tested.
BIG_STEPS = 14
BIG = ["--embed-dim", "96", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32",
       "--batch-size", "384", "--micro-batch", "4", "--max-steps", str(BIG_STEPS),
       "--warmup-steps", "3", "--tokenizer", "word", "--vocab-size", "120", "--eval-interval", "0", "--log-interval", "1",
       "--seed", "5"]


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_matches_a_straight_run(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(2400), encoding="utf-8")
    straight_dir, ck = tmp_path / "straight", tmp_path / "ck"
    metrics = tmp_path / "m.jsonl"
    base = [sys.executable, "-m", "cllm_cli.cli.train", str(corpus), *BIG]
    # the straight run goes on alongside the interrupted one
    straight = subprocess.Popen(base + ["--checkpoint-dir", str(straight_dir), "--threads", "1",
                                        "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen(base + ["--checkpoint-dir", str(ck), "--threads", "2",
                                   "--metrics-file", str(metrics)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait for the first progress line: training has started (the SIGINT handler is set)
        # and the next step is under way, so the SIGINT lands inside it
        seen = []
        for line in run.stdout:
            seen.append(line)
            if line.startswith("step "):
                break
        assert run.poll() is None, f"the run ended before it could be interrupted:\n{''.join(seen)}"
        first = int(re.match(r"step (\d+)", line).group(1))       # steps done before the signal
        run.send_signal(signal.SIGINT)
        out, err = run.communicate()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, f"exit status {run.returncode}\n{err}"
    assert "Traceback" not in err, err
    assert "interrupted" in err
    saved = sorted(ck.glob("checkpoint_step_*.cllm"))
    assert len(saved) == 1, saved
    n = int(saved[0].stem.rsplit("_", 1)[1])
    assert first <= n < BIG_STEPS, (first, n)
    assert f"step {n}" in out and str(saved[0].name) in out, out[-500:]
    assert not (ck / "final_model.cllm").exists()
    # resume (in-process, another thread count) to the end
    code, _, err = cli(capsys, corpus, *BIG, "--checkpoint-dir", ck, "--threads", "3",
                       "--resume", "--quiet", "--metrics-file", metrics)
    assert code == 0, err
    assert (ck / "final_model.cllm").is_file()
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, BIG_STEPS + 1)), "metrics of the two parts should cover every step once"
    assert straight.wait() == 0, straight.stderr.read()
    straight.stderr.close()
    assert_bit_identical(straight_dir / "final_model.cllm", ck / "final_model.cllm")
    last = f"checkpoint_step_{BIG_STEPS}.cllm"
    assert_bit_identical(straight_dir / last, ck / last)


def test_plot_option_draws_the_losses(corpus, tmp_path, capsys):
    assert importlib.util.find_spec("matplotlib"), "matplotlib: make installs it"
    png = tmp_path / "loss.png"
    code, out, err = cli(capsys, corpus, "--checkpoint-dir", tmp_path / "ck", *TINY,
                         "--eval-interval", "2", "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "ck" / "metrics.jsonl").exists()    # the default metrics file
    assert f"loss plot: {png}" in out


# --- an earlier run in the checkpoint directory ------------------------------------------------

def test_new_run_refuses_a_directory_holding_an_earlier_run(corpus, trained, capsys):
    before = snapshot(trained)
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--seed", "7")
    assert_one_error_line(code, err, "train_model", "--resume", "--overwrite")
    assert snapshot(trained) == before


@pytest.mark.parametrize("refused, fragment", [
    ("empty", "corpus is empty"),
    ("short", "corpus too short"),           # tokenized (a new vocab.txt) before it is refused
])
def test_overwrite_refused_during_set_up_keeps_the_earlier_run(corpus, trained, tmp_path,
                                                                 capsys, refused, fragment):
    """--overwrite with a corpus that set-up then refuses: the earlier run (checkpoints, final
    model and the vocabulary and dataset they need) is left as it was, and still resumes."""
    other = tmp_path / "other.txt"
    other.write_text("" if refused == "empty" else "A few other words here.\n" * 2)
    before = snapshot(trained)
    code, _, err = cli(capsys, other, "--checkpoint-dir", trained, *TINY, "--overwrite")
    assert_one_error_line(code, err, "train_model", fragment)
    assert snapshot(trained) == before
    argv = [*TINY, "--resume"]
    argv[argv.index("--max-steps") + 1] = "5"
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *argv)
    assert code == 0, err


@pytest.mark.parametrize("resume", [[], ["auto"]])
def test_resume_with_overwrite_is_refused(corpus, trained, capsys, resume):
    """--resume keeps the run, --overwrite deletes it: together they are refused, the run
    left as it was."""
    before = snapshot(trained)
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--resume", *resume,
                       "--overwrite")
    assert_one_error_line(code, err, "train_model", "--resume", "--overwrite")
    assert snapshot(trained) == before


def test_chat_template_on_plain_text_is_refused(corpus, tmp_path, capsys):
    """A template renders .jsonl messages; given with plain text it would do nothing."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    run = tmp_path / "run"
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", run, *TINY, "--chat-template", template)
    assert_one_error_line(code, err, "train_model", "--chat-template", "plain text")
    assert not run.exists()


def test_overwrite_starts_over(corpus, trained, tmp_path, capsys):
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--seed", "7",
                       "--max-steps", "3", "--overwrite")
    assert code == 0, err
    names = sorted(p.name for p in trained.glob("*.cllm"))
    assert names == ["checkpoint_step_3.cllm", "final_model.cllm"]    # nothing of the old run
    fresh = tmp_path / "fresh"
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", fresh, *TINY, "--seed", "7",
                       "--max-steps", "3")
    assert code == 0, err
    assert_bit_identical(trained / "final_model.cllm", fresh / "final_model.cllm")


def test_resume_of_a_finished_run_changes_nothing(corpus, trained, capsys):
    before = snapshot(trained)
    code, out, err = cli(capsys, corpus, "--checkpoint-dir", trained, *TINY, "--resume")
    assert code == 0, err
    assert "already complete" in out
    assert snapshot(trained) == before


# --- runtime failures -------------------------------------------------------------------------

def test_unwritable_metrics_file_warns_once_and_training_goes_on(corpus, ckpt_dir, capsys):
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ckpt_dir, *TINY,
                       "--metrics-file", "/dev/full")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "metrics" in lines[0] and "Traceback" not in err
    assert (ckpt_dir / "final_model.cllm").is_file()


def test_checkpoint_write_failure_is_a_runtime_error(corpus, ckpt_dir, capsys, monkeypatch):
    import cllm_cli.formats.checkpoint as checkpoint

    def fail(*args, **kwargs):
        raise checkpoint.CheckpointError("cannot write checkpoint x: No space left on device")

    monkeypatch.setattr("cllm_cli.training.trainer.save_checkpoint", fail)
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ckpt_dir, *TINY)
    assert_one_error_line(code, err, "train_model", "No space left", status=1)


@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--batch-size", "99999999999"),
                                           ("--micro-batch", "99999999999")])
def test_out_of_range_numbers(corpus, ckpt_dir, capsys, option, value):
    code, _, err = cli(capsys, corpus, "--checkpoint-dir", ckpt_dir,
                       *with_option(option, value))
    assert_one_error_line(code, err, "train_model", option)


def test_skipped_step_is_null_in_the_metrics(corpus, tmp_path, capsys):
    from cllm_cli import _engine_testing
    from cllm_cli.training.loop import train
    metrics = tmp_path / "m.jsonl"
    # one micro-batch per step: poisoning it leaves the step with nothing valid
    train([str(corpus)], engine_class=_engine_testing.Engine,
          engine_hook=lambda e: _engine_testing.inject_nan(e, 1, 0),
          checkpoint_dir=str(tmp_path / "ck"), embed_dim=16, num_layers=1, num_heads=2,
          seq_len=16, batch_size=4, micro_batch=4, max_steps=3, metrics_file=str(metrics),
          eval_interval=0, threads=2, quiet=True)
    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    rows = [json.loads(line, parse_constant=no_nan) for line in metrics.read_text().splitlines()]
    assert rows[1]["step"] == 2 and rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert rows[0]["loss"] is not None and rows[2]["loss"] is not None


def test_sample_prompt_with_unknown_words_warns_and_samples(corpus, ckpt_dir, capsys):
    code, out, err = cli(capsys, corpus, "--checkpoint-dir", ckpt_dir,
                         *[a for a in TINY if a != "--quiet"], "--sample-every", "2",
                         "--prompt", "the zzyzxq river")
    assert code == 0, err
    assert "'zzyzxq'" in err and len(err.strip().splitlines()) == 1
    samples = [line for line in out.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 2 and all("<unk>" in line for line in samples)
