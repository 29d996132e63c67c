"""What train_model does under faults: stop signals, a second run on the same
directory, leftovers of killed runs, a missing final model, options given with --resume,
crafted checkpoints, a diverged run, and lost standard output. Signals go to real processes."""
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TINY_RUN, assert_bit_identical, assert_one_error_line, call, corpus_text

from cllm_cli import _engine_testing
from cllm_cli.cli.train import main
from cllm_cli.errors import Interrupted
from cllm_cli.formats.checkpoint import save_checkpoint
from cllm_cli.formats.checkpoint_load import load_checkpoint
from cllm_cli.training.loop import train

TINY = TINY_RUN
# steps long enough (a few tenths of a second) for a signal to land inside the run
BIG_STEPS = 12
BIG = ["--embed-dim", "96", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32",
       "--batch-size", "384", "--micro-batch", "4", "--max-steps", str(BIG_STEPS),
       "--warmup-steps", "3", "--tokenizer", "word", "--vocab-size", "120", "--eval-interval", "0", "--log-interval",
       "1", "--seed", "5"]


def cli(capsys, *argv):
    return call(capsys, main, *argv)


def start(*argv, **kw):
    """train_model as a real process, stdout and stderr piped."""
    return subprocess.Popen([sys.executable, "-m", "cllm_cli.cli.train", *map(str, argv)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def wait_for_step(proc):
    """Reads stdout until the first progress line: training has started."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step "):
            return
    raise AssertionError(f"the run ended before training started:\n{''.join(seen)}\n"
                         f"{proc.stderr.read()}")


def finish(proc):
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, err


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def big_straight(tmp_path_factory):
    """The BIG run without interruption (1 thread): what every resumed run must equal."""
    d = tmp_path_factory.mktemp("straight")
    corpus = d / "corpus.txt"
    corpus.write_text(corpus_text(2400), encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", str(corpus), *BIG,
                        "--checkpoint-dir", str(d / "ck"), "--threads", "1", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return corpus, d / "ck"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_term_and_hup_save_and_resume_matches_a_straight_run(big_straight, ckpt_dir, capsys, sig):
    ck = ckpt_dir
    corpus, straight = big_straight
    run = start(corpus, *BIG, "--checkpoint-dir", ck, "--threads", "2")
    wait_for_step(run)
    run.send_signal(sig)
    out, err = finish(run)
    assert run.returncode == 128 + sig, f"exit status {run.returncode}\n{err}"
    assert "Traceback" not in err, err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    saved = sorted(ck.glob("checkpoint_step_*.cllm"))
    assert len(saved) == 1 and saved[0].name in out, (saved, out[-300:])
    assert leftovers(ck) == []
    code, _, err = cli(capsys, corpus, *BIG, "--checkpoint-dir", ck, "--threads", "1",
                       "--resume", "--quiet")
    assert code == 0, err
    assert_bit_identical(straight / "final_model.cllm", ck / "final_model.cllm")


def test_a_second_signal_keeps_the_first_ones_status(corpus, ckpt_dir, capsys):
    """SIGTERM (a scheduler's stop) and then Ctrl-C before the step ends: the run ends as
    SIGTERM asked (143), as every rank of a many-process run agrees on the first signal."""
    def stop_twice(engine):          # called once signals are deferred, before the first step
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stopped:
        train([str(corpus)], engine_hook=stop_twice, checkpoint_dir=str(ckpt_dir),
              max_steps=4, threads=1, quiet=True, embed_dim=16, num_layers=2, num_heads=2,
              seq_len=16, batch_size=8, micro_batch=2, tokenizer="word", vocab_size=120)
    assert stopped.value.signum == signal.SIGTERM
    assert "interrupted (SIGTERM): saved step 0" in capsys.readouterr().out


def test_a_stop_right_after_a_periodic_save_writes_the_step_once(corpus, ckpt_dir, capsys,
                                                                   monkeypatch):
    """SIGTERM while step 1's periodic checkpoint is written: the run stops with step 1 saved,
    written once (a second write of a big checkpoint would double the stop's time), and the
    run resumes from it to the straight run's end."""
    written = []

    def save_and_stop(path, *args, **kw):
        save_checkpoint(path, *args, **kw)
        written.append(os.path.basename(path))
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)     # deferred: the loop stops after this step

    monkeypatch.setattr("cllm_cli.training.trainer.save_checkpoint", save_and_stop)
    options = dict(checkpoint_dir=str(ckpt_dir), max_steps=3, save_interval=1, threads=1,
                   quiet=True, embed_dim=16, num_layers=2, num_heads=2, seq_len=16,
                   batch_size=8, micro_batch=2, tokenizer="word", vocab_size=120)
    with pytest.raises(Interrupted):
        train([str(corpus)], **options)
    assert written == ["checkpoint_step_1.cllm"]
    assert "interrupted (SIGTERM): saved step 1" in capsys.readouterr().out
    monkeypatch.undo()
    train([str(corpus)], resume=True, **options)
    straight = ckpt_dir.parent / "straight"
    train([str(corpus)], **{**options, "checkpoint_dir": str(straight)})
    assert_bit_identical(straight / "final_model.cllm", ckpt_dir / "final_model.cllm")


def test_signal_during_set_up_stops_cleanly(tmp_path):
    """SIGTERM while a large corpus is tokenized: exit 143 at once, one line, and the
    directory the run created is gone again (no temporary file, no partial stream)."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(corpus_text(4000) * 60, encoding="utf-8")        # ~20 MB: seconds to tokenize
    ck = tmp_path / "ck"
    run = start(corpus, *TINY, "--checkpoint-dir", ck)
    while not (ck / ".lock").exists():                          # set-up has reached the dir
        assert run.poll() is None, finish(run)
        time.sleep(0.01)                                        # between two looks at the dir
    run.send_signal(signal.SIGTERM)
    out, err = finish(run)
    assert run.returncode == 143, err
    assert err.strip() == "train_model: interrupted by SIGTERM", err
    assert not ck.exists()


def test_second_run_on_a_directory_is_refused_and_a_dead_holder_does_not_block(corpus, tmp_path,
                                                                                capsys):
    big = tmp_path / "big.txt"
    big.write_text(corpus_text(2400), encoding="utf-8")
    ck = tmp_path / "ck"
    first = start(big, *BIG, "--checkpoint-dir", ck, "--threads", "1")
    try:
        wait_for_step(first)
        before = sorted(p.name for p in ck.iterdir())
        code, _, err = cli(capsys, big, *BIG, "--checkpoint-dir", ck, "--resume")
        line = assert_one_error_line(code, err, "train_model", "in use by another run",
                                     f"pid {first.pid}")
        assert str(ck) in line
        assert sorted(p.name for p in ck.iterdir()) == before
    finally:
        first.kill()                        # SIGKILL: no chance to clean up or unlock
        finish(first)
    # the kernel released the dead process's lock: a new run may take the directory
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ck, "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_path_that_is_not_a_file_is_one_line(corpus, ckpt_dir, capsys, kind):
    """A .lock that is a directory (a script's own `mkdir .lock` mutex) or a FIFO: refused
    with one line naming it, the directory left as it was."""
    ckpt_dir.mkdir()
    lock = ckpt_dir / ".lock"
    lock.mkdir() if kind == "directory" else os.mkfifo(lock)
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ckpt_dir)
    assert_one_error_line(code, err, "train_model", str(lock), "not a regular file")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [".lock"]


def test_leftover_temporary_files_are_removed(corpus, ckpt_dir, capsys):
    ck = ckpt_dir
    ck.mkdir()
    (ck / ".checkpoint_step_3.cllm.0a1b2c.tmp").write_bytes(b"x" * 5000)
    (ck / ".dataset.ids.k3j2h1.tmp").write_bytes(b"y" * 3000)
    (ck / "notes.tmp").write_text("not ours: no leading dot")
    code, out, err = cli(capsys, corpus, *[a for a in TINY if a != "--quiet"],
                         "--checkpoint-dir", ck)
    assert code == 0, err
    assert "removed 2 temporary files" in out
    assert leftovers(ck) == ["notes.tmp"]


@pytest.fixture
def trained_every_step(train_tiny):
    """A finished 4-step run with a checkpoint after every step."""
    return train_tiny("--save-interval", "1")


def test_resume_finishes_a_run_whose_final_model_is_missing(corpus, trained_every_step, tmp_path, capsys):
    kept = tmp_path / "kept.cllm"
    os.replace(trained_every_step / "final_model.cllm", kept)       # as a kill during its write leaves it
    code, out, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", trained_every_step, "--resume")
    assert code == 0, err
    assert_bit_identical(kept, trained_every_step / "final_model.cllm")
    code, out, err = cli(capsys, corpus, *TINY[:-1], "--checkpoint-dir", trained_every_step, "--resume")
    assert code == 0 and "already complete" in out, out


def test_resume_replaces_a_final_model_of_an_earlier_step(corpus, trained_every_step, tmp_path,
                                                          capsys):
    """A finished run extended with --resume and stopped before its end keeps the final model
    of the shorter run; --resume with --max-steps at the checkpoint's step writes the final
    model of that step, not 'already complete'."""
    shorter = tmp_path / "shorter.cllm"
    shorter.write_bytes((trained_every_step / "final_model.cllm").read_bytes())
    argv = [*TINY, "--checkpoint-dir", trained_every_step, "--resume", "--save-interval", "1"]
    argv[argv.index("--max-steps") + 1] = "6"
    code, _, err = cli(capsys, corpus, *argv)
    assert code == 0, err
    os.replace(shorter, trained_every_step / "final_model.cllm")    # stopped before its end
    code, out, err = cli(capsys, corpus, *argv)
    assert code == 0, err
    assert "already complete" not in out, out
    assert_bit_identical(trained_every_step / "checkpoint_step_6.cllm",
                         trained_every_step / "final_model.cllm")


def test_resume_continues_from_the_final_model_when_no_step_checkpoint_is_left(
        corpus, trained_every_step, tmp_path, capsys):
    """final_model.cllm holds the run's whole state: with the step checkpoints deleted,
    --resume (and --resume auto, which a new run in the directory points to) continues from
    it as from the last step checkpoint."""
    cleaned = tmp_path / "cleaned"
    cleaned.mkdir()
    for name in ("final_model.cllm", "vocab.txt", "dataset.bin"):
        (cleaned / name).write_bytes((trained_every_step / name).read_bytes())
    argv = [*TINY, "--resume"]
    argv[argv.index("--max-steps") + 1] = "6"
    code, _, err = cli(capsys, corpus, *argv, "--checkpoint-dir", trained_every_step)
    assert code == 0, err
    code, _, err = cli(capsys, corpus, *argv, "auto", "--checkpoint-dir", cleaned)
    assert code == 0, err
    assert_bit_identical(trained_every_step / "final_model.cllm", cleaned / "final_model.cllm")


def test_resume_extends_a_finished_run_and_names_the_change(corpus, trained_every_step, capsys):
    argv = [a for a in TINY if a != "--quiet"]
    i = argv.index("--max-steps")
    argv[i + 1] = "7"
    code, out, err = cli(capsys, corpus, *argv, "--checkpoint-dir", trained_every_step, "--resume",
                         "--learning-rate", "5e-4")
    assert code == 0, err
    assert "changed: --learning-rate 0.001 -> 0.0005, --max-steps 4 -> 7" in out, out
    meta = load_checkpoint(trained_every_step / "final_model.cllm").meta
    assert meta["state"]["step"] == 7
    assert meta["train_config"]["max_steps"] == 7
    assert meta["train_config"]["learning_rate"] == 5e-4


@pytest.mark.parametrize("option, value", [("--embed-dim", "32"), ("--tokenizer", "char"),
                                           ("--seq-len", "8"), ("--batch-size", "4"),
                                           ("--seed", "99"), ("--arch", "llama")])
def test_resume_refuses_options_that_cannot_change(corpus, trained_every_step, capsys, option, value):
    """--arch llama too, which a GPT-2 run's checkpoint does not store (it holds the Llama
    form's settings only when the run has them)."""
    before = {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()}
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", trained_every_step, "--resume",
                       option, value)
    assert_one_error_line(code, err, "train_model", option, "cannot change when resuming")
    assert {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()} == before


def test_resume_accepts_a_restated_value_and_shows_an_empty_one(corpus, trained_every_step,
                                                                capsys):
    """--ff-dim 64 is what the checkpoint's 0 stands for (4 x embed-dim 16): accepted; a
    --tokenizer-file the run did not have is refused, the stored empty value shown as none."""
    before = {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()}
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", trained_every_step, "--resume",
                       "--tokenizer-file", "given.json")
    assert_one_error_line(code, err, "train_model", "--tokenizer-file cannot change when "
                          "resuming (the checkpoint has none, given given.json)")
    assert {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()} == before
    argv = [*TINY, "--checkpoint-dir", trained_every_step, "--resume", "--ff-dim", "64"]
    argv[argv.index("--max-steps") + 1] = "5"
    code, _, err = cli(capsys, corpus, *argv)
    assert code == 0, err


def test_resume_accepts_the_init_from_file_in_another_spelling(corpus, trained_every_step,
                                                               tmp_path, capsys):
    """The same --init-from file, named another way (relative, with ./ and ..), is no change:
    the run resumes, bit-identical to a straight run."""
    base = trained_every_step / "final_model.cllm"
    options = ["--seq-len", "16", "--batch-size", "8", "--micro-batch", "2", "--threads", "2",
               "--eval-interval", "0", "--warmup-steps", "1", "--quiet"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = cli(capsys, corpus, *options, "--init-from", base, "--max-steps", "3",
                       "--checkpoint-dir", straight)
    assert code == 0, err
    code, _, err = cli(capsys, corpus, *options, "--init-from", base, "--max-steps", "2",
                       "--checkpoint-dir", resumed)
    assert code == 0, err
    other_spelling = os.path.relpath(base.parent / ".." / base.parent.name / base.name)
    code, _, err = cli(capsys, corpus, *options, "--init-from", other_spelling, "--max-steps",
                       "3", "--checkpoint-dir", resumed, "--resume")
    assert code == 0, err
    assert_bit_identical(straight / "final_model.cllm", resumed / "final_model.cllm")


def test_a_given_option_that_clashes_with_a_stored_one_says_where_that_one_is(
        corpus, tmp_path, capsys):
    """--learning-rate 10 needs a --weight-decay below 1/10; the run's stored 0.5 is not: the
    line says that the value it names is the checkpoint's."""
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", tmp_path, "--weight-decay",
                       "0.5")
    assert code == 0, err
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", tmp_path, "--resume",
                       "--learning-rate", "10")
    assert_one_error_line(code, err, "train_model", "--weight-decay", "got 0.5",
                          "checkpoint_step_4.cllm")


def test_resume_refuses_epochs_that_would_not_act(corpus, trained_every_step, capsys):
    """The run's length is its --max-steps: a new --epochs alone would change nothing, and is
    refused rather than reported as a change; with --max-steps 0 it acts."""
    before = {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()}
    i = TINY.index("--max-steps")
    without_length = [*TINY[:i], *TINY[i + 2:]]
    code, _, err = cli(capsys, corpus, *without_length, "--checkpoint-dir", trained_every_step,
                       "--resume", "--epochs", "3")
    assert_one_error_line(code, err, "train_model", "--epochs", "--max-steps 4")
    assert {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()} == before
    code, _, err = cli(capsys, corpus, *without_length, "--checkpoint-dir", trained_every_step,
                       "--resume", "--epochs", "2", "--max-steps", "0")
    assert code == 0, err
    meta = load_checkpoint(trained_every_step / "final_model.cllm").meta
    assert meta["state"]["step"] > 4 and meta["train_config"]["epochs"] == 2


@pytest.mark.parametrize("option", [["--lora-rank", "2"], ["--lora-alpha", "4"]])
def test_resume_refuses_to_switch_lora_on(corpus, trained_every_step, capsys, option):
    before = {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()}
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", trained_every_step, "--resume",
                       *option)
    assert_one_error_line(code, err, "train_model", "LoRA cannot be switched on when resuming")
    assert {p.name: p.read_bytes() for p in trained_every_step.iterdir() if p.is_file()} == before


