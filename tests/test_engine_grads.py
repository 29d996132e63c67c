"""The Cython engine's forward and backward against the float64 numpy
reference (tests/reference.py) and against finite differences taken on the engine itself;
CLLMModel's mean loss, initialisation, parameter views and input checks."""
import math

import numpy as np
import pytest
import reference as ref
from engine_cases import CASES, CFG_A, CFG_B, CFG_E, CONFIGS, REL_TOL, engine_grads, make_batch, make_params

from cllm_cli import _engine
from cllm_cli._engine import num_parameters, parameter_layout
from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig

# rows per classifier block: the engine's choice (0), and 7, which divides none of the
# cases' B * n (e.g. 160 rows of D in 22 full blocks and one of 6)
BLOCK_ROWS = [0, 7]


@pytest.mark.parametrize("block_rows", BLOCK_ROWS)
@pytest.mark.parametrize("key, B, n, pad_rows", CASES)
def test_gradients_match_reference(key, B, n, pad_rows, block_rows):
    cfg = CONFIGS[key]
    flat, p64 = make_params(cfg, seed=B * 10 + n)
    inputs, targets = make_batch(cfg, B, n, seed=B * 100 + n, pad_rows=pad_rows)
    loss, counted, grads = engine_grads(cfg, flat, inputs, targets, block_rows)
    rloss, rcount, rgrads = ref.loss_and_grads(p64, cfg, inputs, targets)
    assert counted == rcount == int((targets != 0).sum())
    assert loss == pytest.approx(rloss, rel=1e-5, abs=1e-5)
    views = ref.unflatten(grads, cfg)
    for name, shape, _ in parameter_layout(cfg):
        g, r = views[name], rgrads[name]
        assert g.shape == r.shape == shape
        assert np.all(np.isfinite(g)), name
        scale = np.abs(r).max()
        if name == "wpe" and n < cfg.seq_len:
            # positions n..T-1 are not used: their gradient is exactly zero
            assert np.all(g[n:] == 0), f"{name}: unused positions got a gradient"
        assert scale > 0, f"{name}: the reference gradient is zero, the case tests nothing"
        err = np.abs(g - r).max()
        assert err <= REL_TOL * scale, f"{name}: max error {err:.3g} vs max |grad| {scale:.3g}"


def test_all_pad_rows_contribute_nothing():
    """A batch whose extra rows are all <pad> has the same loss and gradient as without
    them (gradients of the sum), and an all-pad batch has zero loss and zero gradient."""
    cfg = CFG_A
    flat, _ = make_params(cfg, seed=3)
    inputs, targets = make_batch(cfg, 1, 5, seed=4)
    extra_in = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 5)).astype(np.int32)
    big_in = np.ascontiguousarray(np.concatenate([extra_in[:1], inputs, extra_in[1:]]))
    big_tg = np.ascontiguousarray(np.concatenate([np.zeros((1, 5), np.int32), targets,
                                                  np.zeros((1, 5), np.int32)]))
    l1, c1, g1 = engine_grads(cfg, flat, inputs, targets)
    l3, c3, g3 = engine_grads(cfg, flat, big_in, big_tg)
    assert c1 == c3 and l1 == pytest.approx(l3, rel=1e-6)
    np.testing.assert_allclose(g3, g1, rtol=1e-5, atol=1e-6 * np.abs(g1).max())
    l0, c0, g0 = engine_grads(cfg, flat, inputs, np.zeros_like(targets))
    assert c0 == 0 and l0 == 0.0 and not np.any(g0)


def test_engine_overwrites_grads_out():
    # the backward pass writes every element, so a dirty buffer (and NaN in it) is fine
    cfg = CFG_A
    flat, _ = make_params(cfg, seed=6)
    inputs, targets = make_batch(cfg, 2, 5, seed=7)
    _, _, g = engine_grads(cfg, flat, inputs, targets)
    dirty = np.full_like(flat, np.nan)
    _engine.loss_and_grads(cfg, flat, inputs, targets, dirty)
    np.testing.assert_array_equal(dirty, g)


