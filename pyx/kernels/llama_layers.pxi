# Kernels of the Llama form's own layers: RMSNorm, rotary positions, SwiGLU. The write rule of
# common.pxi holds.
from libc.math cimport cos, sin, pow


cdef void rmsnorm_apply(float* out, const float* inp, const float* rstd, const float* weight,
                        int N, int C) noexcept nogil:
    # out[N,C] = inp * rstd * weight with a row's saved rstd: the forward's own expression, so
    # that the backward recomputes its output bit for bit
    cdef int r, i
    cdef float s
    cdef const float* x
    cdef float* o
    for r in range(N):
        x = inp + <size_t>r * C
        o = out + <size_t>r * C
        s = rstd[r]
        for i in range(C):
            o[i] = x[i] * s * weight[i]


cdef void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight,
                          int N, int C, float eps) noexcept nogil:
    # out[N,C] = inp / sqrt(mean(inp^2) + eps) * weight, per row; rstd[N] keeps 1 / sqrt(...)
    cdef int r
    for r in range(N):
        rstd[r] = 1.0 / sqrtf(cllm_row_sq_dev(inp + <size_t>r * C, C, 0.0) / C + eps)
    rmsnorm_apply(out, inp, rstd, weight, N, C)


cdef void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                           const float* weight, const float* rstd, int N, int C) noexcept nogil:
    # dinp[N,C], dweight[C] += the gradients through out = rmsnorm(inp) * weight; dweight
    # NULL: frozen, only dinp. With norm = inp * rstd:
    #   dinp = rstd * (weight * dout - norm * mean(weight * dout * norm))
    cdef int r, i
    cdef float s, norm, unused, dnorm_norm_mean
    cdef const float* x
    cdef const float* d
    cdef float* dx
    for r in range(N):
        x = inp + <size_t>r * C
        d = dout + <size_t>r * C
        dx = dinp + <size_t>r * C
        s = rstd[r]
        cllm_ln_backward_sums(x, d, weight, C, 0.0, s, &unused, &dnorm_norm_mean)
        dnorm_norm_mean = dnorm_norm_mean / C
        for i in range(C):
            norm = x[i] * s
            if dweight != NULL:
                dweight[i] += norm * d[i]
            dx[i] += (weight[i] * d[i] - norm * dnorm_norm_mean) * s


cdef void rope_tables(float* cos_t, float* sin_t, int T, int hs, double theta) noexcept nogil:
    # cos_t, sin_t [T, hs/2]: the rotation of pair i at position t by the angle t * theta^(-2i/hs),
    # computed in float as transformers computes it (frequency 1 / theta^(2i/hs), then the
    # position times it, both rounded to float)
    cdef int t, i, half = hs // 2
    cdef float inv, angle
    for i in range(half):
        inv = <float>(1.0 / <float>pow(<float>theta, <float>(2 * i) / <float>hs))
        for t in range(T):
            angle = <float>t * inv
            cos_t[<size_t>t * half + i] = <float>cos(angle)
            sin_t[<size_t>t * half + i] = <float>sin(angle)


cdef inline void rope_rotate_row(float* x, const float* ct, const float* st, int h0, int h1,
                                 int hs, bint inverse) noexcept nogil:
    # heads h0 .. h1-1 of one row x (hs floats each) turned by the angles of its position (ct,
    # st: that position's row of the tables), each head's two halves as pairs (x[i], x[i+hs/2]):
    #   x[i] <- x[i] cos - x[i + hs/2] sin,  x[i + hs/2] <- x[i + hs/2] cos + x[i] sin
    # inverse: by the opposite angle, the transpose, which carries a gradient back through it
    cdef int h, i, half = hs // 2
    cdef float c, s, a, z
    cdef float* v
    for h in range(h0, h1):
        v = x + h * hs
        for i in range(half):
            c = ct[i]
            s = -st[i] if inverse else st[i]
            a = v[i]
            z = v[i + half]
            v[i] = a * c - z * s
            v[i + half] = z * c + a * s


cdef void rope_rotate(float* qkv, const float* cos_t, const float* sin_t, int B, int n, int W,
                      int heads, int hs, bint inverse) noexcept nogil:
    # rope_rotate_row on the first `heads` heads (q, then k: they follow each other) of every
    # qkv row [B*n, W], row b*n + t at position t
    cdef int b, t, half = hs // 2
    for b in range(B):
        for t in range(n):
            rope_rotate_row(qkv + (<size_t>b * n + t) * W, cos_t + <size_t>t * half,
                            sin_t + <size_t>t * half, 0, heads, hs, inverse)


cdef void swiglu_forward(float* out, const float* gate_up, int N, int F) noexcept nogil:
    # out[N,F] = silu(gate) * up, gate_up[N, 2F] rows [gate | up]; silu(x) = x * sigmoid(x)
    cdef int r
    cdef const float* gu
    for r in range(N):
        gu = gate_up + <size_t>r * 2 * F
        cllm_swiglu_row(out + <size_t>r * F, gu, gu + F, F)


cdef void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int N,
                          int F) noexcept nogil:
    # dgate_up[N, 2F] += the gradient through swiglu_forward: d(up) = dout * silu(gate),
    # d(gate) = dout * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
    cdef int r
    cdef const float* gu
    cdef float* dgu
    for r in range(N):
        gu = gate_up + <size_t>r * 2 * F
        dgu = dgate_up + <size_t>r * 2 * F
        cllm_swiglu_row_backward(dgu, dgu + F, gu, gu + F, dout + <size_t>r * F, F)
