# Generation's key/value cache (DecodeCache) and its workers, and one position at a time
# (decode_step): its matrix-vector products split by output rows over the decoder's threads.
# A prompt first fills the cache in one batched forward pass (prefill.pxi).
#
# Threads. A DecodeCache owns `threads` workers: worker 0 is the caller's thread, the others
# are pthreads created with the cache and joined when it is freed. A position runs in phases
# separated by a barrier: qkv rows, attention heads, the attention projection's rows, the
# MLP's rows, its projection's rows, and at the end the classifier's rows. Each worker takes a
# fixed contiguous range of rows (or heads) of each phase and computes every row with
# cllm_matvec_rows, whose result does not depend on the range, so the logits are the same bits
# for any thread count. The layer norms are computed by every worker into its own buffer (a
# row of C floats: cheaper than a barrier). Worker threads touch no Python object.
#
# Prefill runs the positions of a prompt as rows of the engine's matrix products (sgemm), with
# causal attention over the cache in one block per head, and writes every layer's qkv rows into
# the cache; each product is cut into fixed chunks of PREFILL_COLS output columns over all the
# prompt's rows, each worker taking whole chunks (and whole heads of the attention), so no
# product's shape depends on the thread count and a prompt of a few tokens keeps every thread
# busy; the last position's logits then go through the same classifier rows as a decoded
# position. Its logits agree with feeding the positions one by one to float rounding (the
# sums are grouped differently), not bit for bit.

cdef extern from "decoding/matvec.h" nogil:
    void cllm_matvec_rows(float* out, const float* W, const float* x, int r0, int r1, int n)
    void cllm_matvec_rows_bf16(float* out, const uint16_t* W, const float* xs, int r0, int r1,
                               int n)
    void cllm_bf16_split(float* xs, const float* x, int n)
    ctypedef struct cllm_spin_barrier:
        pass
    void cllm_spin_init(cllm_spin_barrier* b, int n)
    void cllm_spin_wait(cllm_spin_barrier* b, int* local_sense)

cdef enum:
    DECODE_STEP = 0
    DECODE_CLASSIFY = 1
    DECODE_PREFILL = 2
    DECODE_QUIT = 3
    DECODE_SCORE = 4
    PREFILL_COLS = 128      # output columns per matrix product in prefill


cdef struct DecodeWorker:
    void* cache         # the DecodeCache this worker belongs to
    int id
    float* ln           # (C,) this worker's layer-norm output
    float* scores       # (T,) one head's attention row
    float* pscores      # (T, T) one head's scores of the prompt's rows (prefill)
    int sense           # this worker's sense of the phase barrier
    pthread_t thread
    int started
    # precision bf16 (NULL for fp32): the worker's oneDNN state for prefill's products, and
    # the input of a matrix-vector product rounded to bf16 values
    Bf16Products* b
    float* xr           # (max(C, F),) the input rounded and split (cllm_bf16_split)


cdef struct DecodeCache:
    ModelConfig c
    const float* params
    int n               # positions cached (< T to take another)
    # (L, T, W) every layer's qkv rows of the positions so far (Llama: q and k turned by
    # their positions)
    float* qkv
    float* x            # (C,) the residual stream of the new position
    float* mid          # (C,) the stream between a block's two residual adds
    float* atty         # (C,)
    # (FW,) gelu(c_fc(ln_2(mid))); Llama: gate, up, then silu(gate) * up in the first F
    float* fch
    float* logits       # (V,)
    # prefill: up to T positions at once
    float* px           # (T, C)
    float* pmid         # (T, C)
    float* pln          # (T, C)
    float* patty        # (T, C)
    float* pfch         # (T, FW)
    float* pact         # (T, F) Llama: silu(gate) * up; none in GPT-2
    float* pmean        # (T,)
    float* prstd        # (T,)
    float* rope_cos     # (T, hs/2) Llama's rotary tables; none in GPT-2
    float* rope_sin
    const int* ptokens  # the prompt's ids being prefilled, pn of them
    int pn
    # scoring (scoring.pxi): the last pk of the pn positions, their targets and results
    const int* ptargets
    int pk
    double* plogp       # (pk,) log-probability of each target
    unsigned char* pgreedy  # (pk,) 1 where the target is the first argmax of its logits
    float* slogits      # (SCORE_ROWS, V) logits of a block of scored rows, allocated on first use
    float* memory
    # the workers
    int threads
    int mode            # DECODE_STEP, _PREFILL, _SCORE or _QUIT, set before the start barrier
    DecodeWorker* workers
    pthread_barrier_t barrier       # the start of a position: workers sleep here in between
    int barrier_ready
    cllm_spin_barrier phase         # between the phases of a position