# ----------------------------------------------------------------------------------------
# finite differences on the engine itself (no reference involved)

@pytest.mark.parametrize("n, pad_rows", [(5, (1,)), (3, ())])
def test_gradients_match_finite_differences(n, pad_rows, tiny_config):
    cfg = tiny_config
    flat, _ = make_params(cfg, seed=11, std=0.3)
    inputs, targets = make_batch(cfg, 2, n, seed=12, pad_rows=pad_rows)
    _, _, grads = engine_grads(cfg, flat, inputs, targets)
    scratch = np.zeros_like(flat)
    rng = np.random.default_rng(13)
    eps = np.float32(1e-2)

    def loss_at(buf):
        return _engine.loss_and_grads(cfg, buf, inputs, targets, scratch)[0]

    checked = 0
    for name, shape, off in parameter_layout(cfg):
        size = math.prod(shape)
        if name == "wpe":
            # only the used positions have a non-trivial gradient
            candidates = np.arange(n * cfg.embed_dim)
        elif name == "wte":
            # rows of tokens that occur as inputs get both input and output gradients
            used = np.unique(inputs)
            candidates = (used[:, None] * cfg.embed_dim + np.arange(cfg.embed_dim)).ravel()
        else:
            candidates = np.arange(size)
        picks = rng.choice(candidates, size=min(4, candidates.size), replace=False)
        for k in picks:
            i = off + int(k)
            buf = flat.copy()
            old = buf[i]
            buf[i] = old + eps
            hi = float(buf[i])
            lp = loss_at(buf)
            buf[i] = old - eps
            lo = float(buf[i])
            lm = loss_at(buf)
            numeric = (lp - lm) / (hi - lo)
            analytic = float(grads[i])
            assert abs(numeric - analytic) <= 2e-2 * abs(numeric) + 2e-3, \
                f"{name}[{k}]: engine gradient {analytic:.6g}, finite difference {numeric:.6g}"
            checked += 1
    assert checked >= 4 * len(parameter_layout(cfg)) - 8


# ----------------------------------------------------------------------------------------
# logits

@pytest.mark.parametrize("key, B, n", [("A", 1, 5), ("A", 3, 2), ("B", 2, 7), ("C", 3, 4),
                                       ("E", 1, 450)])
def test_logits_match_reference(key, B, n):
    cfg = CONFIGS[key]
    flat, p64 = make_params(cfg, seed=20 + n)
    inputs, _ = make_batch(cfg, B, n, seed=21)
    out = np.empty((B, n, cfg.vocab_size), np.float32)
    _engine.forward_logits(cfg, flat, inputs, out)
    expected = ref.logits(p64, cfg, inputs)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    model = CLLMModel.from_flat(cfg, flat)
    np.testing.assert_array_equal(model.logits(inputs), out)


def test_logits_are_causal():
    """Changing a later token leaves the logits of earlier positions untouched."""
    cfg = CFG_B
    flat, _ = make_params(cfg, seed=30)
    model = CLLMModel.from_flat(cfg, flat)
    inputs, _ = make_batch(cfg, 1, 7, seed=31)
    changed = inputs.copy()
    changed[0, 4] = (changed[0, 4] + 1) % cfg.vocab_size
    a, b = model.logits(inputs), model.logits(changed)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


# ----------------------------------------------------------------------------------------
# CLLMModel

