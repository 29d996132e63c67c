# Kernels of the transformer's layers: token + position embedding, layer norm, linear
# (matrix product + bias), residual add, GELU. The write rule of common.pxi holds.


cdef float LN_EPS = 1e-5


cdef void encoder_forward(float* out, const int* inp, int stride, const float* wte,
                          const float* wpe, int B, int n, int C) noexcept nogil:
    # out[B*n, C] = wte[inp[b, t]] + wpe[t] (wpe NULL: no position table); inp rows are
    # `stride` apart
    cdef int b, t, i
    cdef float* o
    cdef const float* we
    cdef const float* pe
    for b in range(B):
        for t in range(n):
            o = out + (<size_t>b * n + t) * C
            we = wte + <size_t>inp[<size_t>b * stride + t] * C
            if wpe == NULL:
                memcpy(o, we, C * sizeof(float))
                continue
            pe = wpe + <size_t>t * C
            for i in range(C):
                o[i] = we[i] + pe[i]


cdef void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp,
                           int stride, int B, int n, int C) noexcept nogil:
    # dwte[inp[b, t]] += dout[b, t]; dwpe[t] += dout[b, t] (dwpe NULL: none), in (b, t) order
    cdef int b, t, i
    cdef const float* d
    cdef float* dwe
    cdef float* dpe
    for b in range(B):
        for t in range(n):
            d = dout + (<size_t>b * n + t) * C
            dwe = dwte + <size_t>inp[<size_t>b * stride + t] * C
            if dwpe == NULL:
                for i in range(C):
                    dwe[i] += d[i]
                continue
            dpe = dwpe + <size_t>t * C
            for i in range(C):
                dwe[i] += d[i]
                dpe[i] += d[i]


cdef void layernorm_apply(float* out, const float* inp, const float* mean, const float* rstd,
                          const float* weight, const float* bias, int N, int C) noexcept nogil:
    # out[N,C] = (inp - mean) * rstd * weight + bias with a row's saved mean and rstd: the
    # forward's own expression, so that the backward recomputes its output bit for bit
    cdef int r, i
    cdef float m, s
    cdef const float* x
    cdef float* o
    for r in range(N):
        x = inp + <size_t>r * C
        o = out + <size_t>r * C
        m = mean[r]
        s = rstd[r]
        for i in range(C):
            o[i] = (x[i] - m) * s * weight[i] + bias[i]


cdef void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                            const float* weight, const float* bias, int N, int C) noexcept nogil:
    # out[N,C] = (inp - mean) * rstd * weight + bias, per row; biased variance
    cdef int r
    cdef float m, v
    cdef const float* x
    for r in range(N):
        x = inp + <size_t>r * C
        m = cllm_row_sum(x, C) / C
        v = cllm_row_sq_dev(x, C, m) / C
        mean[r] = m
        rstd[r] = 1.0 / sqrtf(v + LN_EPS)
    layernorm_apply(out, inp, mean, rstd, weight, bias, N, C)


cdef void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                             const float* inp, const float* weight, const float* mean,
                             const float* rstd, int N, int C) noexcept nogil:
    # dinp[N,C], dweight[C], dbias[C] += the gradients through out = layernorm(inp);
    # dweight and dbias NULL: frozen, only dinp
    cdef int r, i
    cdef float m, s, norm, dnorm, dnorm_mean, dnorm_norm_mean
    cdef const float* x
    cdef const float* d
    cdef float* dx
    for r in range(N):
        x = inp + <size_t>r * C
        d = dout + <size_t>r * C
        dx = dinp + <size_t>r * C
        m = mean[r]
        s = rstd[r]
        cllm_ln_backward_sums(x, d, weight, C, m, s, &dnorm_mean, &dnorm_norm_mean)
        dnorm_mean = dnorm_mean / C
        dnorm_norm_mean = dnorm_norm_mean / C
        if dweight == NULL:
            for i in range(C):
                norm = (x[i] - m) * s
                dx[i] += (weight[i] * d[i] - dnorm_mean - norm * dnorm_norm_mean) * s
            continue
        for i in range(C):
            norm = (x[i] - m) * s
            dnorm = weight[i] * d[i]
            dbias[i] += d[i]
            dweight[i] += norm * d[i]
            dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s


cdef inline void weight_product(Bf16Products* b, float* out, const float* inp,
                                const float* weight, int N, int C, int OC,
                                bint accumulate) noexcept nogil:
    # out[N,OC] (+)= inp[N,C] @ weight[OC,C]^T, in fp32 (b NULL: the BLAS; b.fp32: oneDNN) or
    # on bf16 inputs
    if b == NULL:
        sgemm_rm(False, True, N, OC, C, 1.0, inp, C, weight, C, 1.0 if accumulate else 0.0,
                 out, OC)
        return
    if b.fp32:
        f32_gemm(&b.ctx, False, True, N, OC, C, inp, C, weight, C, accumulate, out, OC)
        return
    bf16_round_rows(b.inputs, inp, N, C, C)
    bf16_gemm(&b.ctx, False, True, N, OC, C, b.inputs, C, bf16_weight(b, weight), C,
              accumulate, out, OC)