def files_in(directory):
    """{name: bytes} of every file in `directory` (hidden ones included), None when it does
    not exist."""
    if not directory.exists():
        return None
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("argv, fragment", [
    (["--resume"], "--resume: no checkpoint_step_<N>.cllm"),
    (["--resume", "auto", "--lora-rank", "2"], "--lora-rank needs --init-from"),
    (["--init-from", "NOTHING"], "NOTHING"),
    (["--tokenizer", "bpe", "--tokenizer-file", "NOTHING"], "NOTHING"),
    (["--seq-len", "4000"], "corpus too short"),
])
@pytest.mark.parametrize("found", ["absent", "absent parents", "present", "present with a lock"])
def test_a_refused_set_up_leaves_the_directory_as_it_was(corpus, tmp_path, capsys, argv,
                                                         fragment, found):
    """Refusals found once the directory is locked (and, for a corpus too short, after
    tokenizing): one line, and the directory as it was: absent (its missing parents too), or
    holding the same files, a lock file of an earlier run included."""
    top = tmp_path / "runs"
    ck = top / "a" / "ck" if found == "absent parents" else top
    if found.startswith("present"):
        top.mkdir()
        (top / "notes.txt").write_text("mine\n")
    if found == "present with a lock":
        (top / ".lock").write_bytes(b"")
    before = files_in(top)
    argv = [str(tmp_path / "nothing") if a == "NOTHING" else a for a in argv]
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ck, *argv)
    assert_one_error_line(code, err, "train_model", fragment.replace("NOTHING", "nothing"))
    assert files_in(top) == before


