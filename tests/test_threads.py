"""The spheres and the determinism contract through train(): any thread count and lock mode,
resumed or not, gives the same bits; NaN micro-batches are dropped the same way everywhere.

Every run here uses a tiny model on a small generated corpus. The batch of 9 windows is cut
into 5 micro-batches of 2 (the last one holds a single window), which is not a multiple of
any thread count tried, and 8 spheres are more than 5 micro-batches. The corpus holds about
40 windows, so 8 steps cross an epoch boundary where the last batch of the epoch is smaller.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, assert_bit_identical, tensors
from sphere_runs import BASE, BATCH, MB_PER_FULL_STEP, MICRO, STEPS, ckpt_files

from cllm_cli import CLLMModel, _engine_testing, train
from cllm_cli._engine import parameter_layout
from cllm_cli.corpus.batches import epoch_order, gather_windows, num_windows, split_stream
from cllm_cli.corpus.dataset import load_dataset
from cllm_cli.errors import TrainingError
from cllm_cli.formats.checkpoint_load import load_checkpoint


def run(data, ckpt_dir, engine_hook=None, **over):
    """train() with the testing engine (its hooks for engine_hook; it computes what the
    production engine does)."""
    opts = dict(BASE, checkpoint_dir=str(ckpt_dir))
    opts.update(over)
    return train([str(data)], engine_hook=engine_hook, engine_class=_engine_testing.Engine, **opts)


@pytest.fixture(scope="module")
def reference(window_corpus, tmp_path_factory):
    """The straight single-sphere run every other run is compared with."""
    d = tmp_path_factory.mktemp("ref")
    metrics = d / "metrics.jsonl"
    result = run(window_corpus, d / "ckpt", threads=1, lock_mode="shared", metrics_file=str(metrics))
    return {"dir": d / "ckpt", "result": result, "metrics": metrics}


@pytest.fixture(scope="module")
def layout(reference):
    """Facts about the reference run's data: windows, batches, micro-batches per step."""
    ck = load_checkpoint(reference["dir"] / "final_model.cllm")
    cfg = ck.config
    tokens = load_dataset(str(reference["dir"] / "dataset.bin"))
    if isinstance(tokens, tuple):
        tokens = tokens[0]
    train_tokens, _ = split_stream(tokens, 0.05)
    n = num_windows(len(train_tokens), cfg.seq_len)
    per_epoch = math.ceil(n / BATCH)
    sizes = []
    for step in range(STEPS):
        pos = step % per_epoch
        sizes.append(min(BATCH, n - pos * BATCH))
    return {"cfg": cfg, "n_windows": n, "steps_per_epoch": per_epoch, "batch_sizes": sizes,
            "train_tokens": train_tokens}


def test_reference_run_is_a_meaningful_setting(reference, layout):
    """The premises of the thread tests: ragged micro-batches, an epoch boundary with a
    smaller batch, and training that actually moved the weights."""
    assert reference["result"]["step"] == STEPS
    assert layout["steps_per_epoch"] < STEPS, "the run should cross an epoch boundary"
    assert layout["n_windows"] % BATCH != 0, "the epoch's last batch should be smaller"
    assert BATCH % MICRO != 0 and MB_PER_FULL_STEP % 2 and MB_PER_FULL_STEP % 3
    assert MB_PER_FULL_STEP < 8
    epochs = [json.loads(l)["epoch"] for l in reference["metrics"].read_text().splitlines()
              if "epoch" in json.loads(l)]
    assert epochs[0] == 1 and epochs[-1] == 2
    final = load_checkpoint(reference["dir"] / "final_model.cllm")
    init = CLLMModel(final.config, BASE["seed"]).flat
    assert np.all(np.isfinite(final.params))
    assert not np.array_equal(init, final.params)
    for f in ckpt_files(reference["dir"]):
        assert (reference["dir"] / f).is_file(), f


