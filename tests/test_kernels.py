"""Each kernel of the engine on its own (the test-only _engine_testing.op_* wrappers) against the
matching float64 forward/backward of tests/reference.py, so that a failure names the op.

Backward kernels add into the gradient buffers they are given (the write rule of
pyx/kernels/common.pxi): every backward case starts from buffers that already hold values and
checks that the kernel added exactly its gradient to them."""
import numpy as np
import pytest
import reference as ref

from cllm_cli import _engine_testing

REL_TOL = 1e-4     # float32 kernel vs float64 reference, relative to a tensor's max |value|


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def check(got, expected, what, rel=REL_TOL):
    """got (float32) against expected (float64), relative to expected's largest value; a case
    whose expected values are all ~0 tests nothing and is refused."""
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    scale = np.abs(expected).max()
    assert scale > 1e-6, f"{what}: the expected values are all ~0, the case tests nothing"
    err = np.abs(got.astype(np.float64) - expected).max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs max |value| {scale:.3g}"


def prefilled(rng, shape):
    """A gradient buffer that already holds values: a backward kernel must add to them."""
    return f32(0.5 * rng.standard_normal(shape))


def added(after, before):
    """What a backward kernel added to a prefilled buffer."""
    return after.astype(np.float64) - before


# ----------------------------------------------------------------------------------------
# encoder: x = wte[inputs] + wpe[:n]

@pytest.mark.parametrize("B, n, V, T, C", [(2, 5, 7, 6, 19), (1, 1, 5, 4, 3), (3, 6, 4, 6, 8)])
def test_encoder(B, n, V, T, C):
    rng = np.random.default_rng(B * 10 + n)
    inputs = rng.integers(0, V, (B, n)).astype(np.int32)
    inputs[0, 0] = inputs[-1, -1]           # a token used twice: its gradients add up
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((T, C))
    check(_engine_testing.op_encoder_forward(inputs, f32(wte), f32(wpe)),
          ref.encoder_forward(inputs, f32(wte).astype(np.float64), f32(wpe).astype(np.float64)),
          "encoder_forward")
    dout = f32(rng.standard_normal((B, n, C)))
    dwte0, dwpe0 = prefilled(rng, (V, C)), prefilled(rng, (T, C))
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    _engine_testing.op_encoder_backward(dwte, dwpe, dout, inputs)
    rwte, rwpe = ref.encoder_backward(dout.astype(np.float64), inputs, V, T)
    check(added(dwte, dwte0), rwte, "encoder_backward dwte")
    check(added(dwpe[:n], dwpe0[:n]), rwpe[:n], "encoder_backward dwpe")
    np.testing.assert_array_equal(dwpe[n:], dwpe0[n:])      # unused positions untouched


# ----------------------------------------------------------------------------------------
# layer norm

@pytest.mark.parametrize("N, C", [(5, 7), (4, 19), (3, 48), (1, 16)])
def test_layernorm(N, C):
    rng = np.random.default_rng(N * 100 + C)
    inp = f32(rng.standard_normal((N, C)) * 2.0 + 0.5)
    weight, bias = f32(1.0 + 0.3 * rng.standard_normal(C)), f32(0.3 * rng.standard_normal(C))
    out, mean, rstd = _engine_testing.op_layernorm_forward(inp, weight, bias)
    x64 = inp.astype(np.float64)
    rout, cache = ref.layernorm_forward(x64, weight.astype(np.float64), bias.astype(np.float64))
    check(out, rout, "layernorm_forward out")
    check(mean, x64.mean(axis=-1), "layernorm_forward mean")
    check(rstd, cache[1][:, 0], "layernorm_forward rstd")
    # the backward recomputes the output from the saved mean and rstd: the same bits
    np.testing.assert_array_equal(_engine_testing.op_layernorm_apply(inp, mean, rstd, weight, bias), out)
    dout = f32(rng.standard_normal((N, C)))
    dinp0, dw0, db0 = prefilled(rng, (N, C)), prefilled(rng, C), prefilled(rng, C)
    dinp, dw, db = dinp0.copy(), dw0.copy(), db0.copy()
    _engine_testing.op_layernorm_backward(dinp, dw, db, dout, inp, weight, mean, rstd)
    rdinp, rdw, rdb = ref.layernorm_backward(dout.astype(np.float64), cache)
    check(added(dinp, dinp0), rdinp, "layernorm_backward dinp")
    check(added(dw, dw0), rdw, "layernorm_backward dweight")
    check(added(db, db0), rdb, "layernorm_backward dbias")