def test_model_loss_and_grads_are_means():
    cfg = CFG_A
    flat, p64 = make_params(cfg, seed=40)
    model = CLLMModel.from_flat(cfg, flat.copy())
    inputs, targets = make_batch(cfg, 3, 5, seed=41, pad_rows=(2,))
    loss, grads = model.loss_and_grads(inputs, targets, pad_id=0)
    rloss, count, rgrads = ref.loss_and_grads(p64, cfg, inputs, targets)
    assert 1 < count < targets.size
    assert loss == pytest.approx(rloss / count, rel=1e-5)
    assert set(grads) == {name for name, _, _ in parameter_layout(cfg)}
    for name, shape, _ in parameter_layout(cfg):
        assert grads[name].shape == shape
        expected = rgrads[name] / count
        scale = np.abs(expected).max()
        assert np.abs(grads[name] - expected).max() <= REL_TOL * scale, name
    # the model's parameters are not changed by computing gradients
    np.testing.assert_array_equal(model.flat, flat)


def test_model_loss_with_no_counted_target_is_zero():
    cfg = CFG_A
    model = CLLMModel(cfg, seed=1)
    inputs, _ = make_batch(cfg, 2, 4, seed=42)
    loss, grads = model.loss_and_grads(inputs, np.zeros_like(inputs), pad_id=0)
    assert loss == 0 and all(not np.any(g) for g in grads.values())


def test_model_negative_targets_beyond_int32_are_not_counted():
    """A negative target is not counted, however far below 0: -2**32 + 5 once became
    target 5 when the int64 labels were cut to int32."""
    cfg = CFG_A
    model = CLLMModel(cfg, seed=1)
    inputs, _ = make_batch(cfg, 2, 4, seed=42)
    for far in (-2**31 - 1, -2**32, -2**32 + 5, np.iinfo(np.int64).min):
        loss, grads = model.loss_and_grads(inputs, np.full(inputs.shape, far, dtype=np.int64))
        assert loss == 0 and all(not np.any(g) for g in grads.values()), far


def test_model_accepts_1d_and_int64_inputs():
    cfg = CFG_B
    model = CLLMModel(cfg, seed=2)
    inputs, targets = make_batch(cfg, 1, 6, seed=43)
    l2, g2 = model.loss_and_grads(inputs, targets)
    l1, g1 = model.loss_and_grads(inputs[0].astype(np.int64), targets[0].astype(np.int64))
    assert l1 == l2
    for name in g2:
        np.testing.assert_array_equal(g1[name], g2[name])


def test_model_init_follows_spec():
    cfg = CLLMConfig(vocab_size=300, embed_dim=64, num_layers=3, num_heads=4, seq_len=32)
    model = CLLMModel(cfg, seed=7)
    assert model.flat.dtype == np.float32 and model.flat.size == num_parameters(cfg)
    assert set(model.params) == {name for name, _, _ in parameter_layout(cfg)}
    proj_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    for name, shape, _ in parameter_layout(cfg):
        w = model.params[name]
        assert w.shape == shape, name
        if len(shape) == 2:
            std = proj_std if name.endswith("c_proj.weight") else 0.02
            assert abs(float(w.mean())) < 4 * std / math.sqrt(w.size), name
            assert float(w.std()) == pytest.approx(std, rel=0.15), name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            assert np.all(w == 1.0), name
        else:
            assert np.all(w == 0.0), name   # biases and LayerNorm biases
    # the c_proj weights are really smaller than the others
    assert model.params["h.0.mlp.c_proj.weight"].std() < 0.6 * model.params["h.0.mlp.c_fc.weight"].std()


def test_model_init_is_seeded():
    cfg = CFG_B
    a, b, c = CLLMModel(cfg, seed=5), CLLMModel(cfg, seed=5), CLLMModel(cfg, seed=6)
    np.testing.assert_array_equal(a.flat, b.flat)
    assert not np.array_equal(a.flat, c.flat)
    for name, shape, _ in parameter_layout(cfg):
        if len(shape) == 2:
            assert not np.array_equal(a.params[name], c.params[name]), name


