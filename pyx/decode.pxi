# Generation: the model on one new position, with every layer's qkv rows cached.

# --- generation: one position at a time, with a key/value cache ---------------------------

cdef struct DecodeCache:
    # the state of one generated sequence: every layer's qkv rows of the positions so far
    # (their keys and values are what later positions attend to), and one position's scratch
    int n               # positions cached (< T to take another)
    float* qkv          # (L, T, 3C)
    float* x            # (C,) the residual stream of the new position
    float* mid          # (C,) the stream between a block's two residual adds
    float* ln           # (C,) a layer norm's output
    float* atty         # (C,)
    float* fch          # (F,)
    float* fch_gelu     # (F,)
    float* scores       # (T,) one head's attention row
    float* logits       # (V,)
    float* memory


cdef int decode_cache_alloc(DecodeCache* d, const ModelConfig* c) noexcept nogil:
    # returns 0 on success, -1 when out of memory
    cdef size_t C = c.C, F = c.F, T = c.T
    cdef size_t sizes[9]
    cdef float** slots[9]
    sizes[:] = [<size_t>c.L * T * 3 * C, C, C, C, C, F, F, T, <size_t>c.V]
    slots[:] = [&d.qkv, &d.x, &d.mid, &d.ln, &d.atty, &d.fch, &d.fch_gelu, &d.scores, &d.logits]
    d.memory = carve(slots, sizes, 9)
    if d.memory == NULL:
        return -1
    d.n = 0
    return 0


cdef void decode_cache_free(DecodeCache* d) noexcept nogil:
    free(d.memory)
    d.memory = NULL


cdef void attention_row(float* out, float* scores, const float* qkv, int t, int C, int NH,
                        int T) noexcept nogil:
    # out[C] = causal attention of position t over the cached qkv rows 0..t (3C apart):
    # attention_forward's operations on a block of one query row, t
    cdef int hs = C // NH
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef int h
    cdef float mx, s
    for h in range(NH):
        attention_scores(NULL, scores, qkv + h * hs, NULL, t, 1, T, C, hs, scale)
        attention_softmax_row(scores, t + 1, &mx, &s)
        sgemm_rm(False, False, 1, hs, t + 1, 1.0, scores, T, qkv + 2 * C + h * hs, 3 * C,
                 0.0, out + h * hs, C)


cdef void decode_forward(DecodeCache* d, float* params, const ModelConfig* c,
                         int token) noexcept nogil:
    # the model on one more position (d.n < T): its qkv rows join the cache and d.logits
    # holds its logits; the same kernels as model_forward, on one row
    cdef int C = c.C, F = c.F, t = d.n, l, i
    cdef ModelParams p
    cdef LayerParams lp
    cdef float mean, rstd
    cdef const float* we
    cdef const float* pe
    cdef float* qkv
    model_params(&p, params, c)
    we = p.wte + <size_t>token * C
    pe = p.wpe + <size_t>t * C
    for i in range(C):
        d.x[i] = we[i] + pe[i]
    for l in range(c.L):
        layer_params(&lp, params, c, l)
        qkv = d.qkv + <size_t>l * c.T * 3 * C
        layernorm_forward(d.ln, &mean, &rstd, d.x, lp.ln1w, lp.ln1b, 1, C)
        linear_forward(NULL, qkv + <size_t>t * 3 * C, d.ln, lp.qkvw, lp.qkvb, 1, C, 3 * C)
        attention_row(d.atty, d.scores, qkv, t, C, c.NH, c.T)
        residual_forward(NULL, d.mid, d.x, d.atty, lp.attprojw, lp.attprojb, 1, C, C)
        layernorm_forward(d.ln, &mean, &rstd, d.mid, lp.ln2w, lp.ln2b, 1, C)
        linear_forward(NULL, d.fch, d.ln, lp.fcw, lp.fcb, 1, C, F)
        gelu_forward(d.fch_gelu, d.fch, F)
        residual_forward(NULL, d.x, d.mid, d.fch_gelu, lp.fcprojw, lp.fcprojb, 1, F, C)
    layernorm_forward(d.ln, &mean, &rstd, d.x, p.lnfw, p.lnfb, 1, C)
    linear_forward(NULL, d.logits, d.ln, p.wte, NULL, 1, C, c.V)
    d.n = t + 1
