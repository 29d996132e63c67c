"""One Engine step: the accumulated gradient of the spheres against the
float64 reference, the optimiser step (AdamW, SGD, clipping) against the float32 references
of tests/reference.py applied to the engine's own mean gradient, NaN handling, bit-identical
results whatever the number of spheres or the lock mode, and the learning-rate schedule."""
import math

import numpy as np
import pytest
import reference as ref

from cllm_cli import _engine, _engine_testing
from cllm_cli._engine import num_parameters, parameter_layout
from cllm_cli.model import CLLMConfig
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.loop import lr_at

CFG = CLLMConfig(vocab_size=11, embed_dim=8, num_layers=2, num_heads=2, ff_dim=12, seq_len=5)
CFG2 = CLLMConfig(vocab_size=13, embed_dim=12, num_layers=1, num_heads=3, ff_dim=16, seq_len=6)
NP = num_parameters(CFG)
MASK = ref.decay_mask(CFG)


def make_params(cfg, seed=0, std=0.3):
    return ref.flatten(ref.init_params(cfg, seed, std), cfg, dtype=np.float32)


def make_windows(cfg, W, n, seed, pad_frac=0.2, pad_rows=()):
    """int32 windows [W, n + 1]; some targets (columns 1..n) are <pad>."""
    rng = np.random.default_rng(seed)
    win = rng.integers(1, cfg.vocab_size, size=(W, n + 1)).astype(np.int32)
    win[:, 1:][rng.random((W, n)) < pad_frac] = 0
    for r in pad_rows:
        win[r, 1:] = 0
    return np.ascontiguousarray(win)


def run(engine, windows, step=0, train=True):
    engine.start(windows, train, step)
    while not engine.wait(0.5):       # the spheres are still at work
        pass
    return engine.results()


class engine_for:
    """Context manager: an Engine on `flat` that is always closed; with faults, of the testing
    extension, for _engine_testing.inject_nan."""

    def __init__(self, cfg, flat, spheres=1, micro_batch=1, max_windows=16, lock_mode="shared",
                 faults=False):
        module = _engine_testing if faults else _engine
        self.engine = module.Engine(cfg, flat, spheres, micro_batch, max_windows, lock_mode)

    def __enter__(self):
        return self.engine

    def __exit__(self, *exc):
        self.engine.close()


def reference_sum_grads(cfg, flat, windows):
    p64 = {k: v.astype(np.float64) for k, v in ref.unflatten(flat, cfg).items()}
    return ref.loss_and_grads(p64, cfg, windows[:, :-1], windows[:, 1:])


def assert_close_per_tensor(cfg, got_flat, expected, rel=1e-4):
    got = ref.unflatten(got_flat, cfg)
    for name, _, _ in parameter_layout(cfg):
        scale = np.abs(expected[name]).max()
        assert scale > 0, f"{name}: reference gradient is zero"
        err = np.abs(got[name] - expected[name]).max()
        assert err <= rel * scale, f"{name}: max error {err:.3g} vs max |grad| {scale:.3g}"


# ----------------------------------------------------------------------------------------
# the accumulated gradient