def test_params_are_views_into_flat(tiny_config, tiny_model):
    cfg, model = tiny_config, tiny_model
    for name, shape, off in parameter_layout(cfg):
        view = model.params[name]
        assert np.shares_memory(view, model.flat), name
        first = np.unravel_index(0, shape)
        view[first] = 123.0
        assert model.flat[off] == 123.0, name
        model.flat[off + view.size - 1] = -7.0
        assert view.reshape(-1)[-1] == -7.0, name
    # and the engine sees a change made through a view
    inputs, targets = make_batch(cfg, 1, 5, seed=50)
    before = model.logits(inputs)
    model.params["ln_f.bias"][:] += 1.0
    after = model.logits(inputs)
    assert not np.array_equal(before, after)


@pytest.mark.parametrize("bad", ["id_high", "id_negative", "too_long", "target_high"])
def test_bad_inputs_raise_value_error(bad, tiny_config, tiny_model):
    cfg, model = tiny_config, tiny_model
    inputs, targets = make_batch(cfg, 2, 4, seed=60)
    if bad == "id_high":
        inputs[1, 2] = cfg.vocab_size
    elif bad == "id_negative":
        inputs[0, 0] = -1
    elif bad == "too_long":
        inputs = np.ones((2, cfg.seq_len + 1), np.int32)
        targets = np.ones((2, cfg.seq_len + 1), np.int32)
    else:
        targets[0, 1] = cfg.vocab_size
    with pytest.raises(ValueError):
        model.loss_and_grads(inputs, targets)
    if bad in ("id_high", "id_negative", "too_long"):
        with pytest.raises(ValueError):
            model.logits(inputs)


def test_engine_rejects_bad_inputs_directly():
    cfg = CFG_A
    flat, _ = make_params(cfg)
    grads = np.zeros_like(flat)
    good = np.ones((1, 3), np.int32)
    high = np.full((1, 3), cfg.vocab_size, np.int32)
    long = np.ones((1, cfg.seq_len + 1), np.int32)
    with pytest.raises(ValueError):
        _engine.loss_and_grads(cfg, flat, high, good, grads)
    with pytest.raises(ValueError):
        _engine.loss_and_grads(cfg, flat, good, high, grads)
    with pytest.raises(ValueError):
        _engine.loss_and_grads(cfg, flat, long, long, grads)
    with pytest.raises(ValueError):
        _engine.loss_and_grads(cfg, flat, good, np.ones((1, 2), np.int32), grads)
    with pytest.raises(ValueError):
        _engine.loss_and_grads(cfg, flat[:-1], good, good, grads[:-1])
    with pytest.raises(ValueError):
        _engine.forward_logits(cfg, flat, high, np.empty((1, 3, cfg.vocab_size), np.float32))
    with pytest.raises(ValueError):
        _engine.forward_logits(cfg, flat, long,
                               np.empty((1, cfg.seq_len + 1, cfg.vocab_size), np.float32))
    assert not np.any(grads)   # nothing was written by the refused calls


# ----------------------------------------------------------------------------------------
# the engine's layout tables

LAYOUT_CFG = CLLMConfig(vocab_size=13, embed_dim=8, num_layers=2, num_heads=2, ff_dim=20,
                        seq_len=6)


def test_parameter_layout_is_spec_section_1():
    """The GPT-2 parameter tensors written out by hand for LAYOUT_CFG (V 13, d 8, L 2, F 20,
    T 6): names, shapes and buffer order. The one place the engine's table is checked against
    a list not derived from it."""
    spec = [("wte", (13, 8)), ("wpe", (6, 8))]
    for l in range(2):
        spec += [(f"h.{l}.ln_1.weight", (8,)), (f"h.{l}.ln_1.bias", (8,)),
                 (f"h.{l}.attn.c_attn.weight", (24, 8)), (f"h.{l}.attn.c_attn.bias", (24,)),
                 (f"h.{l}.attn.c_proj.weight", (8, 8)), (f"h.{l}.attn.c_proj.bias", (8,)),
                 (f"h.{l}.ln_2.weight", (8,)), (f"h.{l}.ln_2.bias", (8,)),
                 (f"h.{l}.mlp.c_fc.weight", (20, 8)), (f"h.{l}.mlp.c_fc.bias", (20,)),
                 (f"h.{l}.mlp.c_proj.weight", (8, 20)), (f"h.{l}.mlp.c_proj.bias", (8,))]
    spec += [("ln_f.weight", (8,)), ("ln_f.bias", (8,))]
    offsets = np.cumsum([0] + [math.prod(shape) for _, shape in spec])
    expected = [(name, shape, int(off)) for (name, shape), off in zip(spec, offsets)]
    assert _engine.parameter_layout(LAYOUT_CFG) == expected
    assert _engine.num_parameters(LAYOUT_CFG) == offsets[-1] == 1504


