# Python wrappers of the kernels, one per forward and backward, so that each op can
# be checked on its own (tests/test_kernels.py). Arrays are C-contiguous float32 / int32; a
# forward returns new arrays, a backward adds into the gradient arrays it is given (the write
# rule of kernels/common.pxi). They check shapes, not values. Only cllm_cli._engine_testing has
# them.


def _expect(bint ok, str what):
    if not ok:
        raise ValueError(what)


def op_encoder_forward(const int[:, ::1] inputs, const float[:, ::1] wte,
                       const float[:, ::1] wpe):
    """out[B, n, C] = wte[inputs] + wpe[:n]."""
    cdef int B = inputs.shape[0], n = inputs.shape[1], C = wte.shape[1]
    _expect(wpe.shape[1] == C and 1 <= n <= wpe.shape[0] and B >= 1, "shapes do not match")
    _check_tokens(inputs, wte.shape[0], "inputs")
    out = np.empty((B, n, C), np.float32)
    cdef float[:, :, ::1] o = out
    encoder_forward(&o[0, 0, 0], &inputs[0, 0], n, &wte[0, 0], &wpe[0, 0], B, n, C)
    return out


def op_encoder_backward(float[:, ::1] dwte, float[:, ::1] dwpe, const float[:, :, ::1] dout,
                        const int[:, ::1] inputs):
    """dwte[inputs] += dout; dwpe[:n] += dout summed over the batch."""
    cdef int B = inputs.shape[0], n = inputs.shape[1], C = dwte.shape[1]
    _expect(dout.shape[0] == B and dout.shape[1] == n and dout.shape[2] == C
            and dwpe.shape[1] == C and 1 <= n <= dwpe.shape[0] and B >= 1, "shapes do not match")
    _check_tokens(inputs, dwte.shape[0], "inputs")
    encoder_backward(&dwte[0, 0], &dwpe[0, 0], &dout[0, 0, 0], &inputs[0, 0], n, B, n, C)


def op_layernorm_forward(const float[:, ::1] inp, const float[::1] weight,
                         const float[::1] bias):
    """(out[N, C], mean[N], rstd[N])."""
    cdef int N = inp.shape[0], C = inp.shape[1]
    _expect(weight.shape[0] == C and bias.shape[0] == C and N >= 1, "shapes do not match")
    out = np.empty((N, C), np.float32)
    mean = np.empty(N, np.float32)
    rstd = np.empty(N, np.float32)
    cdef float[:, ::1] o = out
    cdef float[::1] m = mean, r = rstd
    layernorm_forward(&o[0, 0], &m[0], &r[0], &inp[0, 0], &weight[0], &bias[0], N, C)
    return out, mean, rstd


def op_layernorm_apply(const float[:, ::1] inp, const float[::1] mean, const float[::1] rstd,
                       const float[::1] weight, const float[::1] bias):
    """out[N, C] from saved per-row mean and rstd."""
    cdef int N = inp.shape[0], C = inp.shape[1]
    _expect(mean.shape[0] == N and rstd.shape[0] == N and weight.shape[0] == C
            and bias.shape[0] == C and N >= 1, "shapes do not match")
    out = np.empty((N, C), np.float32)
    cdef float[:, ::1] o = out
    layernorm_apply(&o[0, 0], &inp[0, 0], &mean[0], &rstd[0], &weight[0], &bias[0], N, C)
    return out


def op_layernorm_backward(float[:, ::1] dinp, float[::1] dweight, float[::1] dbias,
                          const float[:, ::1] dout, const float[:, ::1] inp,
                          const float[::1] weight, const float[::1] mean,
                          const float[::1] rstd):
    cdef int N = inp.shape[0], C = inp.shape[1]
    _expect(dinp.shape[0] == N and dinp.shape[1] == C and dout.shape[0] == N
            and dout.shape[1] == C and dweight.shape[0] == C and dbias.shape[0] == C
            and weight.shape[0] == C and mean.shape[0] == N and rstd.shape[0] == N and N >= 1,
            "shapes do not match")
    layernorm_backward(&dinp[0, 0], &dweight[0], &dbias[0], &dout[0, 0], &inp[0, 0],
                       &weight[0], &mean[0], &rstd[0], N, C)


