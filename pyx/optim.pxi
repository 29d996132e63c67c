# The optimiser step: mean gradient, global-norm clipping, AdamW or SGD over the flat buffer.
from libc.math cimport sqrt, pow


cdef struct OptimizerSettings:
    # scalars are kept in double and rounded to float once, where they meet the float data
    int adamw            # 1: AdamW, 0: SGD
    double lr
    double weight_decay
    double grad_clip     # 0 disables clipping
    double beta1
    double beta2
    double eps
    long long t          # 1-based AdamW step (bias correction)


cdef inline double mean_gradient_sumsq(float* g, size_t size, int count) noexcept nogil:
    # g /= count in place; returns the sum of squares of the result (fixed lanes, in double)
    return cllm_divide_sumsq(g, size, <float>count)


cdef void optimizer_update(float* p, float* g, float* m, float* v, size_t size, bint decay,
                           float scale, const OptimizerSettings* o) noexcept nogil:
    # one tensor: decoupled decay (2-D tensors only), then AdamW or SGD on g * scale
    cdef size_t i
    cdef float keep = <float>(1.0 - o.lr * o.weight_decay) if decay else 1.0
    cdef float b1 = <float>o.beta1, b2 = <float>o.beta2
    cdef float one_minus_b1 = <float>(1.0 - o.beta1)
    cdef float one_minus_b2 = <float>(1.0 - o.beta2)
    cdef float bc1 = <float>(1.0 - pow(o.beta1, <double>o.t))
    cdef float bc2 = <float>(1.0 - pow(o.beta2, <double>o.t))
    cdef float lr = <float>o.lr, eps = <float>o.eps
    cdef float gi, mhat, vhat
    if o.adamw:
        for i in range(size):
            gi = g[i] * scale
            m[i] = b1 * m[i] + one_minus_b1 * gi
            v[i] = b2 * v[i] + (one_minus_b2 * gi) * gi
            mhat = m[i] / bc1
            vhat = v[i] / bc2
            p[i] = p[i] * keep - (lr * mhat) / (sqrtf(vhat) + eps)
    else:
        for i in range(size):
            p[i] = p[i] * keep - lr * (g[i] * scale)
