"""Faults at the command line, each as a user meets it: help, a reader that goes away, a
resumed run shortened below its step, a damaged dataset.bin on --resume, and stop signals to
cllm_eval. Real processes where the fault is a process's (pipes, signals)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from helpers import ROOT, assert_one_error_line, sentences, write

from cllm_cli.cli.train import main as train_main

TINY = ["--tokenizer", "word", "--vocab-size", "200", "--embed-dim", "16", "--num-layers", "1",
        "--num-heads", "2", "--seq-len", "16", "--batch-size", "4", "--threads", "1", "--quiet"]


def bin_of(name):
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 6-step run on a small corpus, with a step checkpoint every 3 steps."""
    base = tmp_path_factory.mktemp("tiny")
    corpus = write(base / "corpus.txt", sentences(400, 5, ".!?"))
    ckpt = base / "run"
    assert train_main([str(corpus), *TINY, "--max-steps", "6", "--save-interval", "3",
                       "--checkpoint-dir", str(ckpt)]) == 0
    return corpus, ckpt


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_model_help_shows_every_group_and_default(flag):
    p = subprocess.run([bin_of("train_model"), flag], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    text = " ".join(p.stdout.split())
    assert text.startswith("usage: train_model")
    for group in ("data:", "model:", "optimisation:", "threads:", "checkpoints:", "output:"):
        assert group in text
    assert "--learning-rate LEARNING_RATE peak learning rate (at most 100) (default: 0.001)" in text
    assert ("--vocab-size VOCAB_SIZE largest vocabulary, the 4 special ids included; for bpe 260 "
            "to 1,000,000 (the tokenizers library reserves memory in proportion to it and aborts "
            "when that fails) (default: 10000)") in text


def test_help_options_given_still_tell_resume_what_changed(tiny_run, tmp_path):
    """Parsing twice (once for help and errors, once for what was given) keeps --resume's
    view: an option left out is taken from the checkpoint, not from the default."""
    from cllm_cli.cli.train import parse_args
    data, given = parse_args(["x.txt", "--resume", "--max-steps", "9"])
    assert data == ["x.txt"] and given == {"resume": True, "max_steps": 9}


def test_tokenize_into_a_pipe_closed_early_is_status_1(tiny_run, tmp_path):
    """One long line of ids, of which the reader takes 5 bytes: the output is lost although
    the write into the pipe went through."""
    _, ckpt = tiny_run
    big = write(tmp_path / "big.txt", sentences(8000, 3, ".!?"))
    p = subprocess.run(f"{bin_of('cllm_tokenize')} {big} --vocab {ckpt / 'vocab.txt'} | head -c 5",
                       shell=True, capture_output=True, text=True, executable="/bin/bash",
                       env=dict(os.environ, SHELLOPTS="pipefail"))
    assert p.returncode == 1, p.stderr
    assert p.stderr == ""            # a reader that went away is not an error to report


def test_tokenize_into_a_pipe_read_to_the_end_is_status_0(tiny_run):
    corpus, ckpt = tiny_run
    p = subprocess.run(f"{bin_of('cllm_tokenize')} {corpus} --vocab {ckpt / 'vocab.txt'} | cat",
                       shell=True, capture_output=True, text=True,
                       executable="/bin/bash", env=dict(os.environ, SHELLOPTS="pipefail"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0].isdigit()


def copy_of_run(ckpt, run, checkpoint):
    """A run directory holding the run's vocabulary, dataset and one step checkpoint."""
    os.makedirs(run)
    for name in ("vocab.txt", "dataset.bin", checkpoint):
        (run / name).write_bytes((ckpt / name).read_bytes())
    return run


def test_resume_with_max_steps_below_the_checkpoint_is_refused(tiny_run, tmp_path, capsys):
    corpus, ckpt = tiny_run
    run = copy_of_run(ckpt, tmp_path / "run", "checkpoint_step_6.cllm")
    code = train_main([str(corpus), "--resume", "--max-steps", "4", "--checkpoint-dir", str(run)])
    err = capsys.readouterr().err
    assert_one_error_line(code, err, "train_model", "step 6", "4 steps")
    assert not (run / "final_model.cllm").exists()


def test_damaged_dataset_bin_on_resume_says_it_was_rebuilt(tiny_run, tmp_path, capsys):
    corpus, ckpt = tiny_run
    run = copy_of_run(ckpt, tmp_path / "run", "checkpoint_step_3.cllm")
    data = bytearray((run / "dataset.bin").read_bytes())
    data[-3] ^= 0xFF                 # a flipped token id: the stream's checksum no longer holds
    (run / "dataset.bin").write_bytes(bytes(data))
    code = train_main([str(corpus), "--resume", "--checkpoint-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if "dataset.bin was rebuilt" in line]
    assert len(lines) == 1 and lines[0].startswith("train_model: warning: "), err
    assert (run / "final_model.cllm").read_bytes() == (ckpt / "final_model.cllm").read_bytes()


def spheres_started(pid, threads):
    """True once the process runs more threads than its own: the engine's spheres."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > threads
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_cllm_eval_interrupted_says_so(tiny_run, tmp_path, signum):
    corpus, ckpt = tiny_run
    text = write(tmp_path / "long.txt", sentences(200_000, 9, ".!?"))
    p = subprocess.Popen([bin_of("cllm_eval"), str(ckpt / "final_model.cllm"), str(text),
                          "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    while not spheres_started(p.pid, 2) and p.poll() is None:
        time.sleep(0.01)             # polls the process's state, nothing is timed
    p.send_signal(signum)
    out, err = p.communicate()
    assert p.returncode == 128 + signum, err
    assert err.strip() == f"cllm_eval: interrupted by {signal.Signals(signum).name}"


# --- outputs that must not be replaced ------------------------------------------------------

METRICS = "".join(f'{{"step": {s}, "loss": {5 - s / 10}}}\n' for s in range(1, 7)) + \
    '{"step": 6, "val_loss": 4.5}\n'


def test_a_fifo_or_device_at_an_output_is_never_replaced(tmp_path, capsys):
    """cllm_export --force to a GGUF OUT and cllm_plot -o that is a FIFO (or /dev/null): one
    line, the FIFO left as it is (the atomic rename once put a regular file in its place,
    which for root's /dev/null broke every program that writes there)."""
    from helpers import call, gpt2_directory

    from cllm_cli.cli.export import main as export_main
    from cllm_cli.cli.plot import main as plot_main
    src = gpt2_directory(tmp_path / "src", sentences(200, 3, ".,"))
    capsys.readouterr()
    fifo = tmp_path / "out.gguf"
    os.mkfifo(fifo)
    code, out, err = call(capsys, export_main, src, fifo, "--force")
    assert_one_error_line(code, err, "cllm_export", str(fifo), "a FIFO", "never replaces")
    metrics = write(tmp_path / "metrics.jsonl", METRICS)
    plot_fifo = tmp_path / "loss.png"
    os.mkfifo(plot_fifo)
    code, out, err = call(capsys, plot_main, metrics, "-o", plot_fifo)
    assert_one_error_line(code, err, "cllm_plot", str(plot_fifo), "a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISFIFO(os.lstat(plot_fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl",
                                                          "out.gguf", "src"]


def test_a_plot_replaces_only_an_earlier_plot(tiny_run, tmp_path, capsys):
    """cllm_plot -o and train_model --plot at an existing file that is not a PNG (a model, the
    metrics) refuse in one line and leave it as it was (they once wrote the PNG over it:
    --plot RUN/final_model.cllm replaced the model just trained); an earlier plot is replaced.
    train_model refuses a --plot it cannot write before training, not after it."""
    from helpers import call

    from cllm_cli.cli.plot import main as plot_main
    corpus, ckpt = tiny_run
    metrics = write(tmp_path / "metrics.jsonl", METRICS)
    model = tmp_path / "model.cllm"
    model.write_bytes((ckpt / "final_model.cllm").read_bytes())
    code, out, err = call(capsys, plot_main, metrics, "-o", model)
    assert_one_error_line(code, err, "cllm_plot", str(model), "ending in .png")
    fake = write(tmp_path / "notes.png", "not an image")
    code, out, err = call(capsys, plot_main, metrics, "-o", fake)
    assert_one_error_line(code, err, "cllm_plot", str(fake), "not a PNG image")
    assert fake.read_text() == "not an image"
    png = tmp_path / "loss.png"
    for _ in range(2):
        code, out, err = call(capsys, plot_main, metrics, "-o", png)
        assert code == 0 and err == "", err
    assert png.read_bytes().startswith(b"\x89PNG")

    # a new run's own final model does not exist yet: refused by its name
    for plot, fragment in [(model, "ending in .png"), (fake, "not a PNG image"),
                           (tmp_path / "run" / "final_model.cllm", "ending in .png"),
                           (tmp_path, "it is a directory"),
                           (tmp_path / "run" / "metrics.jsonl", "the metrics file itself"),
                           (tmp_path / "none" / "loss.png", "does not exist")]:
        code, out, err = call(capsys, train_main, corpus, *TINY, "--max-steps", "2",
                              "--checkpoint-dir", tmp_path / "run", "--plot", plot)
        assert_one_error_line(code, err, "train_model", f"--plot {plot}", fragment)
        assert not (tmp_path / "run").exists()
    assert model.read_bytes() == (ckpt / "final_model.cllm").read_bytes()


def test_a_metrics_file_replaces_only_earlier_metrics(tiny_run, tmp_path, capsys):
    """--metrics-file at an existing file that train_model did not write (the corpus itself, a
    model) is refused in one line before anything is read, and the file is left as it was (a
    new run once truncated it, a resumed one appended JSON lines to the model); an earlier
    run's metrics, or an empty file, are written as before."""
    from helpers import call
    corpus, ckpt = tiny_run
    copy = write(tmp_path / "corpus.txt", corpus.read_text(encoding="utf-8"))
    code, out, err = call(capsys, train_main, copy, *TINY, "--max-steps", "2",
                          "--checkpoint-dir", tmp_path / "run", "--metrics-file", copy)
    assert_one_error_line(code, err, "train_model", f"--metrics-file {copy}", "not a metrics file")
    assert copy.read_text(encoding="utf-8") == corpus.read_text(encoding="utf-8")
    assert not (tmp_path / "run").exists()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for path in ckpt.iterdir():
        if not path.name.startswith("."):
            (resumed / path.name).write_bytes(path.read_bytes())
    model = resumed / "final_model.cllm"
    before = model.read_bytes()
    code, out, err = call(capsys, train_main, corpus, *TINY, "--max-steps", "8", "--resume",
                          "--checkpoint-dir", resumed, "--metrics-file", model)
    assert_one_error_line(code, err, "train_model", "not a metrics file")
    assert model.read_bytes() == before

    for name, content in [("earlier.jsonl", METRICS), ("empty.jsonl", "")]:
        metrics = write(tmp_path / name, content)
        code, out, err = call(capsys, train_main, corpus, *TINY, "--max-steps", "2",
                              "--checkpoint-dir", tmp_path / name.replace(".", "_"),
                              "--metrics-file", metrics)
        assert code == 0, err
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert steps == [1, 2, 2], steps


@pytest.mark.parametrize("name", ["dataset.bin", "vocab.txt", "final_model.cllm",
                                  "checkpoint_step_2.cllm", ".lock"])
def test_a_metrics_file_is_never_one_of_the_runs_own_files(tiny_run, tmp_path, capsys, name):
    """--metrics-file naming a file the run itself writes in --checkpoint-dir, before it
    exists, is refused in one line before anything is read: the metrics once replaced the
    tokenizer (the run directory no longer loaded), truncated the mapped dataset.bin (the run
    died of SIGBUS), or were replaced by the model."""
    from helpers import call
    corpus, _ = tiny_run
    run = tmp_path / "run"
    code, out, err = call(capsys, train_main, corpus, *TINY, "--max-steps", "2",
                          "--checkpoint-dir", run, "--metrics-file", run / name)
    assert_one_error_line(code, err, "train_model", f"--metrics-file {run / name}",
                          "the run writes")
    assert not run.exists()