def op_linear_forward(const float[:, ::1] inp, const float[:, ::1] weight,
                      const float[::1] bias=None):
    """out[N, OC] = inp[N, C] @ weight[OC, C]^T (+ bias)."""
    cdef int N = inp.shape[0], C = inp.shape[1], OC = weight.shape[0]
    _expect(weight.shape[1] == C and (bias is None or bias.shape[0] == OC) and N >= 1,
            "shapes do not match")
    out = np.empty((N, OC), np.float32)
    cdef float[:, ::1] o = out
    cdef const float* b = NULL
    if bias is not None:
        b = &bias[0]
    linear_forward(NULL, &o[0, 0], &inp[0, 0], &weight[0, 0], b, N, C, OC)
    return out


def op_linear_backward(float[:, ::1] dinp, float[:, ::1] dweight, float[::1] dbias,
                       const float[:, ::1] dout, const float[:, ::1] inp,
                       const float[:, ::1] weight):
    """dbias may be None."""
    cdef int N = inp.shape[0], C = inp.shape[1], OC = weight.shape[0]
    _expect(weight.shape[1] == C and dinp.shape[0] == N and dinp.shape[1] == C
            and dweight.shape[0] == OC and dweight.shape[1] == C and dout.shape[0] == N
            and dout.shape[1] == OC and (dbias is None or dbias.shape[0] == OC) and N >= 1,
            "shapes do not match")
    cdef float* db = NULL
    if dbias is not None:
        db = &dbias[0]
    linear_backward(NULL, &dinp[0, 0], &dweight[0, 0], db, &dout[0, 0], &inp[0, 0], &weight[0, 0],
                    N, C, OC)


def op_residual_forward(const float[:, ::1] res, const float[:, ::1] inp,
                        const float[:, ::1] weight, const float[::1] bias):
    """out[N, OC] = res + inp[N, C] @ weight[OC, C]^T + bias."""
    cdef int N = inp.shape[0], C = inp.shape[1], OC = weight.shape[0]
    _expect(weight.shape[1] == C and bias.shape[0] == OC and res.shape[0] == N
            and res.shape[1] == OC and N >= 1, "shapes do not match")
    out = np.empty((N, OC), np.float32)
    cdef float[:, ::1] o = out
    residual_forward(NULL, &o[0, 0], &res[0, 0], &inp[0, 0], &weight[0, 0], &bias[0], N, C, OC)
    return out


def op_residual_backward(float[::1] dres, const float[::1] dout):
    """dres += dout (the projection's part is op_linear_backward)."""
    _expect(dres.shape[0] == dout.shape[0] >= 1, "shapes do not match")
    residual_backward(&dres[0], &dout[0], dres.shape[0])


def op_gelu_forward(const float[::1] inp):
    _expect(inp.shape[0] >= 1, "empty input")
    out = np.empty(inp.shape[0], np.float32)
    cdef float[::1] o = out
    gelu_forward(&o[0], &inp[0], inp.shape[0])
    return out


def op_gelu_backward(float[::1] dinp, const float[::1] inp, const float[::1] dout):
    _expect(dinp.shape[0] == inp.shape[0] == dout.shape[0] >= 1, "shapes do not match")
    gelu_backward(&dinp[0], &inp[0], &dout[0], inp.shape[0])


def op_row_exp_scale(float[::1] x, float shift, float scale):
    """x = e^(x - shift) * scale in place (attention's probabilities from saved max and
    1/sum)."""
    _expect(x.shape[0] >= 1, "empty input")
    cllm_row_exp_scale(&x[0], x.shape[0], shift, scale)


def op_row_dots(const float[:, ::1] a, const float[:, ::1] d, int len0):
    """dots[j] = a[j] . d[j] over row j's first len0 + j elements (attention backward's sums
    of a causal block's rows)."""
    _expect(a.shape[0] == d.shape[0] >= 1 and a.shape[1] == d.shape[1] and len0 >= 0
            and len0 + a.shape[0] - 1 <= a.shape[1], "shapes do not match")
    out = np.empty(a.shape[0], np.float32)
    cdef float[::1] dots = out
    cllm_row_dots(&dots[0], &a[0, 0], &d[0, 0], a.shape[0], a.shape[1], len0)
    return out


def op_swiglu_forward(const float[:, ::1] gate_up):
    """silu(gate) * up of rows [gate | up] (N, 2F) -> (N, F)."""
    _expect(gate_up.shape[0] >= 1 and gate_up.shape[1] >= 2 and gate_up.shape[1] % 2 == 0,
            "shapes do not match")
    cdef int F = gate_up.shape[1] // 2
    out = np.empty((gate_up.shape[0], F), np.float32)
    cdef float[:, ::1] o = out
    swiglu_forward(&o[0, 0], &gate_up[0, 0], gate_up.shape[0], F)
    return out


