# The model of SPEC section 1 on one micro-batch: parameter views into the flat buffer,
# per-sphere activation buffers, and the whole forward / backward pass.
from libc.stdlib cimport calloc, free


cdef extern from *:
    """
    static inline int cllm_claim(int *counter) {
        return __atomic_fetch_add(counter, 1, __ATOMIC_SEQ_CST);
    }
    static inline int cllm_load(const int *flag) { return __atomic_load_n(flag, __ATOMIC_SEQ_CST); }
    static inline void cllm_store(int *flag, int v) { __atomic_store_n(flag, v, __ATOMIC_SEQ_CST); }
    """
    int cllm_claim(int* counter) nogil
    int cllm_load(const int* flag) nogil
    void cllm_store(int* flag, int v) nogil


cdef inline bint stopped(const int* stop) noexcept nogil:
    # another thread asked the pass to stop (Ctrl-C); NULL means never
    return stop != NULL and cllm_load(stop)


cdef struct ModelConfig:
    int V       # vocabulary
    int C       # embedding width
    int L       # layers
    int NH      # heads
    int F       # feed-forward width
    int T       # maximum sequence length (rows of wpe)


cdef struct LayerParams:
    float* ln1w      # (C,)
    float* ln1b      # (C,)
    float* qkvw      # (3C, C)
    float* qkvb      # (3C,)
    float* attprojw  # (C, C)
    float* attprojb  # (C,)
    float* ln2w      # (C,)
    float* ln2b      # (C,)
    float* fcw       # (F, C)
    float* fcb       # (F,)
    float* fcprojw   # (C, F)
    float* fcprojb   # (C,)


cdef inline size_t layer_size(const ModelConfig* c) noexcept nogil:
    cdef size_t C = c.C, F = c.F
    return 2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C + F * C + F + C * F + C


cdef inline size_t model_size(const ModelConfig* c) noexcept nogil:
    return (<size_t>c.V + c.T) * c.C + c.L * layer_size(c) + 2 * <size_t>c.C


cdef inline void layer_params(LayerParams* p, float* base, const ModelConfig* c, int l) noexcept nogil:
    # the same layout serves parameters and gradients
    cdef size_t C = c.C, F = c.F
    cdef float* q = base + (<size_t>c.V + c.T) * C + l * layer_size(c)
    p.ln1w = q; q += C
    p.ln1b = q; q += C
    p.qkvw = q; q += 3 * C * C
    p.qkvb = q; q += 3 * C
    p.attprojw = q; q += C * C
    p.attprojb = q; q += C
    p.ln2w = q; q += C
    p.ln2b = q; q += C
    p.fcw = q; q += F * C
    p.fcb = q; q += F
    p.fcprojw = q; q += C * F
    p.fcprojb = q


cdef inline float* wte_of(float* base, const ModelConfig* c) noexcept nogil:
    return base

cdef inline float* wpe_of(float* base, const ModelConfig* c) noexcept nogil:
    return base + <size_t>c.V * c.C

cdef inline float* lnf_of(float* base, const ModelConfig* c) noexcept nogil:
    # ln_f.weight, then ln_f.bias C floats later
    return base + (<size_t>c.V + c.T) * c.C + c.L * layer_size(c)


cdef struct Activations:
    int maxB            # capacity in sequences of length T
    int B, n            # shape of the current micro-batch
    float* encoded      # (N, C)
    float* ln1          # (L, N, C)
    float* ln1_mean     # (L, N)
    float* ln1_rstd     # (L, N)
    float* qkv          # (L, N, 3C)
    float* atty         # (L, N, C)
    float* att          # (L, B, NH, n, n)
    float* residual2    # (L, N, C)
    float* ln2          # (L, N, C)
    float* ln2_mean     # (L, N)
    float* ln2_rstd     # (L, N)
    float* fch          # (L, N, F)
    float* fch_gelu     # (L, N, F)
    float* residual3    # (L, N, C)
    float* lnf          # (N, C)
    float* lnf_mean     # (N,)
    float* lnf_rstd     # (N,)
    float* logits       # (N, V), then dlogits
    float* dresidual    # (N, C) backward: gradient of the residual stream
    float* dwide        # (N, max(3C, F)) backward scratch
    float* dnarrow      # (N, C) backward scratch
    float* datt         # (T, T) backward scratch
    float* memory       # the single allocation all of the above point into