@pytest.mark.parametrize("threads,lock_mode", [
    (1, "exclusive"), (2, "shared"), (3, "shared"), (4, "shared"), (8, "shared"),
    (2, "exclusive"), (3, "exclusive"), (8, "exclusive")])
def test_bit_identical_across_threads_and_lock_modes(reference, window_corpus, tmp_path, threads,
                                                      lock_mode):
    result = run(window_corpus, tmp_path / "ckpt", threads=threads, lock_mode=lock_mode)
    assert result["step"] == STEPS
    assert len(result["spheres"]) == threads
    for f in ckpt_files(tmp_path / "ckpt"):
        assert_bit_identical(reference["dir"] / f, tmp_path / "ckpt" / f)
    assert result["train_loss"] == reference["result"]["train_loss"]
    assert result["val_loss"] == reference["result"]["val_loss"]


def test_debug_locks_run_is_clean_and_identical(reference, window_corpus, tmp_path):
    """--debug-locks checks every lock taken during a real run (in a subprocess, since a
    violation aborts the process) and changes nothing in the result."""
    ck = tmp_path / "ckpt"
    argv = [sys.executable, "-m", "cllm_cli.cli.train", str(window_corpus), "--checkpoint-dir", str(ck),
            "--threads", "3", "--debug-locks"]
    for k, v in BASE.items():
        if k == "quiet":
            argv.append("--quiet")
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "lock order" not in p.stderr
    assert_bit_identical(reference["dir"] / "final_model.cllm", ck / "final_model.cllm")


@pytest.mark.parametrize("threads", [3, 8])
def test_interrupted_and_resumed_run_is_bit_identical(reference, window_corpus, tmp_path, threads):
    """Resuming a straight run's step-4 checkpoint (in a fresh directory, another thread
    count) ends on the straight run's weights."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("checkpoint_step_4.cllm", "vocab.txt", "dataset.bin"):
        shutil.copy2(reference["dir"] / f, d / f)
    result = run(window_corpus, d, threads=threads, resume=True)
    assert result["step"] == STEPS
    for f in ckpt_files(d):
        assert_bit_identical(reference["dir"] / f, d / f)


def test_resume_without_the_dataset_cache_is_bit_identical(reference, window_corpus, tmp_path):
    """dataset.bin is a cache: resuming with only vocab.txt and the checkpoint re-tokenizes
    the corpus to the same stream."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("checkpoint_step_4.cllm", "vocab.txt"):
        shutil.copy2(reference["dir"] / f, d / f)
    run(window_corpus, d, threads=2, resume=True)
    assert_bit_identical(reference["dir"] / "final_model.cllm", d / "final_model.cllm")


# --- NaN injection -------------------------------------------------------------------------

def expected_bad_tensor(cfg):
    """The tensor holding flat element size // 2, where inject_nan puts its NaN."""
    size = sum(math.prod(shape) for _, shape, _ in parameter_layout(cfg))
    for name, shape, off in parameter_layout(cfg):
        if off <= size // 2 < off + math.prod(shape):
            return name


def warnings_about(err, step):
    return [l for l in err.splitlines() if "warning" in l and f"step {step}" in l]


INJECT_STEP, INJECT_MB = 2, 1      # 0-based step index; reported as step 3