def test_tensor_at_names_the_tensor_of_every_element():
    cfg = LAYOUT_CFG
    for name, shape, off in _engine.parameter_layout(cfg):
        assert _engine.tensor_at(cfg, off) == name
        assert _engine.tensor_at(cfg, off + math.prod(shape) - 1) == name
    for outside in (-1, _engine.num_parameters(cfg)):
        with pytest.raises(IndexError):
            _engine.tensor_at(cfg, outside)


def test_optimizer_chunks_cut_every_tensor_in_pieces():
    """Pieces of at most 16384 floats that never cross a tensor, decay on 2-D tensors; wte
    (300 x 64 = 19200 floats) takes two."""
    cfg = CLLMConfig(vocab_size=300, embed_dim=64, num_layers=2, num_heads=4, seq_len=16)
    chunks = _engine.optimizer_chunks(cfg)
    assert chunks.dtype == np.int64 and chunks.ndim == 2 and chunks.shape[1] == 3
    expected = []
    for _, shape, off in _engine.parameter_layout(cfg):
        size = math.prod(shape)
        for start in range(0, size, 16384):
            expected.append((off + start, min(16384, size - start), int(len(shape) == 2)))
    assert [tuple(r) for r in chunks.tolist()] == expected
    assert tuple(chunks[0]) == (0, 16384, 1) and tuple(chunks[1]) == (16384, 19200 - 16384, 1)
    assert chunks[-1, 0] + chunks[-1, 1] == _engine.num_parameters(cfg)


def test_optimizer_chunks_of_adapters_cover_their_buffer_in_order():
    """With adapters the chunks cut the adapter buffer, tensor after tensor without a gap
    (the shares of many processes are contiguous ranges of chunks); every adapter decays."""
    cfg = CLLMConfig(vocab_size=300, embed_dim=64, num_layers=2, num_heads=4, seq_len=16)
    lora = (96, 0b11, 192.0, 0.0)            # c_attn's A (96 x 64) and B (192 x 96) ...
    chunks = _engine.optimizer_chunks(cfg, lora)
    expected = []
    for _, shape, off in _engine.adapter_layout(cfg, lora[0], lora[1]):
        size = math.prod(shape)
        for start in range(0, size, 16384):
            expected.append((off + start, min(16384, size - start), 1))
    assert [tuple(r) for r in chunks.tolist()] == expected
    assert any(size == 16384 for _, size, _ in expected), "no tensor takes two chunks"
    ends = chunks[:, 0] + chunks[:, 1]
    assert chunks[0, 0] == 0 and (chunks[1:, 0] == ends[:-1]).all()
    assert ends[-1] == _engine.num_adapter_parameters(cfg, lora[0], lora[1])


