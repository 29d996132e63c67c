"""Tests that the numpy reference model (tests/reference.py) is itself right."""
import math

import numpy as np
import pytest
import reference as ref

from cllm_cli._engine import num_parameters, parameter_layout


def make_batch(cfg, B, n, seed, n_pad=0):
    """Random inputs/targets [B, n]; n_pad random targets set to 0 (<pad>)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, cfg.vocab_size, size=(B, n))
    targets = rng.integers(1, cfg.vocab_size, size=(B, n))
    if n_pad:
        flat = targets.reshape(-1)
        flat[rng.choice(flat.size, size=n_pad, replace=False)] = 0
    return inputs, targets


def numerical_grads(params, cfg, inputs, targets, eps=3e-5):
    """Central finite differences of loss_sum for every element of every tensor.
    eps 3e-5 balances round-off (~1e-16 * loss / eps) and truncation (~eps^2) error."""
    grads = {}
    for name, _, _ in parameter_layout(cfg):
        w = params[name]
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            old = w[idx]
            w[idx] = old + eps
            lp = ref.forward(params, cfg, inputs, targets)[0]
            w[idx] = old - eps
            lm = ref.forward(params, cfg, inputs, targets)[0]
            w[idx] = old
            g[idx] = (lp - lm) / (2 * eps)
        grads[name] = g
    return grads


@pytest.mark.parametrize("n, n_pad, std", [
    (5, 3, 0.02),   # full window, some pad targets, training-like scale
    (3, 2, 0.3),    # n < T, larger weights: non-uniform attention, non-linear gelu
])
def test_backward_matches_finite_differences(n, n_pad, std, tiny_config):
    cfg = tiny_config
    params = ref.init_params(cfg, seed=1, std=std)
    inputs, targets = make_batch(cfg, B=2, n=n, seed=2, n_pad=n_pad)
    loss, count, grads = ref.loss_and_grads(params, cfg, inputs, targets)
    assert count == 2 * n - n_pad and loss > 0
    num = numerical_grads(params, cfg, inputs, targets)
    assert set(grads) == {name for name, _, _ in parameter_layout(cfg)}
    for name, shape, _ in parameter_layout(cfg):
        g, gn = grads[name], num[name]
        assert g.shape == shape and g.dtype == np.float64
        scale = np.abs(g).max()
        assert scale > 0, f"{name}: gradient is all zero"
        rel = np.abs(g - gn).max() / scale
        assert rel < 1e-6, f"{name}: max rel error {rel:.2e}"
    if n < cfg.seq_len:  # unused positions get exactly nothing
        assert not grads["wpe"][n:].any()


def test_all_pad_targets_give_zero_loss_and_grads(tiny_config):
    params = ref.init_params(tiny_config, seed=3)
    inputs, _ = make_batch(tiny_config, B=2, n=4, seed=4)
    loss, count, grads = ref.loss_and_grads(params, tiny_config, inputs, np.zeros_like(inputs))
    assert loss == 0.0 and count == 0
    for name, g in grads.items():
        assert not g.any(), name


def test_loss_matches_logits(tiny_config):
    params = ref.init_params(tiny_config, seed=5, std=0.3)
    inputs, targets = make_batch(tiny_config, B=3, n=5, seed=6, n_pad=4)
    loss, count, _ = ref.forward(params, tiny_config, inputs, targets)
    lg = ref.logits(params, tiny_config, inputs)
    assert lg.shape == (3, 5, tiny_config.vocab_size)
    expected = 0.0
    for b in range(3):
        for t in range(5):
            if targets[b, t]:
                row = lg[b, t]
                expected += math.log(np.exp(row).sum()) - row[targets[b, t]]
    assert count == 15 - 4
    assert loss == pytest.approx(expected, rel=1e-12)


def test_causality(tiny_config):
    params = ref.init_params(tiny_config, seed=7, std=0.3)
    inputs, _ = make_batch(tiny_config, B=2, n=5, seed=8)
    base = ref.logits(params, tiny_config, inputs)
    for j in range(5):
        changed = inputs.copy()
        changed[:, j] = (changed[:, j] + 1) % tiny_config.vocab_size
        out = ref.logits(params, tiny_config, changed)
        np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=1e-13, atol=1e-13)
        assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-6  # later positions do change


def loop_logits(params, cfg, inputs):
    """Alternative forward: one position and one head at a time, explicit loops."""
    C, H = cfg.embed_dim, cfg.num_heads
    hs = C // H

    def ln(x, w, b):
        mu = sum(x) / len(x)
        var = sum((xi - mu) ** 2 for xi in x) / len(x)
        return np.array([(xi - mu) / math.sqrt(var + 1e-5) for xi in x]) * w + b

    def gelu(u):
        return np.array([0.5 * ui * (1 + math.tanh(math.sqrt(2 / math.pi) * (ui + 0.044715 * ui ** 3)))
                         for ui in u])

    B, n = inputs.shape
    out = np.zeros((B, n, cfg.vocab_size))
    for b in range(B):
        xs = [params["wte"][inputs[b, t]] + params["wpe"][t] for t in range(n)]
        for l in range(cfg.num_layers):
            p = f"h.{l}."
            qkv = [params[p + "attn.c_attn.weight"] @ ln(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"])
                   + params[p + "attn.c_attn.bias"] for x in xs]
            new = []
            for t in range(n):
                y = np.zeros(C)
                for h in range(H):
                    sl = slice(h * hs, (h + 1) * hs)
                    q = qkv[t][:C][sl]
                    scores = [float(q @ qkv[s][C:2 * C][sl]) / math.sqrt(hs) for s in range(t + 1)]
                    mx = max(scores)
                    e = [math.exp(sc - mx) for sc in scores]
                    for s in range(t + 1):
                        y[sl] += e[s] / sum(e) * qkv[s][2 * C:][sl]
                x = xs[t] + params[p + "attn.c_proj.weight"] @ y + params[p + "attn.c_proj.bias"]
                u = params[p + "mlp.c_fc.weight"] @ ln(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"]) \
                    + params[p + "mlp.c_fc.bias"]
                x = x + params[p + "mlp.c_proj.weight"] @ gelu(u) + params[p + "mlp.c_proj.bias"]
                new.append(x)
            xs = new
        for t in range(n):
            out[b, t] = params["wte"] @ ln(xs[t], params["ln_f.weight"], params["ln_f.bias"])
    return out


@pytest.mark.parametrize("std, n", [(0.02, 5), (0.5, 5), (0.5, 2)])
def test_vectorised_logits_match_loop(std, n, tiny_config):
    params = ref.init_params(tiny_config, seed=9, std=std)
    inputs, _ = make_batch(tiny_config, B=2, n=n, seed=10)
    np.testing.assert_allclose(ref.logits(params, tiny_config, inputs), loop_logits(params, tiny_config, inputs),
                               rtol=1e-10, atol=1e-12)


def test_zero_weights_give_uniform_attention_and_equal_logits(tiny_config):
    """With all block weights zero the blocks add only their biases: check by hand."""
    params = ref.init_params(tiny_config, seed=11)
    for name in params:
        if name.startswith("h."):
            params[name][...] = 0.0
    inputs, _ = make_batch(tiny_config, B=1, n=4, seed=12)
    x = params["wte"][inputs] + params["wpe"][:4]
    mu = x.mean(-1, keepdims=True)
    xhat = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    expected = (xhat * params["ln_f.weight"] + params["ln_f.bias"]) @ params["wte"].T
    np.testing.assert_allclose(ref.logits(params, tiny_config, inputs), expected, rtol=1e-12, atol=1e-14)


def test_sequence_longer_than_seq_len_is_refused(tiny_config):
    params = ref.init_params(tiny_config, seed=0)
    with pytest.raises(ValueError):
        ref.logits(params, tiny_config, np.ones((1, tiny_config.seq_len + 1), dtype=np.int64))


# ---------------------------------------------------------------------------- optimiser

def test_decay_mask_marks_2d_tensors(tiny_config):
    mask = ref.decay_mask(tiny_config)
    assert mask.dtype == bool and mask.size == num_parameters(tiny_config)
    flat = ref.unflatten(mask, tiny_config)
    for name, shape, _ in parameter_layout(tiny_config):
        assert flat[name].all() == (len(shape) == 2) and flat[name].any() == (len(shape) == 2), name


def test_sgd_step_is_minus_gradient_with_lr_1(tiny_config):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(num_parameters(tiny_config)).astype(np.float32)
    g = rng.standard_normal(p.size).astype(np.float32)
    mask = ref.decay_mask(tiny_config)
    np.testing.assert_array_equal(p - ref.sgd_reference(p, g, 1.0, 0.0, mask), p - (p - g))
    q = ref.sgd_reference(p, g, 0.1, 0.5, mask)
    expected = np.where(mask, p * np.float32(1 - 0.05), p) - np.float32(0.1) * g
    np.testing.assert_array_equal(q, expected)


def test_adamw_first_step_and_decay(tiny_config):
    rng = np.random.default_rng(1)
    size = num_parameters(tiny_config)
    p = rng.standard_normal(size).astype(np.float32)
    g = rng.standard_normal(size).astype(np.float32)
    z = np.zeros(size, np.float32)
    mask = ref.decay_mask(tiny_config)
    # first step without decay moves every weight by ~lr * sign(g)
    p1, m1, v1 = ref.adamw_reference(p, g, z, z, 1, 1e-3, 0.0, mask)
    assert p1.dtype == m1.dtype == v1.dtype == np.float32
    np.testing.assert_allclose(p - p1, 1e-3 * np.sign(g), rtol=1e-4)
    np.testing.assert_allclose(m1, 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(v1, 0.05 * g * g, rtol=1e-6)
    # decay only shrinks 2-D tensors: zero gradient isolates it
    p2, _, _ = ref.adamw_reference(p, z, z, z, 1, 0.1, 0.5, mask)
    np.testing.assert_allclose(p2, np.where(mask, p * 0.95, p), rtol=1e-6)
    # second step against a float64 computation
    p3, m3, v3 = ref.adamw_reference(p1, g, m1, v1, 2, 1e-3, 0.01, mask)
    m = 0.9 * m1.astype(np.float64) + 0.1 * g
    v = 0.95 * v1.astype(np.float64) + 0.05 * g.astype(np.float64) ** 2
    pd = np.where(mask, p1 * (1 - 1e-5), p1) - 1e-3 * (m / 0.19) / (np.sqrt(v / (1 - 0.95 ** 2)) + 1e-8)
    np.testing.assert_allclose(p3, pd, rtol=1e-5, atol=1e-7)


def test_lr_schedule():
    lr = 1e-3
    # warm-up is linear, reaching lr at step warmup-1
    assert [ref.lr_at(s, 100, lr, 4, 0.1, "cosine") for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert ref.lr_at(4, 100, lr, 4, 0.1, "cosine") == pytest.approx(lr)
    assert ref.lr_at(99, 100, lr, 4, 0.1, "cosine") == pytest.approx(1e-4)   # last step: min lr
    assert ref.lr_at(200, 100, lr, 4, 0.1, "cosine") == pytest.approx(1e-4)  # clamped
    mid = 4 + (99 - 4) / 2
    assert ref.lr_at(mid, 100, lr, 4, 0.1, "cosine") == pytest.approx(0.55e-3)
    lrs = [ref.lr_at(s, 100, lr, 4, 0.1, "cosine") for s in range(4, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert ref.lr_at(0, 10, lr, 0, 0.1, "cosine") == lr
    assert ref.lr_at(0, 1, lr, 0, 0.1, "cosine") == lr
    assert ref.lr_at(1, 10, lr, 2, 0.1, "constant") == lr
    assert ref.lr_at(0, 10, lr, 2, 0.1, "constant") == lr / 2
    assert ref.lr_at(9, 10, lr, 0, 0.1, "constant") == lr


def test_clip():
    g = np.array([3.0, 4.0], np.float32)
    c, norm = ref.clip_reference(g, 1.0)
    assert norm == 5.0 and c.dtype == np.float32
    np.testing.assert_allclose(c, [0.6, 0.8], rtol=1e-7)
    c, norm = ref.clip_reference(g, 10.0)
    np.testing.assert_array_equal(c, g)
    c, norm = ref.clip_reference(g, 0.0)   # 0 disables
    assert norm == 5.0
    np.testing.assert_array_equal(c, g)
    assert g[0] == 3.0  # input untouched
