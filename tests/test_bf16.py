"""--precision bf16: the rounding, oneDNN's products, gradients against the
float64 reference, the determinism contract within bf16, learning, and the refusals.

Tolerances. bf16 keeps 8 significant bits, so rounding one input has relative error at most
u = 2^-8; a product term a*b of two rounded inputs is off by at most ~2u relative.
- Against a reference that rounds the same inputs (reference.round_bf16 swapped in for
  reference.product_input), the engine differs only where a float64 activation and the
  engine's float32 one fall on two sides of a bf16 rounding boundary (a chance of about
  2^-24 / 2^-9 = 2^-15 per element). The small configs A, B, C have too few elements for any
  such flip, so they must match as fp32 does (1e-5, REL_TOL_SAME); D and E have ~1e5 rounded
  elements, a few flip, and each flip moves a value by one bf16 step: 2u = 8e-3 bounds that,
  with headroom for a flip to feed later layers (2e-2, REL_TOL_FLIPS).
- Against the plain float64 reference, every product is off by up to 2u relative and the
  errors add along the dozen products between a weight and the loss and back in these
  two-layer models: about 25u = 0.1 of a tensor's largest gradient (REL_TOL_PLAIN), and
  2.5u = 1e-2 on the loss, which passes through four products forward. A wrong transpose or
  an unrounded input is an O(1) error and fails either way.
"""

import numpy as np
import pytest
import reference as ref
from engine_cases import CASES, CONFIGS, make_batch, make_params
from helpers import assert_bit_identical, assert_one_error_line, call
from markov import LOWER_MARGIN, UPPER_MARGIN, make_markov_corpus
from sphere_runs import BASE, ckpt_files

from cllm_cli import _engine, _engine_testing
from cllm_cli._engine import parameter_layout
from cllm_cli.cli.train import main as train_main
from cllm_cli.formats.checkpoint_load import load_checkpoint
from cllm_cli.training.loop import train

U = 2.0 ** -8
REL_TOL_SAME = 1e-5
REL_TOL_FLIPS = 2e-2
REL_TOL_PLAIN = 0.1
LOSS_TOL_PLAIN = 1e-2

# every test needs a CPU with bf16 instructions (skipped on one without) and oneDNN (a test
# fails without it): tests/conftest.py
pytestmark = pytest.mark.bf16


@pytest.mark.parametrize("trans_a, trans_b", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_is_the_exact_product_of_the_rounded_inputs(trans_a, trans_b, accumulate):
    """The three products a linear layer runs (forward, input and weight gradients), with
    and without adding onto C: within fp32 summation error of the float64 product."""
    rng = np.random.default_rng(1)
    M, N, K = 67, 45, 131
    a = _engine_testing.op_bf16_round(rng.standard_normal(M * K).astype(np.float32))
    b = _engine_testing.op_bf16_round(rng.standard_normal(K * N).astype(np.float32))
    a = a.reshape((K, M) if trans_a else (M, K))
    b = b.reshape((N, K) if trans_b else (K, N))
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    c = c0.copy()
    impl = _engine_testing.op_bf16_gemm(a, b, c, trans_a, trans_b, accumulate)
    av, bv = ref.bf16_values(a), ref.bf16_values(b)
    want = (av.T if trans_a else av) @ (bv.T if trans_b else bv)
    bound = (np.abs(av.T if trans_a else av) @ np.abs(bv.T if trans_b else bv))
    if accumulate:
        want = want + c0
        bound = bound + np.abs(c0)
    assert np.all(np.abs(c - want) <= K * 2.0 ** -24 * bound + 1e-30)
    # a native bf16 kernel: avx512_core_bf16 (Zen 4, Cooper Lake) or the AMX tiles
    # (avx512_core_amx, Sapphire Rapids on), never the reference implementation
    assert ("bf16" in impl or "amx" in impl) and not impl.startswith("ref"), \
        f"oneDNN fell back to {impl}"


def engine_and_reference(key, B, n, pad_rows, rounded):
    cfg = CONFIGS[key]
    flat, p64 = make_params(cfg, seed=B * 10 + n)
    inputs, targets = make_batch(cfg, B, n, seed=B * 100 + n, pad_rows=pad_rows)
    grads = np.zeros_like(flat)
    loss, counted = _engine.loss_and_grads(cfg, flat, inputs, targets, grads, precision="bf16")
    original = ref.product_input
    ref.product_input = ref.round_bf16 if rounded else original
    try:
        rloss, rcount, rgrads = ref.loss_and_grads(p64, cfg, inputs, targets)
    finally:
        ref.product_input = original
    assert counted == rcount
    views = ref.unflatten(grads, cfg)
    errors = {}
    for name, shape, _ in parameter_layout(cfg):
        g, r = views[name], rgrads[name]
        assert np.all(np.isfinite(g)), name
        scale = np.abs(r).max()
        assert scale > 0, f"{name}: the reference gradient is zero, the case tests nothing"
        errors[name] = np.abs(g - r).max() / scale
    return abs(loss - rloss) / abs(rloss), errors


@pytest.mark.parametrize("key, B, n, pad_rows", CASES)
def test_gradients_match_a_reference_that_rounds_the_same_inputs(key, B, n, pad_rows):
    loss_err, errors = engine_and_reference(key, B, n, pad_rows, rounded=True)
    tol = REL_TOL_SAME if key in "ABC" else REL_TOL_FLIPS
    assert loss_err <= tol
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.3g} of its max |grad|"


