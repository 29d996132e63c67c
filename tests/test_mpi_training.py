"""train_model on many processes, under the mpich wheel's mpiexec:
bit-identical checkpoints for every layout K ranks x N threads (with clipping active, with
LoRA adapters), resumed with another layout, NaN decisions taken globally, each rank holding
AdamW's state of its share only, one writer, refused set-ups, a failing and a killed rank,
and the missing-mpi4py message. Two cores are oversubscribed: the runs are tiny."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, assert_bit_identical, assert_one_error_line, call, finish, sentences

from cllm_cli.cli.train import main
from cllm_cli.distributed import block_of
from cllm_cli.formats.checkpoint_load import load_checkpoint

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
# 9 windows a step in micro-batches of 2: 5 micro-batches, the last one short; evaluation
# slices of 9 windows
TINY = ["--embed-dim", "16", "--num-layers", "2", "--num-heads", "2", "--seq-len", "16",
        "--batch-size", "9", "--micro-batch", "2", "--max-steps", "5", "--warmup-steps", "2",
        "--tokenizer", "word", "--vocab-size", "120", "--eval-interval", "2", "--eval-tokens", "400", "--seed", "4",
        "--log-interval", "1", "--save-interval", "2", "--keep-checkpoints", "3"]
# steps long enough (a few tenths of a second) for a signal to land inside the run
BIG = ["--embed-dim", "96", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32",
       "--batch-size", "384", "--micro-batch", "4", "--max-steps", "12", "--warmup-steps", "3",
       "--tokenizer", "word", "--vocab-size", "120", "--eval-interval", "0", "--log-interval", "1", "--seed", "5"]
HOOKED = os.path.join(ROOT, "tests", "mpi", "train_hooked.py")
SAVED = ("checkpoint_step_2.cllm", "checkpoint_step_4.cllm", "final_model.cllm")


def command(ranks, threads, *argv, hook=None):
    """train_model on `ranks` processes (a plain process for 1) of `threads` spheres each."""
    program = [HOOKED, hook] if hook else ["-m", "cllm_cli.cli.train"]
    line = [sys.executable, *program, *map(str, argv), "--threads", str(threads)]
    if ranks == 1:
        return line
    assert os.path.exists(MPIEXEC), "mpiexec missing: make installs the mpich wheel"
    return [MPIEXEC, "-n", str(ranks), *line]


def run(ranks, threads, *argv, hook=None):
    return subprocess.run(command(ranks, threads, *argv, hook=hook), cwd=ROOT,
                          capture_output=True, text=True)


def start(ranks, threads, *argv):
    return subprocess.Popen(command(ranks, threads, *argv), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def header_and_first_step(proc):
    """stdout up to the first progress line (training has started)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step "):
            return "".join(seen)
    raise AssertionError(f"the run ended before training started:\n{''.join(seen)}")


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def results(path):
    """The figures of a metrics file that must not depend on the layout."""
    keep = ("step", "loss", "grad_norm", "lr", "val_loss")
    return [{k: r[k] for k in keep if k in r} for r in metrics(path)]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """400 seeded sentences ending in . ! or ?: more text than the shared corpus, for the runs
    on many processes."""
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(sentences(400, 7, punct=(".", "!", "?")), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def one_process(long_corpus, tmp_path_factory):
    ck = tmp_path_factory.mktemp("one") / "ck"
    p = run(1, 1, long_corpus, *TINY, "--checkpoint-dir", ck, "--metrics-file", ck / "m.jsonl")
    assert p.returncode == 0, p.stderr
    return ck


@pytest.mark.parametrize("ranks, threads", [(1, 2), (2, 1), (2, 2), (3, 1), (4, 1), (3, 2)])
def test_every_layout_gives_the_checkpoints_of_one_process(long_corpus, one_process, tmp_path,
                                                           ranks, threads):
    ck = tmp_path / "ck"
    p = run(ranks, threads, long_corpus, *TINY, "--checkpoint-dir", ck, "--metrics-file",
            ck / "m.jsonl")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    # the one warning: more threads on this host, over all its ranks, than it has cores
    warnings = [line for line in p.stderr.splitlines() if "warning" in line]
    oversubscribed = ranks * threads > len(os.sched_getaffinity(0))
    assert len(warnings) == oversubscribed, p.stderr
    if oversubscribed and ranks > 1:
        assert f"--threads {threads} in each of {ranks} processes is more than" in warnings[0]
    for name in ("checkpoint_step_2.cllm", "checkpoint_step_4.cllm", "final_model.cllm"):
        assert_bit_identical(one_process / name, ck / name)
    assert results(ck / "m.jsonl") == results(one_process / "m.jsonl")
    assert p.stdout.count("corpus: ") == 1, "one rank prints"
    if ranks > 1:
        assert f"{ranks} ranks x {threads} sphere{'s' if threads > 1 else ''} (" in p.stdout
        assert all("exchange_bytes" in r and "exchange_seconds" in r
                   for r in metrics(ck / "m.jsonl") if "loss" in r)


def assert_2x1_equals_1x2(long_corpus, one_process, tmp_path, *options):
    """A run with `options` over 2 ranks x 1 sphere ends on the checkpoints and figures of
    1 x 2, and differs from the plain run."""
    out = {}
    for ranks, threads in ((1, 2), (2, 1)):
        ck = tmp_path / f"ck{ranks}x{threads}"
        p = run(ranks, threads, long_corpus, *TINY, *options, "--checkpoint-dir", ck,
                "--metrics-file", ck / "m.jsonl")
        assert p.returncode == 0, p.stderr
        out[ranks, threads] = ck
    for name in ("checkpoint_step_2.cllm", "checkpoint_step_4.cllm", "final_model.cllm"):
        assert_bit_identical(out[1, 2] / name, out[2, 1] / name)
    assert results(out[1, 2] / "m.jsonl") == results(out[2, 1] / "m.jsonl")
    assert results(out[2, 1] / "m.jsonl") != results(one_process / "m.jsonl"), \
        f"{options} should change the run"


def assert_layouts_alike(corpus, tmp_path, layouts, *options, base=TINY):
    """`base` with `options` on each (ranks, threads) of `layouts`: every one ends on the
    first one's checkpoints (weights and AdamW state) and figures. Their directories by
    layout."""
    out = {}
    for ranks, threads in layouts:
        ck = tmp_path / f"ck{ranks}x{threads}"
        p = run(ranks, threads, corpus, *base, *options, "--checkpoint-dir", ck,
                "--metrics-file", ck / "m.jsonl")
        assert p.returncode == 0, p.stderr
        out[ranks, threads] = ck
    first = out[layouts[0]]
    for layout in layouts[1:]:
        for name in SAVED:
            assert_bit_identical(first / name, out[layout] / name)
        assert results(out[layout] / "m.jsonl") == results(first / "m.jsonl")
    return out


def test_with_clipping_active_2_and_3_ranks_give_the_checkpoints_of_one_process(
        long_corpus, one_process, tmp_path):
    """--grad-clip 0.3 is below every step's norm: each step is scaled by the factor the
    ranks compute from every share's sums of squares."""
    out = assert_layouts_alike(long_corpus, tmp_path, [(1, 1), (2, 1), (3, 1)], "--grad-clip",
                               "0.3")
    norms = [r["grad_norm"] for r in metrics(out[1, 1] / "m.jsonl") if "grad_norm" in r]
    assert len(norms) == 5 and min(norms) > 0.3, f"clipping is not active: {norms}"
    assert results(out[1, 1] / "m.jsonl") != results(one_process / "m.jsonl")


def test_lora_adapters_train_alike_on_1_2_and_3_ranks_and_resume_on_another_count(
        long_corpus, one_process, tmp_path):
    """The trained buffer is then the adapters: their shares, AdamW state and checkpoints
    are those of one process; a checkpoint of 3 ranks resumes on 2."""
    lora = ["--init-from", one_process / "final_model.cllm", "--lora-rank", "2",
            "--learning-rate", "1e-2"]
    at = TINY.index("--vocab-size")                 # the vocabulary is the base model's
    base = TINY[:at] + TINY[at + 2:]
    out = assert_layouts_alike(long_corpus, tmp_path, [(1, 1), (2, 1), (3, 1)], *lora,
                               base=base)
    assert load_checkpoint(out[1, 1] / "final_model.cllm").lora is not None
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("vocab.txt", "dataset.bin", "checkpoint_step_2.cllm"):
        shutil.copyfile(out[3, 1] / name, resumed / name)
    p = run(2, 1, long_corpus, *base, *lora, "--checkpoint-dir", resumed, "--resume",
            "--quiet")
    assert p.returncode == 0, p.stderr
    for name in SAVED[1:]:
        assert_bit_identical(out[1, 1] / name, resumed / name)


@pytest.mark.parametrize("saved_on, resumed_on", [(3, 2), (2, 3), (3, 1)])
def test_a_checkpoint_of_k_ranks_resumes_on_another_count_as_the_straight_run(
        long_corpus, one_process, tmp_path, saved_on, resumed_on):
    """Step 2's checkpoint of a run on saved_on ranks (rank 0 gathered every rank's share of
    m and v into it), resumed on resumed_on ranks (each reads its share): the later
    checkpoints are the straight one-process run's."""
    saved, resumed = tmp_path / "saved", tmp_path / "resumed"
    p = run(saved_on, 1, long_corpus, *TINY, "--checkpoint-dir", saved)
    assert p.returncode == 0, p.stderr
    resumed.mkdir()
    for name in ("vocab.txt", "dataset.bin", "checkpoint_step_2.cllm"):
        shutil.copyfile(saved / name, resumed / name)
    p = run(resumed_on, 1, long_corpus, *TINY, "--checkpoint-dir", resumed, "--resume",
            "--quiet")
    assert p.returncode == 0, p.stderr
    for name in SAVED[1:]:
        assert_bit_identical(one_process / name, resumed / name)


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_holds_adamw_state_of_its_share_only(long_corpus, tmp_path, ranks):
    """The AdamW state a rank is handed, and its trainer keeps, is m and v of its share of
    the trained values; the shares cover them once, in rank order; the rank's engine holds
    no other whole-size buffer than the weights and one gradient row per micro-batch of its
    block (the sum is folded into the first)."""
    ck = tmp_path / "ck"
    p = run(ranks, 1, long_corpus, *TINY, "--checkpoint-dir", ck, hook="shares:0:0")
    assert p.returncode == 0, p.stderr
    found = [json.loads(path.read_text()) for path in sorted(ck.glob("shares.*.json"))]
    assert [r["rank"] for r in found] == list(range(ranks)), found
    size = found[0]["gradient_size"]
    assert found[0]["start"] == 0 and found[-1]["stop"] == size
    assert all(a["stop"] == b["start"] for a, b in zip(found, found[1:]))
    for r in found:
        share = r["stop"] - r["start"]
        assert 0 < share < size
        assert r["m"] == r["v"] == r["trainer_m"] == r["trainer_v"] == share, r
        first, end = block_of(r["rank"], ranks, 5)        # 9 windows, micro-batches of 2
        assert r["held"] == {"trained": [size], "kept": [end - first, size]}, r


def test_dropout_masks_follow_the_global_micro_batch_on_every_layout(long_corpus, one_process,
                                                                      tmp_path):
    """With --dropout 0.1, rank 1 of 2 runs global micro-batches 3 and 4 as its local 0 and 1:
    it draws their masks, so 2 ranks x 1 sphere gives the checkpoints of 1 x 2."""
    assert_2x1_equals_1x2(long_corpus, one_process, tmp_path, "--dropout", "0.1")


@pytest.mark.bf16
def test_bf16_runs_alike_on_every_layout(long_corpus, one_process, tmp_path):
    assert_2x1_equals_1x2(long_corpus, one_process, tmp_path, "--precision", "bf16")


def test_ranks_of_their_own_thread_counts_are_named_so_and_train_alike(long_corpus, one_process,
                                                                       tmp_path):
    """--threads is each rank's own: rank 0 with 2 spheres and rank 1 with 1 give the
    checkpoints of one process, the header names each rank's count, and the sphere table
    numbers the 3 spheres 0, 1, 2."""
    ck = tmp_path / "ck"
    args = [long_corpus, *TINY, "--checkpoint-dir", ck]
    p = subprocess.run([MPIEXEC, "-n", "1", *command(1, 2, *args), ":", "-n", "1",
                        *command(1, 1, *args)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "2 ranks x 2/1 spheres (rank 0 pid " in p.stdout, p.stdout
    table = p.stdout.split("sphere  group  micro-batches  mean loss  busy\n")[1].splitlines()
    assert [int(line.split()[0]) for line in table[:3]] == [0, 1, 2], p.stdout
    for name in SAVED:
        assert_bit_identical(one_process / name, ck / name)


def test_a_resume_on_many_processes_takes_the_runs_settings_from_the_checkpoint(long_corpus,
                                                                                tmp_path):
    """Resumed under mpiexec with only --resume, every rank trains with the settings stored in
    the checkpoint (micro-batch, seed, dropout differ from the defaults here), not with its
    own command line's defaults: the run ends on the straight run's checkpoint, bit for bit."""
    straight = tmp_path / "straight"
    p = run(1, 2, long_corpus, *TINY, "--dropout", "0.1", "--checkpoint-dir", straight)
    assert p.returncode == 0, p.stderr
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("vocab.txt", "dataset.bin", "checkpoint_step_2.cllm"):
        shutil.copyfile(straight / name, resumed / name)
    p = run(2, 1, long_corpus, "--checkpoint-dir", resumed, "--resume", "--quiet")
    assert p.returncode == 0, p.stderr
    assert_bit_identical(straight / "final_model.cllm", resumed / "final_model.cllm")


def test_more_ranks_than_micro_batches_leaves_ranks_idle_and_the_result_alike(long_corpus, tmp_path):
    few = [*TINY, "--batch-size", "4", "--eval-tokens", "40"]       # 2 micro-batches, 3 ranks
    out = {}
    for ranks in (1, 3):
        ck = tmp_path / f"ck{ranks}"
        p = run(ranks, 1, long_corpus, *few, "--checkpoint-dir", ck, "--metrics-file", ck / "m.jsonl")
        assert p.returncode == 0, p.stderr
        out[ranks] = ck
    assert_bit_identical(out[1] / "final_model.cllm", out[3] / "final_model.cllm")
    assert results(out[1] / "m.jsonl") == results(out[3] / "m.jsonl")


def test_a_nan_is_left_out_by_every_rank_alike(long_corpus, tmp_path):
    """Global micro-batch 3 of step 1 is poisoned on whichever rank owns it; the step's sum
    leaves it out on every rank, as one process does."""
    out = {}
    for ranks, threads in ((1, 2), (2, 1), (3, 1)):
        ck = tmp_path / f"ck{ranks}"
        p = run(ranks, threads, long_corpus, *TINY, "--checkpoint-dir", ck, hook="nan:1:3")
        assert p.returncode == 0, p.stderr
        warnings = [line for line in p.stderr.splitlines() if "micro-batch 3" in line]
        assert len(warnings) == 1 and "step 2:" in warnings[0], p.stderr
        out[ranks] = ck
    for ranks in (2, 3):
        for name in SAVED:
            assert_bit_identical(out[1] / name, out[ranks] / name)


@pytest.fixture(scope="module")
def big_straight(long_corpus, tmp_path_factory):
    """The BIG run in one process: what every interrupted and resumed run must equal."""
    ck = tmp_path_factory.mktemp("straight") / "ck"
    p = run(1, 2, long_corpus, *BIG, "--checkpoint-dir", ck, "--quiet")
    assert p.returncode == 0, p.stderr
    return ck


@pytest.mark.parametrize("sig, resume_layout", [(signal.SIGINT, (3, 1)),
                                                (signal.SIGTERM, (1, 2))])
def test_a_signal_to_mpiexec_saves_and_resumes_with_another_layout(long_corpus, big_straight,
                                                                   ckpt_dir, sig, resume_layout):
    ck = ckpt_dir
    proc = start(2, 1, long_corpus, *BIG, "--checkpoint-dir", ck)
    header_and_first_step(proc)
    proc.send_signal(sig)                            # mpiexec passes it to every rank
    out, err = finish(proc)
    assert proc.returncode == 128 + sig, err
    assert f"train_model: interrupted by {sig.name}" in err and "Traceback" not in err, err
    saved = sorted(ck.glob("checkpoint_step_*.cllm"))
    assert len(saved) == 1 and saved[0].name in out, (saved, out[-300:])
    p = run(*resume_layout, long_corpus, *BIG, "--checkpoint-dir", ck, "--resume", "--quiet")
    assert p.returncode == 0, p.stderr
    assert_bit_identical(big_straight / "final_model.cllm", ck / "final_model.cllm")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_mpiexec_during_set_up_stops_every_rank_as_one_process(long_corpus,
                                                                             tmp_path, sig):
    """Every rank gets the signal while rank 0 sets the run up: rank 0 stops it and removes
    what it wrote, the others wait for its word; one line, the signal's status."""
    ck = tmp_path / "ck"
    proc = subprocess.Popen(command(2, 1, long_corpus, *TINY, "--checkpoint-dir", ck,
                                    hook="setup:0:0"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "ck.setting-up"
    while not marker.exists():                 # rank 0 has locked the directory
        assert proc.poll() is None, finish(proc)
        time.sleep(0.05)
    proc.send_signal(sig)                      # mpiexec passes it to every rank
    out, err = finish(proc)
    assert proc.returncode == 128 + sig, err
    assert err.splitlines() == [f"train_model: interrupted by {sig.name}"], err
    assert not ck.exists()


def test_a_killed_rank_stops_every_rank_and_the_last_checkpoint_stays_usable(long_corpus, ckpt_dir):
    ck = ckpt_dir
    proc = start(3, 1, long_corpus, *BIG, "--checkpoint-dir", ck, "--save-interval", "1")
    header = header_and_first_step(proc)
    pid = int(re.search(r"rank 1 pid (\d+)", header).group(1))
    while not list(ck.glob("checkpoint_step_*.cllm")):     # the first checkpoint is written
        assert proc.poll() is None, finish(proc)
        time.sleep(0.05)                                    # between two looks at the dir
    os.kill(pid, signal.SIGKILL)
    out, err = finish(proc)                    # the launcher ends: the other ranks have stopped
    assert proc.returncode != 0
    # the launcher names a process it reaped: the killed one, or another rank it ended first
    pids = {int(p) for p in re.findall(r"rank \d+ pid (\d+)", header)}
    named = {int(p) for p in re.findall(r"PID (\d+) RUNNING", out + err)}
    assert named and named <= pids, out[-600:] + err
    for path in ck.glob("checkpoint_step_*.cllm"):
        load_checkpoint(path)


def test_an_exception_on_one_rank_stops_every_rank_with_one_line_naming_it(long_corpus, ckpt_dir):
    ck = ckpt_dir
    p = run(3, 1, long_corpus, *TINY, "--checkpoint-dir", ck, "--save-interval", "1",
            hook="fail:2:3")
    assert p.returncode == 1, p.stderr
    ours = [line for line in p.stderr.splitlines() if line.startswith("train_model: error:")]
    assert ours == ["train_model: error: rank 2 of 3: RuntimeError: injected failure at step 3"], \
        p.stderr
    assert "Traceback" not in p.stderr
    saved = sorted(ck.glob("checkpoint_step_*.cllm"))
    assert saved and saved[0].name == "checkpoint_step_1.cllm", saved
    for path in saved:                  # rank 0 may have been ended while writing step 3's
        load_checkpoint(path)


@pytest.mark.parametrize("hook, line", [
    ("fold:1:2", "rank 1 of 3: RuntimeError: injected failure in the exchange of step 2"),
    ("save:2:1", "rank 2 of 3: RuntimeError: injected failure in checkpoint 1"),
])
def test_a_rank_failing_mid_exchange_stops_every_rank_with_one_line(long_corpus, ckpt_dir, hook,
                                                                     line):
    """In the middle of a step's exchange (the others wait in the gather of the chunks'
    sums), or while rank 0 reads the failing rank's share of m and v into a checkpoint (rank
    0 waits for that piece): one line naming the rank, status 1, no rank left waiting."""
    p = subprocess.run(command(3, 1, long_corpus, *TINY, "--checkpoint-dir", ckpt_dir,
                               "--save-interval", "1", hook=hook),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    ours = [x for x in p.stderr.splitlines() if x.startswith("train_model: error:")]
    assert ours == [f"train_model: error: {line}"], p.stderr
    assert "Traceback" not in p.stderr
    for path in ckpt_dir.glob("checkpoint_step_*.cllm"):
        load_checkpoint(path)              # whatever was written is whole


def test_a_rank_that_sees_another_directory_stops_every_rank(long_corpus, tmp_path):
    """As on a cluster whose checkpoint directory is not shared: rank 1 finds no dataset.bin
    (then a dataset.bin of another corpus) where rank 0 wrote its own."""
    ck, elsewhere = tmp_path / "ck", tmp_path / "elsewhere"
    other = tmp_path / "other.txt"
    other.write_text(sentences(300, 99, punct=(".",)), encoding="utf-8")
    for case in ("missing", "another corpus"):
        if case == "another corpus":
            p = run(1, 1, other, *TINY, "--checkpoint-dir", elsewhere, "--max-steps", "1")
            assert p.returncode == 0, p.stderr
        line = [MPIEXEC, "-n", "1", *command(1, 1, long_corpus, *TINY, "--checkpoint-dir", ck,
                                             "--overwrite"),
                ":", "-n", "1", *command(1, 1, long_corpus, *TINY, "--checkpoint-dir", elsewhere)]
        p = subprocess.run(line, cwd=ROOT, capture_output=True, text=True)
        fragment = "missing here" if case == "missing" else "another dataset key"
        assert_one_error_line(p.returncode, p.stderr, "train_model", "rank 1 of 2", fragment,
                              "shares")
        assert not list(ck.glob("checkpoint_step_*"))


def test_a_set_up_refused_on_rank_0_ends_every_rank_with_its_status(tmp_path):
    p = run(2, 1, tmp_path / "missing.txt", *TINY, "--checkpoint-dir", tmp_path / "ck")
    assert_one_error_line(p.returncode, p.stderr, "train_model", "missing.txt", status=2)


def test_a_bad_option_on_many_processes_is_one_line(tmp_path):
    """Every rank parses the same command line; only rank 0 says what is wrong."""
    p = run(2, 0, tmp_path / "c.txt", *TINY, "--checkpoint-dir", tmp_path / "ck")
    assert_one_error_line(p.returncode, p.stderr, "train_model", "--threads", status=2)
    assert not (tmp_path / "ck").exists()


def test_a_precision_no_rank_can_run_is_one_line(long_corpus, tmp_path, monkeypatch):
    """--precision bf16 where no rank's CPU has bf16 (CLLM_NO_BF16 hides it): rank 0 says so
    once, as one process does, and nothing is written."""
    monkeypatch.setenv("CLLM_NO_BF16", "1")
    p = run(2, 1, long_corpus, *TINY, "--precision", "bf16", "--checkpoint-dir", tmp_path / "ck")
    assert_one_error_line(p.returncode, p.stderr, "train_model", "--precision bf16", status=2)
    assert "rank" not in p.stderr
    assert not (tmp_path / "ck").exists()


@pytest.mark.bf16
def test_a_bf16_checkpoint_resumed_where_one_rank_cannot_run_it_is_one_line(long_corpus,
                                                                              tmp_path):
    """Resumed with 2 ranks, of which rank 1 alone lacks bf16 (as on a host with another
    CPU): one line naming rank 1, and the checkpoint stays as it was."""
    ck = tmp_path / "ck"
    p = run(1, 1, long_corpus, *TINY, "--precision", "bf16", "--checkpoint-dir", ck,
            "--max-steps", "2")
    assert p.returncode == 0, p.stderr
    before = sorted(ck.iterdir())
    again = command(1, 1, long_corpus, "--checkpoint-dir", ck, "--resume", "--max-steps", "4")
    p = subprocess.run([MPIEXEC, "-n", "1", *again, ":", "-n", "1", "-env", "CLLM_NO_BF16", "1",
                        *again], cwd=ROOT, capture_output=True, text=True)
    ours = [line for line in p.stderr.splitlines() if line.startswith("train_model: error:")]
    assert p.returncode == 2 and len(ours) == 1, p.stderr
    assert ours[0].startswith("train_model: error: rank 1 of 2: ") and "bf16" in ours[0], ours
    assert "Traceback" not in p.stderr
    assert sorted(ck.iterdir()) == before


def test_a_launcher_without_mpi4py_says_how_to_install_it(long_corpus, ckpt_dir, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # import mpi4py fails
    code, _, err = call(capsys, main, long_corpus, *TINY, "--checkpoint-dir", ckpt_dir)
    assert_one_error_line(code, err, "train_model", "mpi4py", "pip install")