def op_swiglu_backward(float[:, ::1] dgate_up, const float[:, ::1] gate_up,
                       const float[:, ::1] dout):
    """dgate_up (N, 2F) += the gradient through op_swiglu_forward."""
    _expect(dgate_up.shape[0] == gate_up.shape[0] == dout.shape[0] >= 1
            and dgate_up.shape[1] == gate_up.shape[1] == 2 * dout.shape[1] >= 2,
            "shapes do not match")
    swiglu_backward(&dgate_up[0, 0], &gate_up[0, 0], &dout[0, 0], gate_up.shape[0],
                    dout.shape[1])


cdef int attention_width(int W, int NH, int KVH) except -1:
    # C of qkv rows W wide with NH query heads over KVH key/value heads (KVH 0: NH)
    KVH = KVH or NH
    _expect(NH >= 1 and KVH >= 1 and NH % KVH == 0 and W * NH % (NH + 2 * KVH) == 0,
            "shapes do not match")
    C = W * NH // (NH + 2 * KVH)
    _expect(C % NH == 0 and C >= NH, "shapes do not match")
    return C


def op_attention_forward(const float[:, :, ::1] qkv, int num_heads, int num_kv_heads=0):
    """qkv[B, n, W] -> (out[B, n, C], row_max[B, NH, n], row_scale[B, NH, n]); W = C + 2 *
    KVH * C / NH (num_kv_heads 0: NH, W = 3C)."""
    cdef int B = qkv.shape[0], n = qkv.shape[1]
    cdef int C = attention_width(qkv.shape[2], num_heads, num_kv_heads)
    _expect(B >= 1 and n >= 1, "shapes do not match")
    out = np.empty((B, n, C), np.float32)
    row_max = np.empty((B, num_heads, n), np.float32)
    row_scale = np.empty((B, num_heads, n), np.float32)
    scratch = np.empty((ATT_BLOCK, n), np.float32)
    cdef float[:, :, ::1] o = out, m = row_max, sc = row_scale
    cdef float[:, ::1] probs = scratch
    attention_forward(NULL, &o[0, 0, 0], &m[0, 0, 0], &sc[0, 0, 0], &probs[0, 0], &qkv[0, 0, 0],
                      B, n, C, num_heads, num_kv_heads or num_heads, NULL, 0)
    return out, row_max, row_scale


def op_attention_probs(const float[:, :, ::1] qkv, const float[:, :, ::1] row_max,
                       const float[:, :, ::1] row_scale):
    """att[B, NH, n, n]: every block of probabilities as the backward recomputes them (zero
    above the diagonal)."""
    cdef int B = qkv.shape[0], n = qkv.shape[1], C = qkv.shape[2] // 3, NH = row_max.shape[1]
    _expect(qkv.shape[2] == 3 * C and NH >= 1 and C % NH == 0 and row_max.shape[0] == B
            and row_max.shape[2] == n and row_scale.shape[0] == B and row_scale.shape[1] == NH
            and row_scale.shape[2] == n,
            "shapes do not match")
    att = np.zeros((B, NH, n, n), np.float32)
    scratch = np.empty((ATT_BLOCK, n), np.float32)
    cdef float[:, ::1] probs = scratch
    cdef int b, h, r0, rows, hs = C // NH
    for b in range(B):
        for h in range(NH):
            for r0 in range(0, n, ATT_BLOCK):
                rows = min(ATT_BLOCK, n - r0)
                attention_probs(NULL, &probs[0, 0], &qkv[b, 0, 0] + h * hs,
                                &qkv[b, 0, 0] + C + h * hs, NULL, NULL, &row_max[b, h, 0],
                                &row_scale[b, h, 0], r0, rows, n, 3 * C, hs,
                                1.0 / sqrtf(<float>hs))
                att[b, h, r0:r0 + rows, :r0 + rows] = scratch[:rows, :r0 + rows]
    return att