@pytest.mark.parametrize("name", ["vocab.txt", "tokenizer.json", "dataset.bin", ".lock"])
def test_a_data_file_the_run_would_write_is_refused(corpus, ckpt_dir, capsys, name):
    """A DATA file that is one of the files the run writes in its --checkpoint-dir (read
    there as text, then written over by the vocabulary, the stream, the lock) is refused
    before anything is written, and keeps its text; another file of that directory is
    read as any other."""
    ckpt_dir.mkdir()
    data = ckpt_dir / name
    data.write_bytes(corpus.read_bytes())
    code, _, err = cli(capsys, data, *TINY, "--checkpoint-dir", ckpt_dir)
    assert_one_error_line(code, err, "train_model", str(data), "--checkpoint-dir")
    assert data.read_bytes() == corpus.read_bytes()
    assert os.listdir(ckpt_dir) == [name]
    own = ckpt_dir / "corpus.txt"
    own.write_bytes(corpus.read_bytes())
    code, _, err = cli(capsys, own, *TINY, "--checkpoint-dir", ckpt_dir)
    assert code == 0, err


def test_resume_auto_starts_then_continues(corpus, ckpt_dir, capsys):
    ck = ckpt_dir
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ck, "--resume", "auto")
    assert code == 0, err
    assert (ck / "final_model.cllm").is_file()
    code, out, err = cli(capsys, corpus, *TINY[:-1], "--checkpoint-dir", ck, "--resume", "auto")
    assert code == 0 and "already complete" in out