def test_activation_layout_and_allocation():
    cfg = CLLMConfig(vocab_size=50, embed_dim=16, num_layers=3, num_heads=4, ff_dim=40,
                     seq_len=10)
    layout = _engine.activation_layout(cfg, 2)
    sizes = dict(layout)
    assert len(sizes) == len(layout), "activation names are unique"
    N = 2 * 10
    assert sizes["encoded"] == N * 16
    assert sizes["qkv"] == 3 * N * 3 * 16 and sizes["fch"] == 3 * N * 40
    # layer norms' and gelu's outputs are recomputed in backward: one block's worth
    assert sizes["ln"] == N * 16
    assert sizes["ln1_mean"] == sizes["ln2_rstd"] == 3 * N
    # attention keeps two floats per row and head, and one block of 32 query rows of scratch
    assert sizes["att_max"] == sizes["att_scale"] == 3 * N * 4
    assert sizes["att_probs"] == sizes["att_dprobs"] == 32 * 10
    # one place for the classifier's logits block (N x V here) and, never at the same time,
    # a block's gelu output (which its gradient replaces) and the gradient at its input
    # (N x max(W, F)), each aligned to 16 floats
    assert sizes["shared"] == max(N * 50, -(-N * 40 // 16) * 16 + N * max(3 * 16, 40))
    aligned = sum(-(-floats // 16) * 16 for _, floats in layout)
    assert _engine.activation_allocation(cfg, 2) == aligned + 16
    assert _engine.activation_allocation(cfg, 3) > _engine.activation_allocation(cfg, 2)


def test_classifier_blocks_hold_at_most_32_mb_of_logits():
    gpt2 = CLLMConfig(vocab_size=50257, embed_dim=768, num_layers=12, num_heads=12,
                      ff_dim=3072, seq_len=512)
    assert _engine.classifier_block_rows(gpt2, 4) == (1 << 23) // 50257 == 166
    # the logits block shares its place with one block's scratch, the larger of the two here
    assert dict(_engine.activation_layout(gpt2, 4))["shared"] == max(166 * 50257,
                                                                     2 * 4 * 512 * 3072)
    assert _engine.classifier_block_rows(CFG_E, 1) == 419
    assert _engine.classifier_block_rows(CFG_A, 2) == 2 * 5     # a whole micro-batch


def test_profile_buckets_name_the_profile():
    buckets = _engine.PROFILE_BUCKETS
    assert isinstance(buckets, tuple) and len(set(buckets)) == len(buckets)
    assert {"accumulate", "turn_wait", "optimizer"} <= set(buckets)
    cfg = CFG_A
    flat, _ = make_params(cfg, seed=70)
    windows = np.random.default_rng(71).integers(1, cfg.vocab_size, (4, 6)).astype(np.int32)
    m = np.zeros_like(flat)
    with _engine.Engine(cfg, flat, 2, 1, 4) as engine:
        engine.set_profile(True)
        engine.train_step(windows, 0, m, m.copy(), adamw=True, lr=1e-3, weight_decay=0.0,
                          grad_clip=1.0, t=1)
        profile = engine.profile()
    assert tuple(profile) == buckets
    assert all(s >= 0 for s in profile.values())
    assert profile["block_forward"] > 0 and profile["block_backward"] > 0


def test_engine_reads_any_config_object():
    """The engine takes the config itself (no tuple, no import of cllm_cli): any object with
    the six sizes, checked."""
    from types import SimpleNamespace
    sizes = dict(vocab_size=11, embed_dim=8, num_layers=2, num_heads=2, ff_dim=12, seq_len=5)
    assert _engine.parameter_layout(SimpleNamespace(**sizes)) == _engine.parameter_layout(CFG_A)
    with pytest.raises(TypeError):
        _engine.num_parameters((11, 8, 2, 2, 12, 5))
    with pytest.raises(ValueError):
        _engine.num_parameters(SimpleNamespace(**dict(sizes, num_heads=3)))
    with pytest.raises(ValueError):
        _engine.num_parameters(SimpleNamespace(**dict(sizes, ff_dim=0)))


def test_named_views_cover_the_buffer():
    from cllm_cli.model import named_views
    cfg = LAYOUT_CFG
    flat = np.arange(_engine.num_parameters(cfg), dtype=np.float32)
    views = named_views(cfg, flat)
    assert [v.shape for v in views.values()] == [s for _, s, _ in _engine.parameter_layout(cfg)]
    assert np.array_equal(np.concatenate([v.ravel() for v in views.values()]), flat)
    with pytest.raises(ValueError):
        named_views(cfg, flat[:-1])