@pytest.mark.parametrize("key, B, n, pad_rows", CASES)
def test_gradients_match_the_float64_reference_within_bf16_error(key, B, n, pad_rows):
    loss_err, errors = engine_and_reference(key, B, n, pad_rows, rounded=False)
    assert loss_err <= LOSS_TOL_PLAIN
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_TOL_PLAIN, f"{worst}: {errors[worst]:.3g} of its max |grad|"


def test_bf16_differs_from_fp32():
    """The precision is really applied: the same batch gives other bits in bf16."""
    cfg = CONFIGS["D"]
    flat, _ = make_params(cfg, seed=3)
    inputs, targets = make_batch(cfg, 2, 40, seed=4)
    g32, g16 = np.zeros_like(flat), np.zeros_like(flat)
    l32, _ = _engine.loss_and_grads(cfg, flat, inputs, targets, g32)
    l16, _ = _engine.loss_and_grads(cfg, flat, inputs, targets, g16, precision="bf16")
    assert l32 != l16 and not np.array_equal(g32, g16)
    assert abs(l32 - l16) <= LOSS_TOL_PLAIN * abs(l32)


def test_logits_in_bf16_match_the_rounded_reference():
    cfg = CONFIGS["B"]
    flat, p64 = make_params(cfg, seed=5)
    inputs, _ = make_batch(cfg, 2, 7, seed=6)
    out = np.zeros((2, 7, cfg.vocab_size), np.float32)
    _engine.forward_logits(cfg, flat, inputs, out, precision="bf16")
    original = ref.product_input
    ref.product_input = ref.round_bf16
    try:
        want = ref.logits(p64, cfg, inputs)
    finally:
        ref.product_input = original
    assert np.abs(out - want).max() <= REL_TOL_SAME * np.abs(want).max()


# -- the determinism contract within bf16, through train() ------------------------------------

def run(data, ckpt_dir, **over):
    opts = dict(BASE, checkpoint_dir=str(ckpt_dir), precision="bf16")
    opts.update(over)
    return train([str(data)], **opts)