def test_resume_takes_no_other_value(corpus, ckpt_dir, capsys):
    code, _, err = cli(capsys, corpus, *TINY, "--checkpoint-dir", ckpt_dir,
                       "--resume=later")
    assert code == 2 and "--resume takes no value or 'auto'" in err, err
    # a bare --resume never swallows the DATA path after it
    code, _, err = cli(capsys, "--resume", corpus, *TINY, "--checkpoint-dir", ckpt_dir)
    assert_one_error_line(code, err, "train_model", "--resume: no checkpoint_step_<N>.cllm")


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("micro_batch", -3),
                                          ("learning_rate", -1.0), ("optimizer", "lion")])
def test_crafted_training_settings_are_refused(corpus, trained_every_step, capsys, field, value):
    """A checkpoint with valid checksums but impossible settings: one line, status 2."""
    path = sorted(trained_every_step.glob("checkpoint_step_*.cllm"))[-1]
    ckpt = load_checkpoint(path)
    ckpt.meta["train_config"][field] = value
    save_checkpoint(path, ckpt.config, ckpt.params, ckpt.adam_m, ckpt.adam_v,
                    ckpt.meta)
    code, _, err = cli(capsys, corpus, *TINY[:-1], "--checkpoint-dir", trained_every_step, "--resume")
    assert_one_error_line(code, err, "train_model", path.name, "--" + field.replace("_", "-"))


