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


cdef void optimizer_settings(OptimizerSettings* o, bint adamw, double lr, double weight_decay,
                             double grad_clip, double beta1, double beta2, double eps,
                             long long t) noexcept:
    o.adamw = adamw
    o.lr = lr
    o.weight_decay = weight_decay
    o.grad_clip = grad_clip
    o.beta1 = beta1
    o.beta2 = beta2
    o.eps = eps
    o.t = t


cdef int trained_tensor(const ModelConfig* c, const Lora* lo, int index, size_t* offset,
                        size_t* size) noexcept nogil:
    # offset and size of the index-th trained tensor: the parameters' (lo NULL) or the
    # adapters' (each A, then its B); returns whether it decays (2-D tensors), -1 past the end
    cdef int row, layer, per_layer = 0, s, k
    if lo == NULL:
        if index >= num_tensors(c):
            return -1
        tensor_row(c, index, &row, &layer)
        offset[0] = tensor_offset(c, row, layer)
        size[0] = row_floats(c, row)
        return table_row(c, row).cols != DIM_NONE
    for s in range(lora_sites(c)):
        per_layer += 2 * lora_on(lo, s)
    if index >= c.L * per_layer:
        return -1
    layer = index // per_layer
    k = index % per_layer
    for s in range(lora_sites(c)):
        if not lora_on(lo, s):
            continue
        if k < 2:
            offset[0] = lora_offset(lo, c, layer, s)
            size[0] = <size_t>lo.rank * (site_in(c, s) if k == 0 else site_out(c, s))
            if k == 1:
                offset[0] += <size_t>lo.rank * site_in(c, s)
            return 1
        k -= 2
    return -1


cdef size_t count_optimizer_chunks(const ModelConfig* c, const Lora* lo) noexcept nogil:
    cdef size_t count = 0, offset, size
    cdef int i = 0
    while trained_tensor(c, lo, i, &offset, &size) >= 0:
        count += (size + OPTIMIZER_CHUNK - 1) // OPTIMIZER_CHUNK
        i += 1
    return count


cdef void fill_in_optimizer_chunks(long long* chunks, const ModelConfig* c,
                                   const Lora* lo) noexcept nogil:
    # (offset, size, decay) rows covering the trained buffer (the parameters, or with lo the
    # adapters): every tensor cut into pieces of at most OPTIMIZER_CHUNK floats, decay on 2-D
    # tensors only. Fixed by the config alone, so the gradient norm (summed per chunk, then
    # over chunks) never depends on the thread count.
    cdef size_t start, size, offset
    cdef int i = 0, decay
    while True:
        decay = trained_tensor(c, lo, i, &offset, &size)
        if decay < 0:
            return
        start = 0
        while start < size:
            chunks[0] = offset + start
            chunks[1] = OPTIMIZER_CHUNK if size - start > OPTIMIZER_CHUNK else size - start
            chunks[2] = decay
            chunks += 3
            start += OPTIMIZER_CHUNK
        i += 1


cdef bint optimizer_clip(const double* chunk_sumsq, int num_chunks, double grad_clip,
                         double* norm, float* scale) noexcept nogil:
    # the mean gradient's norm from every chunk's sum of squares, added in chunk order (so it
    # depends neither on the thread count nor on how the chunks are shared out), and the
    # clipping factor; returns whether the step applies (the norm is finite)
    cdef double sumsq = 0.0
    cdef int k
    for k in range(num_chunks):
        sumsq += chunk_sumsq[k]
    norm[0] = sqrt(sumsq)
    scale[0] = 1.0
    if grad_clip > 0 and norm[0] > grad_clip:
        scale[0] = <float>(grad_clip / norm[0])
    return isfinite(norm[0])


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
