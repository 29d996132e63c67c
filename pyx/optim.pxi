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


cdef enum:
    OPTIMIZER_CHUNK = 16384     # floats per unit of optimiser work (64 KiB)


cdef size_t count_optimizer_chunks(const ModelConfig* c) noexcept nogil:
    cdef size_t count = 0
    cdef int i, row, layer
    for i in range(num_tensors(c)):
        tensor_row(c, i, &row, &layer)
        count += (row_floats(c, row) + OPTIMIZER_CHUNK - 1) // OPTIMIZER_CHUNK
    return count


cdef void fill_in_optimizer_chunks(long long* chunks, const ModelConfig* c) noexcept nogil:
    # (offset, size, decay) rows covering the flat buffer: every tensor cut into pieces of at
    # most OPTIMIZER_CHUNK floats, decay on 2-D tensors only. Fixed by the config alone, so the
    # gradient norm (summed per chunk, then over chunks) never depends on the thread count.
    cdef size_t start, size, offset
    cdef int i, row, layer
    for i in range(num_tensors(c)):
        tensor_row(c, i, &row, &layer)
        size = row_floats(c, row)
        offset = tensor_offset(c, row, layer)
        start = 0
        while start < size:
            chunks[0] = offset + start
            chunks[1] = OPTIMIZER_CHUNK if size - start > OPTIMIZER_CHUNK else size - start
            chunks[2] = PARAMETER_TABLE[row].cols != DIM_NONE
            chunks += 3
            start += OPTIMIZER_CHUNK


cdef inline double mean_gradient_sumsq(float* g, size_t size, long long count) noexcept nogil:
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