def test_failing_resume_keeps_the_older_checkpoints(corpus, ckpt_dir, capsys):
    """Resuming a run that then fails at once (every step non-finite) saves its state without
    pruning the earlier, distinct ones."""
    ck = ckpt_dir
    argv = [str(corpus), *TINY, "--micro-batch", "8", "--checkpoint-dir", str(ck),
            "--save-interval", "1"]
    assert main(argv) == 0
    before = sorted(p.name for p in ck.glob("checkpoint_step_*.cllm"))
    assert before == ["checkpoint_step_2.cllm", "checkpoint_step_3.cllm", "checkpoint_step_4.cllm"]
    i = argv.index("--max-steps")
    argv[i + 1] = "6"
    with pytest.raises(Exception) as failed:
        train([str(corpus)], engine_class=_engine_testing.Engine,
              engine_hook=lambda e: _engine_testing.inject_nan(e, 4, 0), resume=True,
              checkpoint_dir=str(ck), max_steps=6, max_bad_steps=1, quiet=True, threads=2)
    assert "steps in a row were skipped" in str(failed.value)
    after = sorted(p.name for p in ck.glob("checkpoint_step_*.cllm"))
    assert after == before + ["checkpoint_step_5.cllm"]


def test_a_diverged_run_fails_after_saving(corpus, ckpt_dir, capsys):
    ck = ckpt_dir
    argv = [a for a in TINY]
    argv[argv.index("--max-steps") + 1] = "12"
    code, out, err = cli(capsys, corpus, *argv, "--checkpoint-dir", ck, "--optimizer", "sgd",
                         "--learning-rate", "10", "--grad-clip", "0", "--weight-decay", "0")
    assert_one_error_line(code, err, "train_model", "training diverged", status=1)
    assert (ck / "final_model.cllm").is_file()


def test_full_stdout_does_not_stop_training(corpus, ckpt_dir):
    ck = ckpt_dir
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", str(corpus),
                            *[a for a in TINY if a != "--quiet"], "--checkpoint-dir", str(ck)],
                           cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "cannot write to standard output (No space left on device)" in p.stderr
    assert load_checkpoint(ck / "final_model.cllm").meta["state"]["step"] == 4


def test_closed_pipe_does_not_stop_training(corpus, ckpt_dir):
    """`train_model ... | head -1`: the reader goes away, the training does not."""
    ck = ckpt_dir
    argv = [a for a in TINY if a != "--quiet"]
    argv[argv.index("--max-steps") + 1] = "40"
    run = start(corpus, *argv, "--log-interval", "1", "--checkpoint-dir", ck)
    run.stdout.readline()
    run.stdout.close()                     # as `head -1` does
    err = run.stderr.read()
    assert run.wait() == 0, err
    assert "Traceback" not in err, err
    assert load_checkpoint(ck / "final_model.cllm").meta["state"]["step"] == 40