cdef inline void rows_of(int total, int w, int threads, int* r0, int* r1) noexcept nogil:
    # the fixed share [r0, r1) of `total` rows that worker w of `threads` computes
    r0[0] = <int>((<long long>total * w) // threads)
    r1[0] = <int>((<long long>total * (w + 1)) // threads)


cdef inline void decode_sync(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # the end of a phase: every worker waits for the others
    if d.threads > 1:
        cllm_spin_wait(&d.phase, &w.sense)


cdef inline void decode_start(DecodeCache* d) noexcept nogil:
    # the start of a position (or of a prefill): the sleeping workers wake up
    if d.threads > 1:
        pthread_barrier_wait(&d.barrier)


cdef void decode_attention_head(float* out, float* scores, const float* qkv, int t,
                                const ModelConfig* c, int h) noexcept nogil:
    # out[hs] = causal attention of query head h of position t over the cached qkv rows 0..t
    # (its key/value head h / (NH / KVH))
    cdef int hs = head_size(c), W = c.W
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef float mx, s
    cdef const float* k = qkv + c.C + (h // (c.NH // c.KVH)) * hs
    attention_scores(NULL, scores, qkv + h * hs, k, NULL, NULL, t, 1, c.T, W, hs, scale)
    attention_softmax_row(scores, t + 1, &mx, &s)
    sgemm_rm(False, False, 1, hs, t + 1, 1.0, scores, c.T, k + c.KVH * hs, W, 0.0, out, c.C)


cdef void decode_matvec(DecodeWorker* w, float* out, const float* W, const float* x, int r0,
                        int r1, int n) noexcept nogil:
    # out[r - r0] = dot(W[r, :], x) for rows r0 <= r < r1 of W[., n]: in fp32, or with bf16
    # the weights' bf16 copy and x rounded to bf16 (products exact, fp32 sums)
    if w.b == NULL:
        cllm_matvec_rows(out, W, x, r0, r1, n)
        return
    cllm_bf16_split(w.xr, x, n)
    cllm_matvec_rows_bf16(out, bf16_weight(w.b, W), w.xr, r0, r1, n)


cdef void decode_classify(DecodeCache* d, DecodeWorker* w, const float* x) noexcept nogil:
    # logits rows of this worker: lm_head rows . norm_f(x), x the last position's stream
    cdef const ModelConfig* c = &d.c
    cdef ModelParams p
    cdef float mean, rstd
    cdef int r0, r1
    model_params(&p, <float*>d.params, c)
    norm_forward(c, w.ln, &mean, &rstd, x, p.lnfw, p.lnfb, 1)
    rows_of(c.V, w.id, d.threads, &r0, &r1)
    decode_matvec(w, d.logits + r0, p.lm_head, w.ln, r0, r1, c.C)


cdef void decode_step(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # worker w's part of one position (d.n) whose embedding is in d.x; every worker returns
    # after the last barrier, with d.logits complete
    cdef const ModelConfig* c = &d.c
    cdef int C = c.C, F = c.F, t = d.n, hs = c.C // c.NH, l, r, r0, r1
    cdef LayerParams lp
    cdef float mean, rstd
    cdef float* qkv
    if c.family == FAMILY_LLAMA:
        llama_decode_step(d, w)
        return
    for l in range(c.L):
        layer_params(&lp, <float*>d.params, c, l)
        qkv = d.qkv + <size_t>l * c.T * 3 * C
        # qkv rows of position t = c_attn(ln_1(x))
        layernorm_forward(w.ln, &mean, &rstd, d.x, lp.ln1w, lp.ln1b, 1, C)
        rows_of(3 * C, w.id, d.threads, &r0, &r1)
        decode_matvec(w, qkv + <size_t>t * 3 * C + r0, lp.qkvw, w.ln, r0, r1, C)
        for r in range(r0, r1):
            qkv[<size_t>t * 3 * C + r] += lp.qkvb[r]
        decode_sync(d, w)
        # attention, by heads
        rows_of(c.NH, w.id, d.threads, &r0, &r1)
        for r in range(r0, r1):
            decode_attention_head(d.atty + r * hs, w.scores, qkv, t, c, r)
        decode_sync(d, w)
        # mid = x + c_proj(atty), by rows (rounded as (x + bias) + product, as the engine's)
        rows_of(C, w.id, d.threads, &r0, &r1)
        decode_matvec(w, d.mid + r0, lp.attprojw, d.atty, r0, r1, C)
        for r in range(r0, r1):
            d.mid[r] = (d.x[r] + lp.attprojb[r]) + d.mid[r]
        decode_sync(d, w)
        # fch = gelu(c_fc(ln_2(mid))), by rows
        layernorm_forward(w.ln, &mean, &rstd, d.mid, lp.ln2w, lp.ln2b, 1, C)
        rows_of(F, w.id, d.threads, &r0, &r1)
        decode_matvec(w, d.fch + r0, lp.fcw, w.ln, r0, r1, C)
        for r in range(r0, r1):
            d.fch[r] += lp.fcb[r]
        gelu_forward(d.fch + r0, d.fch + r0, r1 - r0)
        decode_sync(d, w)
        # x = mid + c_proj(fch), by rows
        rows_of(C, w.id, d.threads, &r0, &r1)
        decode_matvec(w, d.x + r0, lp.fcprojw, d.fch, r0, r1, F)
        for r in range(r0, r1):
            d.x[r] = (d.mid[r] + lp.fcprojb[r]) + d.x[r]
        decode_sync(d, w)
    decode_classify(d, w, d.x)
    decode_sync(d, w)


cdef void llama_decode_step(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # decode_step of the Llama form. The qkv rows are shared out by whole heads, so that each
    # worker turns the q and k heads it computed; gate and up by the same rows of each, so that
    # each worker applies silu(gate) * up to its own rows.
    cdef const ModelConfig* c = &d.c
    cdef int C = c.C, F = c.F, W = c.W, t = d.n, hs = head_size(c), half = hs // 2
    cdef int l, r, r0, r1, h0, h1
    cdef LayerParams lp
    cdef float mean, rstd
    cdef float* qkv
    cdef float* row
    for l in range(c.L):
        layer_params(&lp, <float*>d.params, c, l)
        qkv = d.qkv + <size_t>l * c.T * W
        row = qkv + <size_t>t * W
        # q, k, v heads of position t from rmsnorm_1(x); q and k turned by position t
        norm_forward(c, w.ln, &mean, &rstd, d.x, lp.ln1w, NULL, 1)
        rows_of(c.NH + 2 * c.KVH, w.id, d.threads, &h0, &h1)
        decode_matvec(w, row + h0 * hs, lp.qkvw, w.ln, h0 * hs, h1 * hs, C)
        if lp.qkvb != NULL:
            for r in range(h0 * hs, h1 * hs):
                row[r] += lp.qkvb[r]
        rope_rotate_row(row, d.rope_cos + <size_t>t * half, d.rope_sin + <size_t>t * half, h0,
                        min(h1, c.NH + c.KVH), hs, False)
        decode_sync(d, w)
        rows_of(c.NH, w.id, d.threads, &r0, &r1)
        for r in range(r0, r1):
            decode_attention_head(d.atty + r * hs, w.scores, qkv, t, c, r)
        decode_sync(d, w)
        # mid = x + o_proj(atty)
        rows_of(C, w.id, d.threads, &r0, &r1)
        decode_matvec(w, d.mid + r0, lp.attprojw, d.atty, r0, r1, C)
        for r in range(r0, r1):
            d.mid[r] = d.x[r] + d.mid[r]
        decode_sync(d, w)
        # fch[:F] = silu(gate_proj(u)) * up_proj(u), u = rmsnorm_2(mid)
        norm_forward(c, w.ln, &mean, &rstd, d.mid, lp.ln2w, NULL, 1)
        rows_of(F, w.id, d.threads, &r0, &r1)
        decode_matvec(w, d.fch + r0, lp.fcw, w.ln, r0, r1, C)
        decode_matvec(w, d.fch + F + r0, lp.fcw, w.ln, F + r0, F + r1, C)
        cllm_swiglu_row(d.fch + r0, d.fch + r0, d.fch + F + r0, r1 - r0)
        decode_sync(d, w)
        # x = mid + down_proj(fch)
        rows_of(C, w.id, d.threads, &r0, &r1)
        decode_matvec(w, d.x + r0, lp.fcprojw, d.fch, r0, r1, F)
        for r in range(r0, r1):
            d.x[r] = d.mid[r] + d.x[r]
        decode_sync(d, w)
    decode_classify(d, w, d.x)
    decode_sync(d, w)


cdef void* decode_worker_thread(void* arg) noexcept nogil:
    # a worker other than 0: runs its part of each position the caller starts
    cdef DecodeWorker* w = <DecodeWorker*>arg
    cdef DecodeCache* d = <DecodeCache*>w.cache
    while True:
        decode_start(d)                         # the caller has set d.mode and the input
        if d.mode == DECODE_QUIT:
            return NULL
        decode_work(d, w)


cdef void decode_work(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # worker w's part of the work d.mode names
    if d.mode == DECODE_STEP:
        decode_step(d, w)
    elif d.mode == DECODE_PREFILL:
        decode_prefill_part(d, w)
    else:
        decode_score_part(d, w)


cdef void decode_run(DecodeCache* d, int mode) noexcept nogil:
    # the caller's thread starts the workers on `mode` and does worker 0's part
    d.mode = mode
    decode_start(d)
    decode_work(d, &d.workers[0])


cdef void decode_embed(DecodeCache* d, float* out, int token, int t) noexcept nogil:
    # out[C] = wte[token] + wpe[t] (Llama: wte[token])
    cdef ModelParams p
    cdef int i
    model_params(&p, <float*>d.params, &d.c)
    if p.wpe == NULL:
        memcpy(out, p.wte + <size_t>token * d.c.C, d.c.C * sizeof(float))
        return
    for i in range(d.c.C):
        out[i] = p.wte[<size_t>token * d.c.C + i] + p.wpe[<size_t>t * d.c.C + i]


cdef void decode_forward(DecodeCache* d, int token) noexcept nogil:
    # the model on one more position (d.n < T): its qkv rows join the cache and d.logits holds
    # its logits
    decode_embed(d, d.x, token, d.n)
    decode_run(d, DECODE_STEP)
    d.n += 1


cdef int decode_worker_bf16(DecodeWorker* w, const ModelConfig* c, const float* params,
                            const uint16_t* weights) noexcept nogil:
    # w's products on bf16 inputs, weights = bf16(params); 0, or -1 when out of memory or
    # oneDNN cannot start
    cdef size_t widest = max(c.C, c.F)
    w.xr = <float*>calloc(widest, sizeof(float))
    w.b = <Bf16Products*>calloc(1, sizeof(Bf16Products))
    if w.xr == NULL or w.b == NULL:
        return -1
    w.b.inputs = <uint16_t*>malloc(<size_t>c.T * widest * sizeof(uint16_t))
    if w.b.inputs == NULL or bf16_context_init(&w.b.ctx) != 0:
        free(w.b.inputs)
        free(w.b)
        w.b = NULL
        return -1
    w.b.master = params
    w.b.weights = weights
    return 0


cdef int decode_products_status(DecodeCache* d) noexcept nogil:
    # 0, or the first worker's failed bf16 product status (its output was set to NaN)
    cdef int i
    for i in range(d.threads):
        if d.workers[i].b != NULL and d.workers[i].b.ctx.status != 0:
            return d.workers[i].b.ctx.status
    return 0


cdef int decode_cache_alloc(DecodeCache* d, const ModelConfig* c, const float* params,
                            int threads, const uint16_t* bf16) noexcept nogil:
    # returns 0 on success, -1 when out of memory, -2 when a thread cannot be started;
    # bf16: NULL (fp32), or bf16(params), for products on bf16 weights and inputs
    cdef size_t C = c.C, F = c.F, T = c.T, W = c.W, FW = c.FW
    cdef bint llama = c.family == FAMILY_LLAMA
    cdef size_t rope = T * (head_size(c) // 2) if llama else 0
    cdef size_t sizes[16]
    cdef float** slots[16]
    cdef int i
    memset(d, 0, sizeof(DecodeCache))
    d.c = c[0]
    d.params = params
    d.threads = threads
    sizes[:] = [<size_t>c.L * T * W, C, C, C, FW, <size_t>c.V,
                T * C, T * C, T * C, T * C, T * FW, T * F if llama else 0, T, T, rope, rope]
    slots[:] = [&d.qkv, &d.x, &d.mid, &d.atty, &d.fch, &d.logits,
                &d.px, &d.pmid, &d.pln, &d.patty, &d.pfch, &d.pact, &d.pmean, &d.prstd,
                &d.rope_cos, &d.rope_sin]
    d.memory = carve(slots, sizes, 16)
    if d.memory != NULL and llama:
        rope_tables(d.rope_cos, d.rope_sin, c.T, head_size(c), c.rope_theta)
    d.workers = <DecodeWorker*>calloc(threads, sizeof(DecodeWorker))
    if d.memory == NULL or d.workers == NULL:
        decode_cache_free(d)
        return -1
    for i in range(threads):
        d.workers[i].cache = d
        d.workers[i].id = i
        d.workers[i].ln = <float*>calloc(C, sizeof(float))
        d.workers[i].scores = <float*>calloc(T, sizeof(float))
        d.workers[i].pscores = <float*>calloc(T * T, sizeof(float))
        if d.workers[i].ln == NULL or d.workers[i].scores == NULL or d.workers[i].pscores == NULL:
            decode_cache_free(d)
            return -1
        if bf16 != NULL and decode_worker_bf16(&d.workers[i], c, params, bf16) != 0:
            decode_cache_free(d)
            return -1
    if threads > 1:
        if pthread_barrier_init(&d.barrier, NULL, threads) != 0:
            decode_cache_free(d)
            return -2
        d.barrier_ready = 1
        cllm_spin_init(&d.phase, threads)
        for i in range(1, threads):
            if pthread_create(&d.workers[i].thread, NULL, decode_worker_thread,
                              &d.workers[i]) != 0:
                decode_cache_free(d)
                return -2
            d.workers[i].started = 1
    return 0


cdef void decode_cache_free(DecodeCache* d) noexcept nogil:
    # stops and joins the workers (all of them wait at the start barrier between positions)
    cdef int i, running = 0
    if d.workers != NULL:
        for i in range(1, d.threads):
            running += d.workers[i].started
    if running and running < d.threads - 1:
        return      # some threads failed to start: the others wait forever; nothing is freed
    if running:
        d.mode = DECODE_QUIT
        pthread_barrier_wait(&d.barrier)
        for i in range(1, d.threads):
            pthread_join(d.workers[i].thread, NULL)
            d.workers[i].started = 0
    if d.barrier_ready:
        pthread_barrier_destroy(&d.barrier)
        d.barrier_ready = 0
    if d.workers != NULL:
        for i in range(d.threads):
            free(d.workers[i].ln)
            free(d.workers[i].scores)
            free(d.workers[i].pscores)
            free(d.workers[i].xr)
            if d.workers[i].b != NULL:
                bf16_context_free(&d.workers[i].b.ctx)
                free(d.workers[i].b.inputs)
                free(d.workers[i].b)
    free(d.memory)
    free(d.workers)
    free(d.slogits)
    d.memory = NULL
    d.workers = NULL
    d.slogits = NULL