def op_attention_backward(float[:, :, ::1] dqkv, const float[:, :, ::1] dout,
                          const float[:, :, ::1] qkv, const float[:, :, ::1] row_max,
                          const float[:, :, ::1] row_scale, int num_kv_heads=0):
    cdef int B = qkv.shape[0], n = qkv.shape[1], NH = row_max.shape[1]
    cdef int C = attention_width(qkv.shape[2], NH, num_kv_heads)
    _expect(dqkv.shape[0] == B and dqkv.shape[1] == n and dqkv.shape[2] == qkv.shape[2]
            and dout.shape[0] == B and dout.shape[1] == n and dout.shape[2] == C
            and row_max.shape[0] == B and row_max.shape[2] == n and row_scale.shape[0] == B
            and row_scale.shape[1] == NH and row_scale.shape[2] == n, "shapes do not match")
    scratch = np.empty((2, ATT_BLOCK, n), np.float32)
    cdef float[:, :, ::1] work = scratch
    attention_backward(NULL, &dqkv[0, 0, 0], &work[0, 0, 0], &work[1, 0, 0], &dout[0, 0, 0],
                       &qkv[0, 0, 0], &row_max[0, 0, 0], &row_scale[0, 0, 0], B, n, C, NH,
                       num_kv_heads or NH, NULL, 0)


def op_crossentropy_forward(const float[:, :, ::1] logits, const int[:, ::1] targets,
                            int pad_id=0):
    """(sum of -log softmax(logits)[target] over targets != pad_id, counted)."""
    cdef int B = logits.shape[0], n = logits.shape[1], V = logits.shape[2], counted = 0
    _expect(targets.shape[0] == B and targets.shape[1] == n and B >= 1 and n >= 1,
            "shapes do not match")
    _check_tokens(targets, V, "targets")
    work = np.array(logits, dtype=np.float32)        # the kernel overwrites its logits
    cdef float[:, :, ::1] w = work
    cdef double loss = 0.0
    crossentropy_forward_backward(&w[0, 0, 0], &loss, &counted, &targets[0, 0], n, n, 0, B * n,
                                  V, pad_id, False)
    return loss, counted


def op_crossentropy_backward(const float[:, :, ::1] logits, const int[:, ::1] targets,
                             int pad_id=0):
    """dlogits[B, n, V] of the summed loss (0 on rows that do not count)."""
    cdef int B = logits.shape[0], n = logits.shape[1], V = logits.shape[2], counted = 0
    _expect(targets.shape[0] == B and targets.shape[1] == n and B >= 1 and n >= 1,
            "shapes do not match")
    _check_tokens(targets, V, "targets")
    dlogits = np.array(logits, dtype=np.float32)
    cdef float[:, :, ::1] d = dlogits
    cdef double loss = 0.0
    crossentropy_forward_backward(&d[0, 0, 0], &loss, &counted, &targets[0, 0], n, n, 0, B * n,
                                  V, pad_id, True)
    return dlogits


def op_bf16_round(const float[::1] x):
    """bf16(x) (round to nearest even) as uint16 bit patterns."""
    out = np.empty(x.shape[0], np.uint16)
    cdef uint16_t[::1] o = out
    if x.shape[0]:
        bf16_round_rows(&o[0], &x[0], 1, x.shape[0], x.shape[0])
    return out


def op_bf16_gemm(const uint16_t[:, ::1] a, const uint16_t[:, ::1] b, float[:, ::1] c,
                 bint trans_a=False, bint trans_b=False, bint accumulate=False):
    """c (+)= op(a) @ op(b) on bf16 bit patterns, through a fresh sphere context (load_bf16
    first). Returns the name of the implementation oneDNN chose."""
    cdef int M = c.shape[0], N = c.shape[1]
    cdef int K = a.shape[0] if trans_a else a.shape[1]
    cdef bf16_context g
    cdef int status
    _expect(M >= 1 and N >= 1 and K >= 1
            and (a.shape[1] if trans_a else a.shape[0]) == M
            and (b.shape[1] if trans_b else b.shape[0]) == K
            and (b.shape[0] if trans_b else b.shape[1]) == N, "shapes do not match")
    check_precision("bf16")
    if bf16_context_init(&g) != 0:
        raise MemoryError("oneDNN cannot start")
    with nogil:
        bf16_gemm(&g, trans_a, trans_b, M, N, K, &a[0, 0], a.shape[1], &b[0, 0], b.shape[1],
                  accumulate, &c[0, 0], N)
    status = g.status
    impl = bf16_plan_impl(&g, 0) if status == 0 else NULL
    name = impl.decode() if impl != NULL else None
    bf16_context_free(&g)
    check_products(status)
    return name