cdef int activations_alloc(Activations* a, const ModelConfig* c, int maxB) noexcept nogil:
    # returns 0 on success, -1 when out of memory
    cdef size_t N = <size_t>maxB * c.T, C = c.C, L = c.L, F = c.F
    cdef size_t wide = 3 * C if 3 * C > F else F
    cdef size_t sizes[22]
    cdef size_t total = 0
    cdef int i, k = 0
    sizes[0] = N * C                                 # encoded
    sizes[1] = L * N * C; sizes[2] = L * N; sizes[3] = L * N      # ln1
    sizes[4] = L * N * 3 * C                         # qkv
    sizes[5] = L * N * C                             # atty
    sizes[6] = L * <size_t>maxB * c.NH * c.T * c.T   # att
    sizes[7] = L * N * C                             # residual2
    sizes[8] = L * N * C; sizes[9] = L * N; sizes[10] = L * N     # ln2
    sizes[11] = L * N * F; sizes[12] = L * N * F     # fch, fch_gelu
    sizes[13] = L * N * C                            # residual3
    sizes[14] = N * C; sizes[15] = N; sizes[16] = N  # lnf
    sizes[17] = N * <size_t>c.V                      # logits
    sizes[18] = N * C; sizes[19] = N * wide; sizes[20] = N * C    # backward scratch
    sizes[21] = <size_t>c.T * c.T                    # datt
    for i in range(22):
        total += (sizes[i] + 15) & ~(<size_t>15)     # 64-byte aligned pieces
    a.memory = <float*>calloc(total + 16, sizeof(float))
    if a.memory == NULL:
        return -1
    cdef float* p = <float*>((<size_t>a.memory + 63) & ~(<size_t>63))
    cdef float** slots[22]
    slots[0] = &a.encoded; slots[1] = &a.ln1; slots[2] = &a.ln1_mean; slots[3] = &a.ln1_rstd
    slots[4] = &a.qkv; slots[5] = &a.atty; slots[6] = &a.att; slots[7] = &a.residual2
    slots[8] = &a.ln2; slots[9] = &a.ln2_mean; slots[10] = &a.ln2_rstd
    slots[11] = &a.fch; slots[12] = &a.fch_gelu; slots[13] = &a.residual3
    slots[14] = &a.lnf; slots[15] = &a.lnf_mean; slots[16] = &a.lnf_rstd; slots[17] = &a.logits
    slots[18] = &a.dresidual; slots[19] = &a.dwide; slots[20] = &a.dnarrow; slots[21] = &a.datt
    for i in range(22):
        slots[i][0] = p
        p += (sizes[i] + 15) & ~(<size_t>15)
    a.maxB = maxB
    a.B = 0
    a.n = 0
    return 0


cdef void activations_free(Activations* a) noexcept nogil:
    free(a.memory)
    a.memory = NULL


cdef enum:
    # per-op time buckets of the optional profile
    OP_MATMUL = 0
    OP_ATTENTION = 1
    OP_SOFTMAX = 2
    OP_LAYERNORM = 3
    OP_GELU = 4
    OP_OTHER = 5         # embedding lookup, residual copies
    OP_ACCUMULATE = 6    # gradient validation and ordered accumulation
    OP_TURN_WAIT = 7     # waiting for this micro-batch's accumulation turn
    OP_OPTIMIZER = 8     # mean, norm and update of this sphere's chunks
    NUM_OPS = 9