# ----------------------------------------------------------------------------------------
# linear layer and the residual projection

@pytest.mark.parametrize("N, C, OC, with_bias", [(6, 9, 5, True), (4, 16, 48, True),
                                                 (7, 8, 13, False)])
def test_linear(N, C, OC, with_bias):
    rng = np.random.default_rng(N + C + OC)
    inp, weight = f32(rng.standard_normal((N, C))), f32(rng.standard_normal((OC, C)))
    bias = f32(rng.standard_normal(OC)) if with_bias else None
    out = _engine_testing.op_linear_forward(inp, weight, bias)
    b64 = bias.astype(np.float64) if with_bias else 0.0
    check(out, ref.linear_forward(inp.astype(np.float64), weight.astype(np.float64), b64),
          "linear_forward")
    dout = f32(rng.standard_normal((N, OC)))
    dinp0, dw0 = prefilled(rng, (N, C)), prefilled(rng, (OC, C))
    db0 = prefilled(rng, OC) if with_bias else None
    dinp, dw = dinp0.copy(), dw0.copy()
    db = db0.copy() if with_bias else None
    _engine_testing.op_linear_backward(dinp, dw, db, dout, inp, weight)
    rdinp, rdw, rdb = ref.linear_backward(dout.astype(np.float64), inp.astype(np.float64),
                                          weight.astype(np.float64))
    check(added(dinp, dinp0), rdinp, "linear_backward dinp")
    check(added(dw, dw0), rdw, "linear_backward dweight")
    if with_bias:
        check(added(db, db0), rdb, "linear_backward dbias")


@pytest.mark.parametrize("N, C, OC", [(6, 9, 5), (5, 40, 16)])
def test_residual(N, C, OC):
    rng = np.random.default_rng(N * C)
    res, inp = f32(rng.standard_normal((N, OC))), f32(rng.standard_normal((N, C)))
    weight, bias = f32(rng.standard_normal((OC, C))), f32(rng.standard_normal(OC))
    out = _engine_testing.op_residual_forward(res, inp, weight, bias)
    check(out, ref.residual_forward(*(a.astype(np.float64) for a in (res, inp, weight, bias))),
          "residual_forward")
    dout = f32(rng.standard_normal((N, OC)))
    dres0 = prefilled(rng, (N, OC))
    dres = dres0.copy()
    _engine_testing.op_residual_backward(dres.reshape(-1), dout.reshape(-1))
    rdres = ref.residual_backward(dout.astype(np.float64), inp.astype(np.float64),
                                  weight.astype(np.float64))[0]
    check(added(dres, dres0), rdres, "residual_backward dres")


# ----------------------------------------------------------------------------------------
# gelu

def test_gelu():
    rng = np.random.default_rng(5)
    # around 0, the bend, and far out where tanh saturates
    u = f32(np.concatenate([np.linspace(-6, 6, 97), rng.standard_normal(60), [0.0, -20.0, 20.0]]))
    check(_engine_testing.op_gelu_forward(u), ref.gelu_forward(u.astype(np.float64)), "gelu_forward")
    dout = f32(rng.standard_normal(u.size))
    dinp0 = prefilled(rng, u.size)
    dinp = dinp0.copy()
    _engine_testing.op_gelu_backward(dinp, u, dout)
    check(added(dinp, dinp0), ref.gelu_backward(dout.astype(np.float64), u.astype(np.float64)),
          "gelu_backward")