@pytest.fixture(scope="module")
def bf16_reference(window_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16") / "ckpt"
    return {"dir": d, "result": run(window_corpus, d, threads=1)}


@pytest.mark.parametrize("threads, lock_mode", [(2, "shared"), (3, "exclusive"), (8, "shared")])
def test_bf16_runs_are_bit_identical_across_threads_and_lock_modes(bf16_reference, window_corpus,
                                                                   tmp_path, threads, lock_mode):
    result = run(window_corpus, tmp_path / "ckpt", threads=threads, lock_mode=lock_mode)
    for f in ckpt_files(tmp_path / "ckpt"):
        assert_bit_identical(bf16_reference["dir"] / f, tmp_path / "ckpt" / f)
    assert result["val_loss"] == bf16_reference["result"]["val_loss"]


def test_bf16_resumed_run_equals_the_straight_run(bf16_reference, window_corpus, tmp_path):
    """Resumed from step 4 without naming the precision: the checkpoint's bf16 is kept."""
    import shutil
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("checkpoint_step_4.cllm", "vocab.txt", "dataset.bin"):
        shutil.copy2(bf16_reference["dir"] / f, d / f)
    opts = dict(BASE, checkpoint_dir=str(d), threads=2, resume=True)
    train([str(window_corpus)], **opts)
    for f in ckpt_files(d):
        assert_bit_identical(bf16_reference["dir"] / f, d / f)


def test_checkpoint_records_bf16_and_keeps_fp32_weights(bf16_reference, window_corpus, tmp_path):
    ck = load_checkpoint(bf16_reference["dir"] / "final_model.cllm")
    assert ck.meta["train_config"]["precision"] == "bf16"
    assert ck.params.dtype == np.float32
    # not bf16 values: the master weights keep their fp32 low bits
    assert np.any(ck.params.view(np.uint32) & 0xFFFF)
    fp32 = train([str(window_corpus)], **dict(BASE, checkpoint_dir=str(tmp_path / "fp32"), threads=1))
    assert fp32["val_loss"] != bf16_reference["result"]["val_loss"]
    assert abs(fp32["val_loss"] - bf16_reference["result"]["val_loss"]) < 0.05


def test_resume_refuses_another_precision(bf16_reference, window_corpus, tmp_path, capsys):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(bf16_reference["dir"], d)
    argv = [window_corpus, "--checkpoint-dir", d, "--resume", "--precision", "fp32", "--quiet"]
    code, _, err = call(capsys, train_main, *argv)
    assert_one_error_line(code, err, "train_model", "--precision", "bf16", "fp32")


@pytest.mark.slow
def test_bf16_learns_the_markov_source(tmp_path):
    """The learning run and its margins around the entropy rate, in bf16."""
    text, H = make_markov_corpus(n_words=40, n_tokens=80000, seed=7, branching=4)
    corpus = tmp_path / "markov.txt"
    corpus.write_text(text)
    result = train([str(corpus)], checkpoint_dir=str(tmp_path / "ckpt"), tokenizer="word",
                   embed_dim=32, num_layers=1, num_heads=2, seq_len=32, batch_size=16,
                   micro_batch=4, max_steps=1000, learning_rate=3e-3, warmup_steps=20,
                   eval_interval=0, val_fraction=0.1, threads=2, quiet=True, precision="bf16")
    assert H - LOWER_MARGIN < result["val_loss"] < H + UPPER_MARGIN, (result["val_loss"], H)


def test_cllm_eval_uses_the_runs_precision(bf16_reference, capsys):
    """cllm_eval --split val on the bf16 run gives train_model's final val loss exactly (the
    checkpoint's precision by default), and --precision fp32 another."""
    import json

    from cllm_cli.cli.evaluate import main as eval_main
    final = bf16_reference["dir"] / "final_model.cllm"
    code, out, err = call(capsys, eval_main, final, "--split", "val", "--json", "--threads", "2")
    assert code == 0, err
    assert json.loads(out)["loss"] == bf16_reference["result"]["val_loss"]
    code, out, err = call(capsys, eval_main, final, "--split", "val", "--json",
                          "--precision", "fp32")
    assert code == 0, err
    fp32 = json.loads(out)["loss"]
    assert fp32 != bf16_reference["result"]["val_loss"]
    assert abs(fp32 - bf16_reference["result"]["val_loss"]) < 0.01