@pytest.fixture(scope="module")
def injected_reference(window_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("nan1") / "ckpt"
    result = run(window_corpus, d, threads=1,
                 engine_hook=lambda e: _engine_testing.inject_nan(e, INJECT_STEP, INJECT_MB))
    return {"dir": d, "result": result}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_nan_injection_is_reported_skipped_and_deterministic(reference, injected_reference,
                                                             layout, window_corpus, tmp_path, capfd,
                                                             threads):
    d = tmp_path / "ckpt"
    result = run(window_corpus, d, threads=threads,
                 engine_hook=lambda e: _engine_testing.inject_nan(e, INJECT_STEP, INJECT_MB))
    err = capfd.readouterr().err
    assert result["step"] == STEPS
    lines = warnings_about(err, INJECT_STEP + 1)
    assert lines, f"no warning naming step {INJECT_STEP + 1} on stderr:\n{err}"
    line = next((l for l in lines if f"micro-batch {INJECT_MB}" in l), None)
    assert line is not None, f"no warning names micro-batch {INJECT_MB}: {lines}"
    assert line.startswith("train_model: warning:")
    spheres = [s for s in range(threads) if f"sphere {s}" in line]
    assert len(spheres) == 1, f"warning should name one sphere of 0..{threads - 1}: {line}"
    assert expected_bad_tensor(layout["cfg"]) in line, line
    other = [l for l in err.splitlines() if "warning" in l and l not in lines]
    assert not other, f"unexpected warnings: {other}"
    # the step was applied from the other micro-batches: every step counts for AdamW
    meta = load_checkpoint(d / "final_model.cllm").meta
    assert meta["state"]["adam_t"] == STEPS and meta["state"]["bad_steps"] == 0
    final = tensors(d / "final_model.cllm")
    assert all(np.all(np.isfinite(v)) for v in final.values())
    # ... and without the poisoned micro-batch: the weights differ from the clean run
    clean = tensors(reference["dir"] / "final_model.cllm")
    assert final["wte"].tobytes() != clean["wte"].tobytes()
    # steps before the injection are untouched by it
    if threads == 1:
        return
    for f in ckpt_files(d):
        assert_bit_identical(injected_reference["dir"] / f, d / f)


def test_nan_step_uses_exactly_the_other_micro_batches(window_corpus, tmp_path, capfd):
    """With SGD, lr 1, no clipping and no decay, w0 - w1 of a single step is the step's
    gradient: the mean-loss gradient over the windows of the valid micro-batches only."""
    d = tmp_path / "ckpt"
    sgd = dict(optimizer="sgd", learning_rate=1.0, lr_schedule="constant", warmup_steps=0,
               weight_decay=0.0, grad_clip=0.0, max_steps=1, save_interval=0, eval_interval=0)
    run(window_corpus, d, threads=3, engine_hook=lambda e: _engine_testing.inject_nan(e, 0, 1), **sgd)
    assert "micro-batch 1" in capfd.readouterr().err
    ck = load_checkpoint(d / "final_model.cllm")
    cfg = ck.config
    w0 = CLLMModel(cfg, BASE["seed"]).flat
    step = w0 - ck.params
    tokens = load_dataset(str(d / "dataset.bin"))
    if isinstance(tokens, tuple):
        tokens = tokens[0]
    train_tokens, _ = split_stream(tokens, 0.05)
    order = epoch_order(BASE["seed"], 0, num_windows(len(train_tokens), cfg.seq_len))
    windows = gather_windows(train_tokens, order[:BATCH], cfg.seq_len)
    keep = [r for r in range(BATCH) if r // MICRO != 1]

    def grad(rows):
        model = CLLMModel.from_flat(cfg, w0.copy())
        _, g = model.loss_and_grads(windows[rows, :-1], windows[rows, 1:], pad_id=0)  # <pad> of vocab.txt
        return np.concatenate([g[name].ravel() for name, _, _ in parameter_layout(cfg)])

    g_valid, g_all = grad(keep), grad(list(range(BATCH)))
    scale = np.abs(g_valid).max()
    assert np.allclose(step, g_valid, rtol=1e-4, atol=1e-6 * scale), \
        f"max difference {np.abs(step - g_valid).max()} (scale {scale})"
    assert not np.allclose(step, g_all, rtol=1e-4, atol=1e-6 * scale)


def test_step_without_valid_micro_batch_stops_with_last_good_state(window_corpus, tmp_path, capfd):
    """micro-batch = batch: poisoning it leaves no valid micro-batch; with --max-bad-steps 1
    train() raises TrainingError after saving the state of the last good step."""
    bad = 3        # 0-based: steps 0, 1, 2 are good, step index 3 ("step 4") is skipped
    clean = tmp_path / "clean"
    run(window_corpus, clean, threads=2, micro_batch=BATCH, save_interval=1, eval_interval=0)
    capfd.readouterr()
    d = tmp_path / "ckpt"
    with pytest.raises(TrainingError) as info:
        run(window_corpus, d, threads=2, micro_batch=BATCH, save_interval=0, eval_interval=0,
            max_bad_steps=1, engine_hook=lambda e: _engine_testing.inject_nan(e, bad, 0))
    err = capfd.readouterr().err
    assert "step 4" in err and "micro-batch 0" in err, err
    assert not (d / "final_model.cllm").exists()
    saved = sorted(d.glob("checkpoint_step_*.cllm"))
    assert saved, "no checkpoint of the last good state"
    assert str(saved[-1].name) in str(info.value) or str(saved[-1]) in str(info.value)
    last = load_checkpoint(saved[-1])
    assert last.meta["state"]["adam_t"] == bad
    # the skipped step left weights and optimiser state untouched: the newest checkpoint
    # holds exactly the clean run's state after step 3
    a, b = tensors(clean / "checkpoint_step_3.cllm"), tensors(saved[-1])
    assert sorted(a) == sorted(b)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


# --- lock order ------------------------------------------------------------------------------

LOCK_SCRIPT = """
import sys
from cllm_cli import _engine_testing
from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig
cfg = CLLMConfig(vocab_size=10, embed_dim=8, num_layers=1, num_heads=2, seq_len=4)
model = CLLMModel(cfg, 0)
engine = _engine_testing.Engine(cfg, model.flat, 2, 1, 4, "shared", {debug})
_engine_testing.violate_lock_order(engine)
print("returned", flush=True)
engine.close()
"""


def test_lock_order_violation_aborts_in_debug_mode():
    p = subprocess.run([sys.executable, "-c", LOCK_SCRIPT.format(debug=True)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == -6, (p.returncode, p.stderr)
    assert "returned" not in p.stdout
    assert any("model_lock" in l and "gradient_lock" in l for l in p.stderr.splitlines()), p.stderr


def test_lock_order_violation_is_not_checked_without_debug_mode():
    p = subprocess.run([sys.executable, "-c", LOCK_SCRIPT.format(debug=False)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "returned" in p.stdout


# --- per-sphere statistics --------------------------------------------------------------------

@pytest.mark.parametrize("threads", [3, 14])
def test_sphere_statistics(window_corpus, layout, tmp_path, threads):
    result = run(window_corpus, tmp_path / "ckpt", threads=threads)
    rows = result["spheres"]
    assert [r["sphere"] for r in rows] == list(range(threads))
    assert all(r["symmetry_group"] == r["sphere"] % 12 for r in rows)
    expected = sum(math.ceil(b / MICRO) for b in layout["batch_sizes"])
    assert expected < STEPS * MB_PER_FULL_STEP      # the epoch's last batch is smaller
    # evaluation work is not counted, training work is counted once
    assert sum(r["micro_batches"] for r in rows) == expected
    for r in rows:
        assert 0.0 <= r["busy_share"] <= 1.0
        if r["micro_batches"]:
            assert math.isfinite(r["mean_loss"]) and r["mean_loss"] > 0


def test_blas_runs_on_the_calling_thread_even_if_scipy_came_first():
    # scipy's OpenBLAS loaded (with a thread per core) before cllm_cli is imported
    code = ("import ctypes, glob, os, scipy, scipy.linalg.blas\n"
            "lib = ctypes.CDLL(sorted(p for p in glob.glob(os.path.join(os.path.dirname("
            "scipy.__file__) + '.libs', 'libscipy_openblas*')) if 'openblas64_' not in p)[0])\n"
            "before = lib.scipy_openblas_get_num_threads()\n"
            "import cllm_cli\n"
            "print(before, lib.scipy_openblas_get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    before, after = map(int, out.split())
    if os.cpu_count() > 1:
        assert before > 1, "premise: OpenBLAS starts with several threads"
    assert after == 1