def test_swiglu():
    rng = np.random.default_rng(6)
    N, F = 3, 37            # two vectors of 16 units and a tail of 5 per row
    gate_up = f32(rng.standard_normal((N, 2 * F)) * 3)
    g, u = gate_up[:, :F].astype(np.float64), gate_up[:, F:].astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-g))
    check(_engine_testing.op_swiglu_forward(gate_up), g * sig * u, "swiglu_forward")
    dout = f32(rng.standard_normal((N, F)))
    d0 = prefilled(rng, (N, 2 * F))
    d = d0.copy()
    _engine_testing.op_swiglu_backward(d, gate_up, dout)
    dd = dout.astype(np.float64)
    expected = np.concatenate([dd * u * sig * (1.0 + g * (1.0 - sig)), dd * g * sig], axis=1)
    check(added(d, d0), expected, "swiglu_backward")


def lanes_and_tail(values, apply):
    """apply() of values, a multiple of 16 (as the vector lanes see them), and of the same
    values one at a time in the scalar tail (after 16 others), as bits."""
    lanes = apply(f32(values))
    tail = np.array([apply(f32(np.append(values[:16], v)))[-1] for v in values],
                    dtype=np.float32)
    return lanes.view(np.uint32), tail.view(np.uint32)


@pytest.mark.parametrize("kernel", ["gelu_forward", "gelu_backward", "exp", "swiglu_forward",
                                    "swiglu_backward_gate", "swiglu_backward_up"])
def test_element_wise_kernels_give_a_value_the_same_bits_in_a_vector_lane_and_in_the_tail(kernel):
    """The element-wise kernels run 16 lanes at a time and finish with a scalar tail; both must
    compute the same float operations, or a value's result would depend on its position in the
    row (and on the row's length)."""
    rng = np.random.default_rng(11)
    values = np.concatenate([[0.0, -0.0, 1e-30, -90.0, 90.0, 20.0, -20.0, 0.5, -3.25],
                             rng.standard_normal(311) * 4])

    def apply(x):
        n = x.size
        same = f32(np.full(n, 0.375))       # the other operands: equal in every position
        if kernel == "gelu_forward":
            return _engine_testing.op_gelu_forward(x)
        if kernel == "gelu_backward":
            _engine_testing.op_gelu_backward(same, x, f32(np.full(n, -1.5)))
            return same
        if kernel == "exp":
            y = x.copy()
            _engine_testing.op_row_exp_scale(y, 0.5, 0.25)
            return y
        gate_up = f32(np.concatenate([x, np.full(n, 1.5)])[None, :])
        if kernel == "swiglu_forward":
            return _engine_testing.op_swiglu_forward(gate_up)[0]
        d = f32(np.full((1, 2 * n), 0.375))
        _engine_testing.op_swiglu_backward(d, gate_up, f32(np.full((1, n), -0.75)))
        return d[0, :n] if kernel == "swiglu_backward_gate" else d[0, n:]
    lanes, tail = lanes_and_tail(values, apply)
    np.testing.assert_array_equal(lanes, tail)


@pytest.mark.parametrize("rows, len0", [(32, 1), (32, 40), (20, 7), (9, 3), (1, 0)])
def test_row_dots_are_each_rows_serial_sum(rows, len0):
    """Attention backward's dot products of a block's rows run 16 rows side by side (a row per
    lane) and the rest one by one: each must be its row's products, rounded, added in order
    from 0, whichever way it ran (rows 16 to 19 of 20, and 9 rows, are the one-by-one path)."""
    rng = np.random.default_rng(rows + len0)
    n = len0 + rows + 5
    a, d = f32(rng.random((rows, n))), f32(rng.standard_normal((rows, n)) * 3)
    got = _engine_testing.op_row_dots(a, d, len0)
    serial = np.zeros(rows, np.float32)
    for j in range(rows):
        for t in range(len0 + j):
            serial[j] = serial[j] + a[j, t] * d[j, t]       # float32 operations
    np.testing.assert_array_equal(got.view(np.uint32), serial.view(np.uint32))
    pairwise = np.array([np.dot(a[j, :len0 + j], d[j, :len0 + j]) for j in range(rows)],
                        np.float32)
    if rows > 1 and len0 > 8:
        assert (pairwise != serial).any(), "the case cannot tell a reordered sum apart"