cdef inline void tock(double* timers, int op, double* t) noexcept nogil:
    # adds the time since t to bucket op (no-op when profiling is off) and restarts t
    cdef double now
    if timers != NULL:
        now = now_seconds()
        timers[op] += now - t[0]
        t[0] = now


cdef double model_forward(Activations* a, int* counted, float* params, const ModelConfig* c,
                          const int* inp, const int* tgt, int stride, int B, int n,
                          bint want_grad, double* timers, const int* stop) noexcept nogil:
    # Forward pass of B sequences of n tokens (n <= T, B <= maxB) and the summed loss over
    # counted targets. With want_grad, a.logits holds dloss/dlogits afterwards. With
    # tgt == NULL only the logits are computed (returns 0). timers: NULL or NUM_OPS buckets.
    # When *stop becomes set the pass gives up between layers and returns NaN.
    cdef size_t N = <size_t>B * n, C = c.C, F = c.F
    cdef int l
    cdef LayerParams p
    cdef float* res
    cdef float* lnf = lnf_of(params, c)
    cdef double t = now_seconds() if timers != NULL else 0.0
    cdef double loss
    a.B = B
    a.n = n
    counted[0] = 0
    encoder_forward(a.encoded, inp, stride, wte_of(params, c), wpe_of(params, c), B, n, c.C)
    tock(timers, OP_OTHER, &t)
    res = a.encoded
    for l in range(c.L):
        if stopped(stop):
            return NAN
        layer_params(&p, params, c, l)
        layernorm_forward(a.ln1 + l * N * C, a.ln1_mean + l * N, a.ln1_rstd + l * N,
                          res, p.ln1w, p.ln1b, N, C)
        tock(timers, OP_LAYERNORM, &t)
        linear_forward(a.qkv + l * N * 3 * C, a.ln1 + l * N * C, p.qkvw, p.qkvb, N, C, 3 * C, 0.0)
        tock(timers, OP_MATMUL, &t)
        attention_forward(a.atty + l * N * C, a.att + l * <size_t>B * c.NH * n * n,
                          a.qkv + l * N * 3 * C, B, n, c.C, c.NH)
        tock(timers, OP_ATTENTION, &t)
        # residual2 = res + atty @ attprojw^T + attprojb
        memcpy(a.residual2 + l * N * C, res, N * C * sizeof(float))
        tock(timers, OP_OTHER, &t)
        linear_forward(a.residual2 + l * N * C, a.atty + l * N * C, p.attprojw, p.attprojb,
                       N, C, C, 1.0)
        tock(timers, OP_MATMUL, &t)
        layernorm_forward(a.ln2 + l * N * C, a.ln2_mean + l * N, a.ln2_rstd + l * N,
                          a.residual2 + l * N * C, p.ln2w, p.ln2b, N, C)
        tock(timers, OP_LAYERNORM, &t)
        linear_forward(a.fch + l * N * F, a.ln2 + l * N * C, p.fcw, p.fcb, N, C, F, 0.0)
        tock(timers, OP_MATMUL, &t)
        gelu_forward(a.fch_gelu + l * N * F, a.fch + l * N * F, N * F)
        tock(timers, OP_GELU, &t)
        memcpy(a.residual3 + l * N * C, a.residual2 + l * N * C, N * C * sizeof(float))
        tock(timers, OP_OTHER, &t)
        linear_forward(a.residual3 + l * N * C, a.fch_gelu + l * N * F, p.fcprojw, p.fcprojb,
                       N, F, C, 1.0)
        tock(timers, OP_MATMUL, &t)
        res = a.residual3 + l * N * C
    layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, res, lnf, lnf + C, N, C)
    tock(timers, OP_LAYERNORM, &t)
    linear_forward(a.logits, a.lnf, wte_of(params, c), NULL, N, C, c.V, 0.0)
    tock(timers, OP_MATMUL, &t)
    if tgt == NULL:
        return 0.0
    loss = crossentropy_forward_backward(a.logits, counted, tgt, stride, B, n, c.V, want_grad)
    tock(timers, OP_SOFTMAX, &t)
    return loss