cdef void linear_forward(Bf16Products* b, float* out, const float* inp, const float* weight,
                         const float* bias, int N, int C, int OC) noexcept nogil:
    # out[N,OC] = inp[N,C] @ weight[OC,C]^T (+ bias[OC]): the product adds onto the bias rows.
    # b: NULL for fp32, else the sphere's bf16 state (in every kernel that takes it)
    cdef int i, o
    cdef float* row
    if bias == NULL:
        weight_product(b, out, inp, weight, N, C, OC, False)
        return
    for i in range(N):
        row = out + <size_t>i * OC
        for o in range(OC):
            row[o] = bias[o]
    weight_product(b, out, inp, weight, N, C, OC, True)


cdef void linear_backward(Bf16Products* b, float* dinp, float* dweight, float* dbias,
                          const float* dout, const float* inp, const float* weight,
                          int N, int C, int OC) noexcept nogil:
    # dinp[N,C] += dout[N,OC] @ weight[OC,C]; dweight[OC,C] += dout^T @ inp[N,C];
    # dbias[OC] += the sum over rows of dout (dbias may be NULL; dweight NULL: a frozen
    # weight, whose gradient product is skipped)
    cdef int i, o
    cdef const float* row
    if b == NULL:
        sgemm_rm(False, False, N, C, OC, 1.0, dout, OC, weight, C, 1.0, dinp, C)
        if dweight != NULL:
            sgemm_rm(True, False, OC, C, N, 1.0, dout, OC, inp, C, 1.0, dweight, C)
    elif b.fp32:
        f32_gemm(&b.ctx, False, False, N, C, OC, dout, OC, weight, C, True, dinp, C)
        if dweight != NULL:
            f32_gemm(&b.ctx, True, False, OC, C, N, dout, OC, inp, C, True, dweight, C)
    else:
        bf16_round_rows(b.grads, dout, N, OC, OC)
        bf16_gemm(&b.ctx, False, False, N, C, OC, b.grads, OC, bf16_weight(b, weight), C,
                  True, dinp, C)
        if dweight != NULL:
            bf16_round_rows(b.inputs, inp, N, C, C)
            bf16_gemm(&b.ctx, True, False, OC, C, N, b.grads, OC, b.inputs, C, True, dweight, C)
    if dbias != NULL:
        for i in range(N):
            row = dout + <size_t>i * OC
            for o in range(OC):
                dbias[o] += row[o]


cdef void residual_forward(Bf16Products* b, float* out, const float* res, const float* inp,
                           const float* weight, const float* bias, int N, int C,
                           int OC) noexcept nogil:
    # out[N,OC] = res[N,OC] + (inp[N,C] @ weight[OC,C]^T + bias[OC]): a projection added onto
    # the residual stream. Rounded as (res + bias) + inp @ weight^T: the product adds onto
    # res + bias, one rounding fewer than adding a separate projection. bias NULL: none.
    cdef int i, o
    cdef float* row
    cdef const float* r
    if bias == NULL:
        memcpy(out, res, <size_t>N * OC * sizeof(float))
        weight_product(b, out, inp, weight, N, C, OC, True)
        return
    for i in range(N):
        row = out + <size_t>i * OC
        r = res + <size_t>i * OC
        for o in range(OC):
            row[o] = r[o] + bias[o]
    weight_product(b, out, inp, weight, N, C, OC, True)


cdef void residual_dropout_forward(Bf16Products* b, float* out, const float* res,
                                   const float* inp, const float* weight, const float* bias,
                                   int N, int C, int OC, const Dropout* d,
                                   uint64_t key) noexcept nogil:
    # out[N,OC] = res + dropout(inp @ weight^T + bias): the projection is dropped before it is
    # added onto the residual stream (element index: row * OC + column)
    cdef size_t i, size = <size_t>N * OC
    linear_forward(b, out, inp, weight, bias, N, C, OC)
    dropout_apply(out, out, size, d, key, 0)
    for i in range(size):
        out[i] = res[i] + out[i]


cdef void residual_backward(float* dres, const float* dout, size_t size) noexcept nogil:
    # dres += dout: the residual stream passes its gradient through; the projection's
    # gradients come from linear_backward on the same dout
    cdef size_t i
    for i in range(size):
        dres[i] += dout[i]


# a float constant: a bare literal would be a C double and drag the loops into double math
cdef float ONE = 1.0


cdef inline void gelu_forward(float* out, const float* inp, size_t N) noexcept nogil:
    # out[N] = gelu(inp), tanh approximation (out may be inp)
    cllm_gelu_forward(out, inp, N)


cdef inline void gelu_backward(float* dinp, const float* inp, const float* dout,
                               size_t N) noexcept nogil:
    # dinp[N] += dout * gelu'(inp); dinp must not alias dout
    cllm_gelu_backward(dinp, inp, dout, N)