# ----------------------------------------------------------------------------------------
# causal attention (blocks of 32 query rows: n 40 and 70 take several). The forward keeps
# each row's max score and 1/sum only; the backward recomputes the probabilities from them.

@pytest.mark.parametrize("B, n, C, NH", [(2, 5, 12, 3), (1, 40, 8, 2), (2, 70, 6, 1),
                                         (1, 1, 4, 2)])
def test_attention(B, n, C, NH):
    rng = np.random.default_rng(B * n + C)
    qkv = f32(rng.standard_normal((B, n, 3 * C)))
    out, row_max, row_scale = _engine_testing.op_attention_forward(qkv, NH)
    rout, cache = ref.attention_forward(qkv.astype(np.float64), NH)
    check(out, rout, "attention_forward out")
    att = _engine_testing.op_attention_probs(qkv, row_max, row_scale)
    check(att, cache[3], "attention probabilities recomputed")
    assert not np.triu(att, k=1).any(), "attention above the diagonal"
    q, k, scale = cache[0], cache[1], cache[4]
    scores = np.where(np.tril(np.ones((n, n), bool)), (q @ k.transpose(0, 1, 3, 2)) * scale,
                      -np.inf)
    check(row_max, scores.max(-1), "attention_forward row max")
    check(row_scale, 1.0 / np.exp(scores - scores.max(-1, keepdims=True)).sum(-1),
          "attention_forward row 1/sum")
    dout = f32(rng.standard_normal((B, n, C)))
    dqkv0 = prefilled(rng, (B, n, 3 * C))
    dqkv = dqkv0.copy()
    _engine_testing.op_attention_backward(dqkv, dout, qkv, row_max, row_scale)
    rdqkv = ref.attention_backward(dout.astype(np.float64), cache)
    got = added(dqkv, dqkv0)
    if n == 1:
        # one position: the softmax is constant, so q and k get no gradient
        np.testing.assert_allclose(got[..., :2 * C], 0.0, atol=1e-7)
        check(got[..., 2 * C:], rdqkv[..., 2 * C:], "attention_backward dv")
        return
    for part, name in enumerate(("dq", "dk", "dv")):
        check(got[..., part * C:(part + 1) * C], rdqkv[..., part * C:(part + 1) * C],
              f"attention_backward {name}")


# ----------------------------------------------------------------------------------------
# softmax + cross-entropy (the fused loss)

@pytest.mark.parametrize("pad_id", [0, -1, 3])
def test_crossentropy(pad_id):
    rng = np.random.default_rng(pad_id + 10)
    B, n, V = 2, 4, 37
    logits = f32(3.0 * rng.standard_normal((B, n, V)))
    targets = rng.integers(0, V, (B, n)).astype(np.int32)
    targets[0, 1] = 0
    targets[1, 2] = 3
    loss, counted = _engine_testing.op_crossentropy_forward(logits, targets, pad_id)
    rloss, rcount, cache = ref.crossentropy_forward(logits.astype(np.float64),
                                                    targets.astype(np.int64), pad_id)
    assert counted == rcount == int((targets != pad_id).sum())
    assert 0 < counted, "no counted target"
    assert loss == pytest.approx(rloss, rel=1e-5)
    dlogits = _engine_testing.op_crossentropy_backward(logits, targets, pad_id)
    check(dlogits, ref.crossentropy_backward(cache), "crossentropy_backward")
    assert not dlogits[targets == pad_id].any(), "a row that does not count has a gradient"