cdef void model_backward(float* grads, Activations* a, float* params, const ModelConfig* c,
                         const int* inp, int stride, double* timers,
                         const int* stop) noexcept nogil:
    # Writes d(summed loss)/d(params) into grads (every element: grads need no zeroing),
    # after model_forward(want_grad=True). When *stop becomes set it gives up between layers
    # (grads are then partial).
    cdef int B = a.B, n = a.n
    cdef size_t N = <size_t>B * n, C = c.C, F = c.F
    cdef int l
    cdef LayerParams p, g
    cdef const float* res_in
    cdef float* lnf = lnf_of(params, c)
    cdef float* dlnf = lnf_of(grads, c)
    cdef double t = now_seconds() if timers != NULL else 0.0
    # logits = lnf @ wte^T
    linear_backward(a.dnarrow, wte_of(grads, c), NULL, a.logits, a.lnf, wte_of(params, c),
                    N, C, c.V)
    tock(timers, OP_MATMUL, &t)
    memset(a.dresidual, 0, N * C * sizeof(float))
    layernorm_backward(a.dresidual, dlnf, dlnf + C, a.dnarrow,
                       a.residual3 + (c.L - 1) * N * C, lnf, a.lnf_mean, a.lnf_rstd, N, C)
    tock(timers, OP_LAYERNORM, &t)
    for l in range(c.L - 1, -1, -1):
        if stopped(stop):
            return
        layer_params(&p, params, c, l)
        layer_params(&g, grads, c, l)
        res_in = a.encoded if l == 0 else a.residual3 + (l - 1) * N * C
        # mlp: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2))))
        linear_backward(a.dwide, g.fcprojw, g.fcprojb, a.dresidual, a.fch_gelu + l * N * F,
                        p.fcprojw, N, F, C)
        tock(timers, OP_MATMUL, &t)
        gelu_backward(a.dwide, a.fch + l * N * F, a.dwide, N * F)
        tock(timers, OP_GELU, &t)
        linear_backward(a.dnarrow, g.fcw, g.fcb, a.dwide, a.ln2 + l * N * C, p.fcw, N, C, F)
        tock(timers, OP_MATMUL, &t)
        layernorm_backward(a.dresidual, g.ln2w, g.ln2b, a.dnarrow, a.residual2 + l * N * C,
                           p.ln2w, a.ln2_mean + l * N, a.ln2_rstd + l * N, N, C)
        tock(timers, OP_LAYERNORM, &t)
        # attention: residual2 = res_in + attproj(attention(qkv(ln1(res_in))))
        linear_backward(a.dnarrow, g.attprojw, g.attprojb, a.dresidual, a.atty + l * N * C,
                        p.attprojw, N, C, C)
        tock(timers, OP_MATMUL, &t)
        attention_backward(a.dwide, a.datt, a.dnarrow, a.qkv + l * N * 3 * C,
                           a.att + l * <size_t>B * c.NH * n * n, B, n, c.C, c.NH)
        tock(timers, OP_ATTENTION, &t)
        linear_backward(a.dnarrow, g.qkvw, g.qkvb, a.dwide, a.ln1 + l * N * C, p.qkvw,
                        N, C, 3 * C)
        tock(timers, OP_MATMUL, &t)
        layernorm_backward(a.dresidual, g.ln1w, g.ln1b, a.dnarrow, res_in, p.ln1w,
                           a.ln1_mean + l * N, a.ln1_rstd + l * N, N, C)
        tock(timers, OP_LAYERNORM, &t)
    # wte's gradient was written by the logits' backward; wpe's starts here
    memset(wpe_of(grads, c), 0, <size_t>c.T * C * sizeof(float))
    encoder_backward(wte_of(grads, c), wpe_of(grads, c), a.dresidual, inp, stride, B, n, c.C)
    tock(timers, OP_OTHER, &t)