@pytest.mark.parametrize("cfg, W, n, micro_batch", [
    (CFG, 5, 5, 1), (CFG, 5, 5, 2), (CFG, 5, 5, 3), (CFG, 5, 5, 5),
    (CFG, 4, 3, 2),                     # n < T
    (CFG2, 3, 6, 1), (CFG2, 3, 6, 3),
])
def test_accumulated_gradient_matches_reference(cfg, W, n, micro_batch):
    flat = make_params(cfg, seed=W + n)
    windows = make_windows(cfg, W, n, seed=micro_batch, pad_rows=(1,))
    before = flat.copy()
    with engine_for(cfg, flat, 1, micro_batch) as engine:
        results = run(engine, windows)
        acc = engine.accumulated_gradients()
    np.testing.assert_array_equal(flat, before)          # a step without optimiser: untouched
    loss, counted, grads = reference_sum_grads(cfg, flat, windows)
    n_mb = -(-W // micro_batch)
    assert len(results) == n_mb
    for k, (mb_loss, mb_counted, sphere, valid, bad) in enumerate(results):
        part = windows[k * micro_batch:(k + 1) * micro_batch]
        assert valid and bad == -1 and sphere == 0
        assert mb_counted == int((part[:, 1:] != 0).sum())
        if mb_counted:
            expected = reference_sum_grads(cfg, flat, part)[0]
            assert mb_loss == pytest.approx(expected, rel=1e-5)
        else:
            assert mb_loss == 0
    assert sum(r[1] for r in results) == counted
    assert sum(r[0] for r in results) == pytest.approx(loss, rel=1e-5)
    assert acc.dtype == np.float32 and acc.shape == (num_parameters(cfg),)
    assert_close_per_tensor(cfg, acc, grads)


def micro_batch_grads(cfg, flat, windows, micro_batch):
    """Each micro-batch's summed gradient, from the plain engine function."""
    parts = []
    for k in range(0, len(windows), micro_batch):
        part = windows[k:k + micro_batch]
        g = np.zeros_like(flat)
        _engine.loss_and_grads(cfg, flat, np.ascontiguousarray(part[:, :-1]),
                               np.ascontiguousarray(part[:, 1:]), g)
        parts.append(g)
    return parts


def ordered_sum(parts):
    acc = parts[0].copy()
    for g in parts[1:]:
        acc = acc + g                  # float32, element by element, in micro-batch order
    return acc


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_accumulation_is_the_ordered_float32_sum(micro_batch):
    """(((g0 + g1) + g2) + ...) bit for bit; float32 addition is not associative, so another
    order would show in the last bits."""
    flat = make_params(CFG, seed=3)
    windows = make_windows(CFG, 6, 5, seed=4)
    parts = micro_batch_grads(CFG, flat, windows, micro_batch)
    with engine_for(CFG, flat, 3, micro_batch) as engine:
        run(engine, windows)
        acc = engine.accumulated_gradients()
    expected = ordered_sum(parts)
    np.testing.assert_array_equal(acc, expected)
    reversed_sum = ordered_sum(parts[::-1])
    assert not np.array_equal(reversed_sum, expected), "the case cannot tell orders apart"


# a vocabulary wide enough that a micro-batch of 2 windows (600 rows) takes two classifier
# blocks (419 + 181 rows), and windows longer than an attention block (32 query rows)
CFG_WIDE = CLLMConfig(vocab_size=20000, embed_dim=8, num_layers=1, num_heads=2, ff_dim=12,
                      seq_len=300)


def test_blocked_classifier_is_identical_for_every_thread_count_and_lock_mode():
    assert _engine.classifier_block_rows(CFG_WIDE, 2) == 419 < 2 * 300
    flat = make_params(CFG_WIDE, seed=10)
    windows = make_windows(CFG_WIDE, 5, 300, seed=11)
    expected = ordered_sum(micro_batch_grads(CFG_WIDE, flat, windows, 2))
    for spheres, lock_mode in [(1, "shared"), (2, "shared"), (3, "shared"), (2, "exclusive")]:
        with engine_for(CFG_WIDE, flat, spheres, 2, lock_mode=lock_mode) as engine:
            run(engine, windows)
            np.testing.assert_array_equal(engine.accumulated_gradients(), expected,
                                          err_msg=f"{spheres} spheres, {lock_mode}")


def test_accumulation_restarts_each_step():
    flat = make_params(CFG, seed=5)
    w1, w2 = make_windows(CFG, 4, 5, seed=6), make_windows(CFG, 4, 5, seed=7)
    with engine_for(CFG, flat, 2, 2) as engine:
        run(engine, w1, step=0)
        run(engine, w2, step=1)
        acc = engine.accumulated_gradients()
    np.testing.assert_array_equal(acc, ordered_sum(micro_batch_grads(CFG, flat, w2, 2)))


def test_evaluation_reports_losses_and_leaves_weights():
    flat = make_params(CFG, seed=8)
    windows = make_windows(CFG, 5, 5, seed=9)
    before = flat.copy()
    with engine_for(CFG, flat, 2, 2) as engine:
        results = run(engine, windows, step=-1, train=False)
    loss, counted, _ = reference_sum_grads(CFG, flat, windows)
    assert len(results) == 3 and all(r[3] for r in results)
    assert sum(r[1] for r in results) == counted
    assert sum(r[0] for r in results) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_array_equal(flat, before)


# ----------------------------------------------------------------------------------------
# the optimiser step, isolated: references applied to the engine's own mean gradient

def accumulate(flat, windows, micro_batch=2, step=0):
    """Returns (engine, results, accumulated sum, counted); the caller closes the engine."""
    engine = _engine.Engine(CFG, flat, 1, micro_batch, 16)
    results = run(engine, windows, step=step)
    return engine, results, engine.accumulated_gradients(), sum(r[1] for r in results)


def assert_bit_equal(got, expected, what):
    # the engine rounds every scalar to float32 once and follows the reference's order of
    # operations, so the step agrees with the numpy reference exactly
    np.testing.assert_array_equal(got, expected, err_msg=what)


@pytest.mark.parametrize("grad_clip", [0.0, 1e3, 0.05])
def test_adamw_two_steps_match_reference(grad_clip):
    flat = make_params(CFG, seed=10)
    lr, wd = 1e-2, 0.1
    m = np.zeros(NP, np.float32)
    v = np.zeros(NP, np.float32)
    p = flat.copy()
    for t, seed in ((1, 11), (2, 12)):
        windows = make_windows(CFG, 5, 5, seed=seed)
        engine, results, acc, count = accumulate(flat, windows, step=t - 1)
        try:
            mean = acc / np.float32(count)
            g, norm_ref = ref.clip_reference(mean, grad_clip)
            if grad_clip == 0.05:
                assert norm_ref > grad_clip * 2, "clipping is not active in this case"
            elif grad_clip:
                assert norm_ref < grad_clip
            p_ref, m_ref, v_ref = ref.adamw_reference(p, g, m, v, t, lr, wd, MASK)
            norm, applied = engine.optimizer_step(count, m, v, adamw=True, lr=lr,
                                                  weight_decay=wd, grad_clip=grad_clip, t=t)
        finally:
            engine.close()
        assert applied
        assert norm == pytest.approx(norm_ref, rel=1e-12)
        assert_bit_equal(m, m_ref, f"m at t={t}")
        assert_bit_equal(v, v_ref, f"v at t={t}")
        assert_bit_equal(flat, p_ref, f"params at t={t}")
        assert not np.array_equal(flat, p), "the step changed nothing"
        # continue from the engine's own state so each step is compared in isolation
        p = flat.copy()


def test_adamw_first_step_is_lr_times_sign():
    """With t=1, no decay and no clipping, mhat/sqrt(vhat) = g/|g|: each weight moves by lr
    (minus the eps effect) against its gradient. Checks the bias correction independently of
    the reference."""
    flat = make_params(CFG, seed=13)
    p0 = flat.copy()
    m = np.zeros(NP, np.float32)
    v = np.zeros(NP, np.float32)
    engine, _, acc, count = accumulate(flat, make_windows(CFG, 4, 5, seed=14))
    try:
        engine.optimizer_step(count, m, v, adamw=True, lr=1e-3, weight_decay=0.0,
                              grad_clip=0.0, t=1)
    finally:
        engine.close()
    g = acc / np.float32(count)
    big = np.abs(g) > 1e-4
    assert big.sum() > NP // 2
    np.testing.assert_allclose((p0 - flat)[big], 1e-3 * np.sign(g[big]), rtol=2e-3)
    np.testing.assert_allclose(m, np.float32(0.1) * g, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(v, np.float32(0.05) * g * g, rtol=1e-5, atol=1e-20)


def test_sgd_lr_one_makes_the_gradient_visible():
    flat = make_params(CFG, seed=15)
    w0 = flat.copy()
    m = np.zeros(NP, np.float32)
    v = np.zeros(NP, np.float32)
    windows = make_windows(CFG, 5, 5, seed=16)
    engine, _, acc, count = accumulate(flat, windows)
    try:
        norm, applied = engine.optimizer_step(count, m, v, adamw=False, lr=1.0,
                                              weight_decay=0.0, grad_clip=0.0, t=1)
    finally:
        engine.close()
    mean = acc / np.float32(count)
    assert applied and norm == pytest.approx(ref.clip_reference(mean, 0.0)[1], rel=1e-12)
    np.testing.assert_array_equal(flat, ref.sgd_reference(w0, mean, 1.0, 0.0, MASK))
    # w0 - w1 is the mean gradient (up to float32 rounding of w0 - g), and that mean is the
    # reference gradient of the mean loss
    np.testing.assert_allclose(w0 - flat, mean, rtol=0, atol=2 * np.spacing(np.abs(w0).max()))
    _, ref_count, grads = reference_sum_grads(CFG, w0, windows)
    assert ref_count == count
    assert_close_per_tensor(CFG, w0 - flat, {k: g / count for k, g in grads.items()}, rel=2e-4)
    assert not m.any() and not v.any(), "SGD has no optimiser state"


@pytest.mark.parametrize("grad_clip, wd", [(0.0, 0.1), (0.05, 0.0), (0.05, 0.1), (1e3, 0.1)])
def test_sgd_with_decay_and_clipping_matches_reference(grad_clip, wd):
    flat = make_params(CFG, seed=17)
    w0 = flat.copy()
    lr = 0.5
    m = np.zeros(NP, np.float32)
    engine, _, acc, count = accumulate(flat, make_windows(CFG, 5, 5, seed=18), micro_batch=1)
    try:
        norm, applied = engine.optimizer_step(count, m, m.copy(), adamw=False, lr=lr,
                                              weight_decay=wd, grad_clip=grad_clip, t=1)
    finally:
        engine.close()
    g, norm_ref = ref.clip_reference(acc / np.float32(count), grad_clip)
    if grad_clip == 0.05:
        assert norm_ref > 2 * grad_clip
    assert applied and norm == pytest.approx(norm_ref, rel=1e-12)
    expected = ref.sgd_reference(w0, g, lr, wd, MASK)
    assert_bit_equal(flat, expected, "params")
    if wd:
        # 1-D tensors (biases, LayerNorm) are not decayed: their change is the gradient alone
        one_d = ~MASK
        assert_bit_equal(flat[one_d], w0[one_d] - np.float32(lr) * g[one_d], "1-D tensors")


def test_clipping_scales_to_grad_clip():
    """After clipping, SGD with lr 1 moves the weights by a vector of norm grad_clip."""
    flat = make_params(CFG, seed=19)
    w0 = flat.copy()
    z = np.zeros(NP, np.float32)
    engine, _, acc, count = accumulate(flat, make_windows(CFG, 5, 5, seed=20))
    try:
        norm, _ = engine.optimizer_step(count, z, z.copy(), adamw=False, lr=1.0,
                                        weight_decay=0.0, grad_clip=0.01, t=1)
    finally:
        engine.close()
    mean = (acc / np.float32(count)).astype(np.float64)
    assert norm == pytest.approx(np.linalg.norm(mean), rel=1e-6) and norm > 0.02
    step = (w0 - flat).astype(np.float64)
    assert np.linalg.norm(step) == pytest.approx(0.01, rel=1e-3)
    cos = step @ mean / (np.linalg.norm(step) * np.linalg.norm(mean))
    assert cos > 0.9999


# ----------------------------------------------------------------------------------------
# non-finite micro-batches

@pytest.mark.parametrize("spheres, micro_batch, bad_mb", [
    (1, 1, 0), (1, 1, 2), (1, 1, 4), (2, 2, 1), (3, 2, 0), (2, 1, 4),
])
def test_nan_micro_batch_is_left_out(spheres, micro_batch, bad_mb):
    flat = make_params(CFG, seed=21)
    windows = make_windows(CFG, 5, 5, seed=22)
    parts = micro_batch_grads(CFG, flat, windows, micro_batch)
    step = 7
    with engine_for(CFG, flat, spheres, micro_batch, faults=True) as engine:
        _engine_testing.inject_nan(engine, step, bad_mb)
        results = run(engine, windows, step=step)
        acc = engine.accumulated_gradients()
        # the hook only poisons its own step: the next step is clean again
        clean = run(engine, windows, step=step + 1)
        acc_clean = engine.accumulated_gradients()
    assert len(results) == len(parts)
    for k, (_, _, _, valid, bad) in enumerate(results):
        if k == bad_mb:
            assert not valid and 0 <= bad < NP, results[k]
        else:
            assert valid and bad == -1, results[k]
    expected = ordered_sum([g for k, g in enumerate(parts) if k != bad_mb])
    assert np.all(np.isfinite(acc))
    np.testing.assert_array_equal(acc, expected)
    assert all(r[3] for r in clean)
    np.testing.assert_array_equal(acc_clean, ordered_sum(parts))


def test_nan_hook_for_another_step_does_nothing():
    flat = make_params(CFG, seed=23)
    windows = make_windows(CFG, 4, 5, seed=24)
    with engine_for(CFG, flat, 2, 1, faults=True) as engine:
        _engine_testing.inject_nan(engine, 5, 1)
        results = run(engine, windows, step=4)
        acc = engine.accumulated_gradients()
    assert all(r[3] and r[4] == -1 for r in results)
    np.testing.assert_array_equal(acc, ordered_sum(micro_batch_grads(CFG, flat, windows, 1)))


def test_no_valid_micro_batch_leaves_an_empty_sum():
    flat = make_params(CFG, seed=25)
    windows = make_windows(CFG, 3, 5, seed=26)
    with engine_for(CFG, flat, 1, 3, faults=True) as engine:
        run(engine, windows, step=0)                 # a good step first
        _engine_testing.inject_nan(engine, 1, 0)
        results = run(engine, windows, step=1)       # its only micro-batch is bad
        acc = engine.accumulated_gradients()
    assert len(results) == 1 and not results[0][3]
    assert not acc.any(), "the sum over no valid micro-batch should be zero"


def test_non_finite_summed_gradient_skips_the_step():
    """Two valid micro-batches whose gradients are finite but sum to Inf: optimizer_step
    refuses the step (applied False) and leaves the weights and the AdamW state untouched.

    ln_f.bias[j] = 2.5e38 with wte[:, j] = 0 keeps the logits finite, while the tied output
    projection gives dwte[v, j] = (p_v - 1) * 2.5e38 for a counted target v: about -2.3e38
    per micro-batch, -Inf once two are added."""
    cfg, j, target = CFG, 2, 5
    flat = make_params(cfg, seed=27, std=0.1)
    views = ref.unflatten(flat, cfg)
    views["wte"][:, j] = 0.0
    views["ln_f.bias"][j] = np.float32(2.5e38)
    windows = make_windows(cfg, 2, 5, seed=28)
    windows[:, 1:] = 0
    windows[:, 3] = target                      # exactly one counted target per window
    before = flat.copy()
    m = np.full(NP, 0.5, np.float32)
    v = np.full(NP, 0.25, np.float32)
    with engine_for(cfg, flat, 2, 1) as engine:
        results = run(engine, windows)
        assert [(r[1], r[3]) for r in results] == [(1, True), (1, True)], results
        acc = engine.accumulated_gradients()
        assert not np.all(np.isfinite(acc)), "the case did not overflow"
        norm, applied = engine.optimizer_step(2, m, v, adamw=True, lr=1e-2,
                                              weight_decay=0.1, grad_clip=1.0, t=1)
    assert not applied and not math.isfinite(norm)
    np.testing.assert_array_equal(flat, before)
    assert np.all(m == 0.5) and np.all(v == 0.25)


# ----------------------------------------------------------------------------------------
# the step in shares of the chunks, as the ranks of many processes run it

# wte (300 x 64 = 19200 floats) is two chunks: a share may end inside a tensor
SHARD_CFG = CLLMConfig(vocab_size=300, embed_dim=64, num_layers=2, num_heads=4, seq_len=8)


def sharded_step(engine, gradient, count, m, v, cuts, **settings):
    """optimizer_update over the shares [cuts[i], cuts[i + 1]) of the chunks, each share's
    mean gradient and chunk sums first (mean_gradient_sumsq), then every chunk's sums
    together, as the ranks do; (norm, applied) of each share."""
    chunks = _engine.optimizer_chunks(SHARD_CFG)
    starts = [int(chunks[k, 0]) if k < len(chunks) else gradient.size for k in cuts]
    spans = list(zip(cuts, cuts[1:], starts, starts[1:]))
    sums = [engine.mean_gradient_sumsq(gradient[a:b], count, first, end)
            for first, end, a, b in spans]
    every = np.concatenate(sums)
    assert every.size == len(chunks)
    return [engine.optimizer_update(gradient[a:b], m[a:b], v[a:b], first, end, every,
                                    **settings)
            for first, end, a, b in spans]


@pytest.mark.parametrize("adamw, grad_clip, overflow", [
    (True, 0.05, False), (True, 0.0, False), (False, 0.05, False), (True, 0.05, True)])
@pytest.mark.parametrize("cuts", [(0, None), (0, 1, None), (0, 1, 1, 7, None), (0, 5, 9, None)])
def test_an_optimizer_step_in_shares_is_the_whole_step(adamw, grad_clip, overflow, cuts):
    """The step in shares of the chunks (a share ending inside wte, an empty share) gives
    the whole step's weights, moments, norm and decision, bit for bit: with clipping active,
    without it, SGD, and a gradient holding Inf (the step skipped on every share)."""
    flat = make_params(SHARD_CFG, seed=61, std=0.1 if overflow else 0.3)
    windows = make_windows(SHARD_CFG, 3, 8, seed=63)
    if overflow:            # two micro-batches whose gradients sum to -Inf in wte, as in
        views = ref.unflatten(flat, SHARD_CFG)      # test_non_finite_summed_gradient_...
        views["wte"][:, 2] = 0.0
        views["ln_f.bias"][2] = np.float32(2.5e38)
        windows = windows[:2].copy()
        windows[:, 1:] = 0
        windows[:, 3] = 5
    rng = np.random.default_rng(62)
    m0 = rng.standard_normal(flat.size).astype(np.float32) * np.float32(1e-3)
    v0 = np.abs(rng.standard_normal(flat.size)).astype(np.float32) * np.float32(1e-5)
    settings = dict(adamw=adamw, lr=1e-2, weight_decay=0.1, grad_clip=grad_clip, t=3)
    cuts = [len(_engine.optimizer_chunks(SHARD_CFG)) if k is None else k for k in cuts]
    whole_p, whole_m, whole_v = flat.copy(), m0.copy(), v0.copy()
    with engine_for(SHARD_CFG, whole_p, micro_batch=1 if overflow else 2) as engine:
        results = run(engine, windows)
        count = sum(r[1] for r in results)
        gradient = engine.accumulated_gradients()
        assert np.isfinite(gradient).all() != overflow
        norm, applied = engine.optimizer_step(count, whole_m, whole_v, **settings)
    assert applied != overflow
    if grad_clip and not overflow:
        assert norm > 2 * grad_clip, "clipping is not active in this case"
    parts_p, parts_m, parts_v = flat.copy(), m0.copy(), v0.copy()
    with engine_for(SHARD_CFG, parts_p) as engine:
        shares = sharded_step(engine, gradient, count, parts_m, parts_v, cuts, **settings)
    assert all(n == norm or (math.isnan(n) and math.isnan(norm)) for n, _ in shares), shares
    assert all(a == applied for _, a in shares)
    assert parts_p.tobytes() == whole_p.tobytes()
    assert parts_m.tobytes() == whole_m.tobytes() and parts_v.tobytes() == whole_v.tobytes()
    assert (whole_p.tobytes() == flat.tobytes()) == overflow, "the step changed nothing"


def test_a_share_refuses_buffers_of_another_size():
    flat = make_params(SHARD_CFG, seed=64)
    chunks = _engine.optimizer_chunks(SHARD_CFG)
    span = int(chunks[1, 0] + chunks[1, 1] - chunks[0, 0])
    g = np.zeros(span, np.float32)
    with engine_for(SHARD_CFG, flat) as engine:
        with pytest.raises(ValueError, match="gradients do not match"):
            engine.mean_gradient_sumsq(g[1:], 1, 0, 2)
        with pytest.raises(ValueError, match="not within"):
            engine.mean_gradient_sumsq(g, 1, 1, len(chunks) + 1)
        with pytest.raises(ValueError, match="optimizer state"):
            engine.optimizer_update(g, g[1:], g, 0, 2, np.zeros(len(chunks)), adamw=True,
                                    lr=1e-2, weight_decay=0.0, grad_clip=0.0, t=1)
        with pytest.raises(ValueError, match="all"):
            engine.optimizer_update(g, g, g, 0, 2, np.zeros(2), adamw=True, lr=1e-2,
                                    weight_decay=0.0, grad_clip=0.0, t=1)


# ----------------------------------------------------------------------------------------
# determinism: threads and lock mode change nothing

@pytest.mark.parametrize("micro_batch", [1, 2])
def test_bit_identical_across_spheres_and_lock_modes(micro_batch):
    base = make_params(CFG, seed=29)
    windows = [make_windows(CFG, 7, 5, seed=30 + s) for s in range(2)]
    outcomes = []
    for spheres, mode in [(1, "shared"), (2, "shared"), (3, "shared"), (5, "shared"),
                          (1, "exclusive"), (3, "exclusive"), (5, "exclusive")]:
        flat = base.copy()
        m = np.zeros(NP, np.float32)
        v = np.zeros(NP, np.float32)
        accs, losses, norms = [], [], []
        with engine_for(CFG, flat, spheres, micro_batch, lock_mode=mode) as engine:
            for t, w in enumerate(windows, start=1):       # two full AdamW steps
                results = run(engine, w, step=t - 1)
                accs.append(engine.accumulated_gradients())
                losses.append([(r[0], r[1], r[3]) for r in results])
                count = sum(r[1] for r in results)
                norms.append(engine.optimizer_step(count, m, v, adamw=True, lr=1e-2,
                                                   weight_decay=0.1, grad_clip=1.0, t=t)[0])
        outcomes.append(((spheres, mode), accs, losses, norms, flat, m, v))
    (_, accs0, losses0, norms0, flat0, m0, v0) = outcomes[0]
    assert not np.array_equal(flat0, base)
    for (who, accs, losses, norms, flat, m, v) in outcomes[1:]:
        for a, b in zip(accs, accs0):
            np.testing.assert_array_equal(a, b, err_msg=f"{who}: accumulated gradient")
        assert losses == losses0, who
        assert norms == norms0, who
        np.testing.assert_array_equal(flat, flat0, err_msg=f"{who}: parameters")
        np.testing.assert_array_equal(m, m0, err_msg=f"{who}: m")
        np.testing.assert_array_equal(v, v0, err_msg=f"{who}: v")


def test_work_is_shared_between_spheres():
    """With several spheres and many micro-batches, results name valid sphere ids."""
    flat = make_params(CFG, seed=31)
    windows = make_windows(CFG, 12, 5, seed=32)
    with engine_for(CFG, flat, 3, 1) as engine:
        results = run(engine, windows)
    assert len(results) == 12
    assert {r[2] for r in results} <= {0, 1, 2}


# ----------------------------------------------------------------------------------------
# learning-rate schedule

def schedule_cfg(**kw):
    base = dict(learning_rate=3e-3, warmup_steps=5, min_lr_ratio=0.1, lr_schedule="cosine")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("warmup, total, schedule, ratio", [
    (5, 40, "cosine", 0.1), (0, 17, "cosine", 0.1), (3, 10, "cosine", 0.0),
    (5, 40, "constant", 0.1), (0, 9, "constant", 0.1), (10, 10, "cosine", 0.1),
])
def test_lr_at_matches_reference(warmup, total, schedule, ratio):
    cfg = schedule_cfg(warmup_steps=warmup, lr_schedule=schedule, min_lr_ratio=ratio)
    for step in range(total):
        got = lr_at(step, total, cfg)
        want = ref.lr_at(step, total, 3e-3, warmup, ratio, schedule)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), step


def test_lr_warmup_is_linear_from_zero():
    cfg = schedule_cfg(warmup_steps=4)
    lrs = [lr_at(s, 100, cfg) for s in range(4)]
    assert lrs == pytest.approx([0.75e-3, 1.5e-3, 2.25e-3, 3e-3], rel=1e-12)
    assert lr_at(4, 100, cfg) == pytest.approx(3e-3, rel=1e-12)   # cosine starts at the peak


def test_lr_cosine_ends_at_min_ratio():
    cfg = schedule_cfg(warmup_steps=5, min_lr_ratio=0.1)
    total = 25
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    assert lrs[-1] == pytest.approx(0.1 * 3e-3, rel=1e-12)
    # half-way through the decay, the cosine is at the midpoint of peak and floor
    mid_cfg = schedule_cfg(warmup_steps=5)
    assert lr_at(15, 26, mid_cfg) == pytest.approx(0.55 * 3e-3, rel=1e-12)
    decay = lrs[5:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert min(lrs) >= 0.1 * 3e-3 * (1 - 1e-12)


def test_lr_constant_is_flat_after_warmup():
    cfg = schedule_cfg(lr_schedule="constant", warmup_steps=2)
    assert [lr_at(s, 10, cfg) for s in range(10)] == pytest.approx(
        [1.5e-3] + [3e-3] * 9, rel=1e-12)


# ----------------------------------------------------------------------------------------
# train_step and evaluate: the whole step in one call

STEP = dict(adamw=True, lr=1e-2, weight_decay=0.1, grad_clip=1.0)


def old_path_step(engine, windows, step, m, v, t):
    """The step in parts (start/wait/results/optimizer_step), summed the way trainer.py does."""
    results = run(engine, windows, step=step)
    valid = [r for r in results if r[3]]
    count = sum(r[1] for r in valid)
    loss_sum = 0.0
    for r in valid:
        loss_sum += r[0]
    norm, applied = engine.optimizer_step(count, m, v, t=t, **STEP) if count else (math.nan, False)
    return results, loss_sum, count, norm, applied


@pytest.mark.parametrize("spheres, micro_batch", [(1, 2), (3, 2), (2, 1)])
def test_train_step_is_the_step_in_parts(spheres, micro_batch):
    """train_step gives bit for bit the weights, AdamW state and figures of the old calls,
    a poisoned micro-batch included."""
    windows = [make_windows(CFG, 7, 5, seed=40 + s) for s in range(3)]
    outcomes = []
    for whole in (False, True):
        flat = make_params(CFG, seed=39)
        m, v = np.zeros(NP, np.float32), np.zeros(NP, np.float32)
        figures = []
        with engine_for(CFG, flat, spheres, micro_batch, faults=True) as engine:
            _engine_testing.inject_nan(engine, 1, 1)
            for step, w in enumerate(windows):
                if whole:
                    r = engine.train_step(w, step, m, v, t=step + 1, **STEP)
                    figures.append((r.loss_sum, r.tokens, r.grad_norm, r.applied,
                                    [(b.step, b.index) for b in r.bad]))
                    assert r.micro_batches == -(-7 // micro_batch)
                    assert r.loss == r.loss_sum / r.tokens
                else:
                    results, loss_sum, count, norm, applied = old_path_step(
                        engine, w, step, m, v, step + 1)
                    figures.append((loss_sum, count, norm, applied,
                                    [(step, k) for k, r in enumerate(results) if not r[3]]))
        outcomes.append((flat, m, v, figures))
    (flat0, m0, v0, fig0), (flat1, m1, v1, fig1) = outcomes
    assert fig1 == fig0
    assert fig1[1][4] == [(1, 1)] and all(f[3] for f in fig1)
    np.testing.assert_array_equal(flat1, flat0)
    np.testing.assert_array_equal(m1, m0)
    np.testing.assert_array_equal(v1, v0)


def test_train_step_reports_the_bad_micro_batch():
    flat = make_params(CFG, seed=41)
    windows = make_windows(CFG, 5, 5, seed=42)
    m, v = np.zeros(NP, np.float32), np.zeros(NP, np.float32)
    with engine_for(CFG, flat, 2, 2, faults=True) as engine:
        _engine_testing.inject_nan(engine, 3, 2)
        result = engine.train_step(windows, 3, m, v, t=1, **STEP)
    assert result.applied and math.isfinite(result.grad_norm)
    [bad] = result.bad
    assert (bad.step, bad.index, bad.loss_finite) == (3, 2, True) and bad.sphere in (0, 1)
    # inject_nan poisons the element in the middle of the buffer
    assert bad.tensor == _engine.tensor_at(CFG, NP // 2)
    _, counted, _ = reference_sum_grads(CFG, flat, windows[:4])     # micro-batches 0 and 1
    assert result.tokens == counted and result.micro_batches == 3


def test_train_step_without_a_valid_micro_batch_changes_nothing():
    flat = make_params(CFG, seed=43)
    windows = make_windows(CFG, 3, 5, seed=44)
    before = flat.copy()
    m, v = np.full(NP, 0.5, np.float32), np.full(NP, 0.25, np.float32)
    with engine_for(CFG, flat, 2, 3, faults=True) as engine:
        _engine_testing.inject_nan(engine, 0, 0)
        result = engine.train_step(windows, 0, m, v, t=1, **STEP)
        # a step whose micro-batches are valid but count no target: the optimiser does not run
        padded = windows.copy()
        padded[:, 1:] = 0
        empty = engine.train_step(padded, 1, m, v, t=1, **STEP)
    assert not result.applied and result.tokens == 0 and len(result.bad) == 1
    assert math.isnan(result.loss) and math.isnan(result.grad_norm)
    assert not empty.applied and empty.tokens == 0 and not empty.bad
    assert math.isnan(empty.loss) and math.isnan(empty.grad_norm)
    np.testing.assert_array_equal(flat, before)
    assert np.all(m == 0.5) and np.all(v == 0.25)


def test_train_step_stops_when_asked_and_the_engine_stays_usable():
    flat = make_params(CFG, seed=45)
    windows = make_windows(CFG, 8, 5, seed=46)
    before = flat.copy()
    m, v = np.zeros(NP, np.float32), np.zeros(NP, np.float32)
    asked = []

    def stop():
        asked.append(1)
        return True

    with engine_for(CFG, flat, 2, 1) as engine:
        with pytest.raises(_engine.StepAborted):
            engine.train_step(windows, 0, m, v, t=1, should_stop=stop, **STEP)
        assert asked and not m.any() and not v.any()
        np.testing.assert_array_equal(flat, before)

        def fail():
            raise KeyError("from should_stop")

        with pytest.raises(KeyError):
            engine.train_step(windows, 0, m, v, t=1, should_stop=fail, **STEP)
        np.testing.assert_array_equal(flat, before)
        with pytest.raises(_engine.StepAborted):
            engine.evaluate(windows, should_stop=stop)
        # the next step is a normal one
        result = engine.train_step(windows, 0, m, v, t=1, should_stop=lambda: False, **STEP)
    fresh = make_params(CFG, seed=45)
    m2, v2 = np.zeros(NP, np.float32), np.zeros(NP, np.float32)
    with engine_for(CFG, fresh, 2, 1) as engine:
        expected = engine.train_step(windows, 0, m2, v2, t=1, **STEP)
    assert result.applied and result.loss_sum == expected.loss_sum
    np.testing.assert_array_equal(flat, fresh)


def test_evaluate_runs_any_number_of_windows_in_slices():
    flat = make_params(CFG, seed=47)
    windows = make_windows(CFG, 11, 5, seed=48)
    before = flat.copy()
    with engine_for(CFG, flat, 2, 2, max_windows=4) as engine:
        loss_sum, tokens = engine.evaluate(windows)
        # the same sum as the slices run one by one, losses added in micro-batch order
        expected = 0.0
        for start in range(0, 11, 4):
            for r in run(engine, windows[start:start + 4], step=-1, train=False):
                expected += r[0]
        assert engine.evaluate(windows[:0]) == (0.0, 0)
        assert engine.epoch_stats() == (0.0, 0, 0), "evaluation is not training"
    ref_loss, ref_count, _ = reference_sum_grads(CFG, flat, windows)
    assert tokens == ref_count and loss_sum == expected
    assert loss_sum == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_array_equal(flat, before)


def test_epoch_and_sphere_statistics_come_from_the_step_results():
    flat = make_params(CFG, seed=49)
    m, v = np.zeros(NP, np.float32), np.zeros(NP, np.float32)
    with engine_for(CFG, flat, 3, 2, faults=True) as engine:
        _engine_testing.inject_nan(engine, 1, 0)
        engine.begin_epoch()
        results = [engine.train_step(make_windows(CFG, 7, 5, seed=50 + s), s, m, v, t=s + 1,
                                     **STEP) for s in range(3)]
        epoch_loss, epoch_tokens, total = engine.epoch_stats()
        spheres = engine.sphere_stats()
    assert total == sum(r.micro_batches for r in results) == 12
    assert epoch_tokens == sum(r.tokens for r in results)
    assert epoch_loss == pytest.approx(sum(r.loss_sum for r in results), rel=1e-12)
    assert sum(s["micro_batches"] for s in spheres) == total
    assert sum(s["tokens"] for s in spheres) == epoch_tokens
    assert sum(s["loss_sum"] for s in spheres) == pytest.approx(epoch_loss, rel=1e-12)


@pytest.mark.parametrize("pad_id", [-1, 0, 4])
def test_pad_id_sets_the_ignored_target(pad_id):
    """pad_id -1 counts every target (id 0 is a real token in GPT-2's vocabulary)."""
    flat = make_params(CFG, seed=51)
    windows = make_windows(CFG, 4, 5, seed=52, pad_frac=0.3)
    windows[0, 2] = 4
    m, v = np.zeros(NP, np.float32), np.zeros(NP, np.float32)
    engine = _engine.Engine(CFG, flat.copy(), 2, 2, 4, pad_id=pad_id)
    try:
        result = engine.train_step(windows, 0, m, v, t=1, **STEP)
        loss_sum, tokens = engine.evaluate(windows)
    finally:
        engine.close()
    p64 = {k: g.astype(np.float64) for k, g in ref.unflatten(flat, CFG).items()}
    ref_loss, ref_count, _ = ref.loss_and_grads(p64, CFG, windows[:, :-1], windows[:, 1:], pad_id)
    assert ref_count == int((windows[:, 1:] != pad_id).sum())
    assert result.tokens == tokens == ref_count
    assert result.loss_sum == pytest.approx(ref_loss, rel=1e-5)
    grads = np.zeros_like(flat)
    direct = _engine.loss_and_grads(CFG, flat, np.ascontiguousarray(windows[:, :-1]),
                                    np.ascontiguousarray(windows[:, 1:]), grads, pad_id)
    assert direct[1] == ref_count and direct[0] == pytest.approx(ref_loss, rel=1e-5)


def test_engine_refuses_bad_arguments():
    flat = make_params(CFG, seed=53)
    with pytest.raises(ValueError):
        _engine.Engine(CFG, flat, 1, 1, 4, pad_id=CFG.vocab_size)
    with pytest.raises(ValueError):
        _engine.Engine(CFG, flat[:-1], 1, 1, 4)
    with pytest.raises(TypeError):
        _engine.Engine((11, 8, 2, 2, 12, 5), flat, 1, 1, 4)
    with engine_for(CFG, flat, 1, 1, max_windows=4) as engine:
        m = np.zeros(NP - 1, np.float32)
        with pytest.raises(ValueError):
            engine.train_step(make_windows(CFG, 2, 5, seed=54), 0, m, m, t=1, **STEP)
        with pytest.raises(ValueError):     # more windows than max_windows
            engine.train_step(make_windows(CFG, 5, 5, seed=54), 0, None, None, t=1,
                              **dict(STEP, adamw=False))
        # SGD has no optimiser state to pass
        assert engine.train_step(make_windows(CFG, 4, 5, seed=54), 0, None, None, t=1,
                                 **dict(STEP, adamw=False)).applied
    engine.close()
    with pytest.raises(RuntimeError):
        engine.evaluate(make_windows(CFG, 2, 5, seed=55))
