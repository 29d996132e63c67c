# The optimiser step: mean gradient, global-norm clipping, AdamW or SGD over the flat buffer.
from libc.math cimport sqrt, pow


cdef struct OptimizerSettings:
    int adamw            # 1: AdamW, 0: SGD
    float lr
    float weight_decay
    float grad_clip      # 0 disables clipping
    float beta1
    float beta2
    float eps
    long long t          # 1-based AdamW step (bias correction)


cdef double mean_gradient_norm(float* g, size_t size, int count) noexcept nogil:
    # g /= count in place; returns the L2 norm of the result (summed in order, in double)
    cdef size_t i
    cdef double sumsq = 0.0
    cdef float c = <float>count
    for i in range(size):
        g[i] = g[i] / c
        sumsq += <double>g[i] * g[i]
    return sqrt(sumsq)


cdef void optimizer_update(float* p, float* g, float* m, float* v, size_t size, bint decay,
                           float scale, const OptimizerSettings* o) noexcept nogil:
    # one tensor: decoupled decay (2-D tensors only), then AdamW or SGD on g * scale
    cdef size_t i
    cdef float keep = <float>(1.0 - <double>o.lr * o.weight_decay) if decay else 1.0
    cdef float b1 = o.beta1, b2 = o.beta2
    cdef float one_minus_b1 = <float>(1.0 - <double>o.beta1)
    cdef float one_minus_b2 = <float>(1.0 - <double>o.beta2)
    cdef float bc1 = <float>(1.0 - pow(<double>o.beta1, <double>o.t))
    cdef float bc2 = <float>(1.0 - pow(<double>o.beta2, <double>o.t))
    cdef float lr = o.lr, eps = o.eps
    cdef float gi, mhat, vhat
    if o.adamw:
        for i in range(size):
            gi = g[i] * scale
            m[i] = b1 * m[i] + one_minus_b1 * gi
            v[i] = b2 * v[i] + one_minus_b2 * (gi * gi)
            mhat = m[i] / bc1
            vhat = v[i] / bc2
            p[i] = p[i] * keep - (lr * mhat) / (sqrtf(vhat) + eps)
    else:
        for i in range(size):
            p[i] = p[i] * keep - lr * (g[i] * scale)


cdef int threaded_optimizer_step(ThreadedTrainingSystem* s, int count, float* m, float* v,
                                 const long long* tensors, int num_tensors,
                                 const OptimizerSettings* o, double* norm) noexcept nogil:
    # Applies the step's accumulated gradient (sum over `count` tokens). tensors holds
    # (offset, size, decay) triples. Returns 1 when applied, 0 when skipped (norm not finite).
    cdef int k
    cdef long long off
    cdef float scale = 1.0
    cdef bint applied = False
    model_lock_acquire(s, True)
    gradient_lock_acquire(s)
    norm[0] = mean_gradient_norm(s.accumulated_gradients, s.gradient_size, count)
    if isfinite(norm[0]):
        if o.grad_clip > 0 and norm[0] > o.grad_clip:
            scale = <float>(o.grad_clip / norm[0])
        for k in range(num_tensors):
            off = tensors[3 * k]
            optimizer_update(s.params + off, s.accumulated_gradients + off,
                             m + off if o.adamw else NULL, v + off if o.adamw else NULL,
                             <size_t>tensors[3 * k + 1], tensors[3 * k + 2] != 0, scale, o)
        applied = True
    gradient_lock_release(s)
    model_lock_release(s)
    return applied
