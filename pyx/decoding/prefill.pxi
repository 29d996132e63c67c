# Prefill: the positions of a prompt as one batched pass through the engine's matrix
# products, in fp32 or on the weights' bf16 copy (the scheme is described at the top of
# kv_cache.pxi).

cdef void prefill_columns(DecodeCache* d, DecodeWorker* w, float* out, int ldo,
                          const float* inp, int K, const float* weight, const float* bias,
                          const float* res, int OC, bint gelu) noexcept nogil:
    # worker w's chunks of PREFILL_COLS columns of out[n, OC] (row stride ldo) for the d.pn
    # prompt rows: (res +) bias + inp[n, K] @ weight[OC, K]^T, then gelu when asked. The sum
    # is rounded as linear_forward and residual_forward round it: the product adds onto
    # bias (or res + bias); res, when given, has the stride of out; bias NULL: none.
    cdef int n = d.pn, chunks = (OC + PREFILL_COLS - 1) // PREFILL_COLS
    cdef int q, q0, q1, c0, c1, i, o
    cdef float* row
    rows_of(chunks, w.id, d.threads, &q0, &q1)
    if w.b != NULL and q1 > q0:         # bf16: the input rounded once for the worker's chunks
        bf16_round_rows(w.b.inputs, inp, n, K, K)
    for q in range(q0, q1):
        c0 = q * PREFILL_COLS
        c1 = min(OC, c0 + PREFILL_COLS)
        for i in range(n):
            row = out + <size_t>i * ldo
            if res == NULL and bias == NULL:
                for o in range(c0, c1):
                    row[o] = 0.0
            elif res == NULL:
                for o in range(c0, c1):
                    row[o] = bias[o]
            elif bias == NULL:
                for o in range(c0, c1):
                    row[o] = res[<size_t>i * ldo + o]
            else:
                for o in range(c0, c1):
                    row[o] = res[<size_t>i * ldo + o] + bias[o]
        if w.b == NULL:
            sgemm_rm(False, True, n, c1 - c0, K, 1.0, inp, K, weight + <size_t>c0 * K, K, 1.0,
                     out + c0, ldo)
        else:
            bf16_gemm(&w.b.ctx, False, True, n, c1 - c0, K, w.b.inputs, K,
                      bf16_weight(w.b, weight) + <size_t>c0 * K, K, True, out + c0, ldo)
        if gelu:
            for i in range(n):
                gelu_forward(out + <size_t>i * ldo + c0, out + <size_t>i * ldo + c0, c1 - c0)


cdef void decode_prefill_part(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # worker w's part of prefilling d.pn positions from d.n on (prefill_layers), then its rows
    # of the classifier on the last position
    prefill_layers(d, w)
    decode_classify(d, w, d.px + <size_t>(d.pn - 1) * d.c.C)
    decode_sync(d, w)


cdef void prefill_attention(DecodeCache* d, DecodeWorker* w, const float* qkv, int h0,
                            int h1) noexcept nogil:
    # query heads h0 .. h1-1 of the d.pn new rows (from d.n on) over every cached row, causal,
    # into d.patty (qkv: the layer's cache)
    cdef const ModelConfig* c = &d.c
    cdef int C = c.C, W = c.W, t0 = d.n, n = d.pn, hs = head_size(c), span = t0 + n
    cdef int h, i, j
    cdef float* row
    cdef const float* k
    cdef float mx, s
    cdef float scale = 1.0 / sqrtf(<float>hs)
    for h in range(h0, h1):
        k = qkv + C + (h // (c.NH // c.KVH)) * hs
        sgemm_rm(False, True, n, span, hs, scale, qkv + <size_t>t0 * W + h * hs, W, k, W, 0.0,
                 w.pscores, span)
        for i in range(n):
            row = w.pscores + <size_t>i * span
            attention_softmax_row(row, t0 + i + 1, &mx, &s)
            for j in range(t0 + i + 1, span):
                row[j] = 0.0
        sgemm_rm(False, False, n, hs, span, 1.0, w.pscores, span, k + c.KVH * hs, W, 0.0,
                 d.patty + h * hs, C)


cdef void llama_prefill_layers(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # prefill_layers of the Llama form: the same steps with its norms, the rotary positions
    # (each worker turns its share of the new rows), and silu(gate) * up by rows
    cdef const ModelConfig* c = &d.c
    cdef int C = c.C, F = c.F, W = c.W, t0 = d.n, n = d.pn, hs = head_size(c)
    cdef int half = hs // 2, l, i, r0, r1, h0, h1
    cdef LayerParams lp
    cdef float* qkv
    rows_of(n, w.id, d.threads, &r0, &r1)
    rows_of(c.NH, w.id, d.threads, &h0, &h1)
    for i in range(r0, r1):
        decode_embed(d, d.px + <size_t>i * C, d.ptokens[i], t0 + i)
    for l in range(c.L):
        layer_params(&lp, <float*>d.params, c, l)
        qkv = d.qkv + <size_t>l * c.T * W
        norm_forward(c, d.pln + <size_t>r0 * C, d.pmean + r0, d.prstd + r0,
                     d.px + <size_t>r0 * C, lp.ln1w, NULL, r1 - r0)
        decode_sync(d, w)
        prefill_columns(d, w, qkv + <size_t>t0 * W, W, d.pln, C, lp.qkvw, lp.qkvb, NULL, W,
                        False)
        decode_sync(d, w)
        for i in range(r0, r1):
            rope_rotate_row(qkv + <size_t>(t0 + i) * W, d.rope_cos + <size_t>(t0 + i) * half,
                            d.rope_sin + <size_t>(t0 + i) * half, 0, c.NH + c.KVH, hs, False)
        decode_sync(d, w)
        prefill_attention(d, w, qkv, h0, h1)
        decode_sync(d, w)
        prefill_columns(d, w, d.pmid, C, d.patty, C, lp.attprojw, NULL, d.px, C, False)
        decode_sync(d, w)
        norm_forward(c, d.pln + <size_t>r0 * C, d.pmean + r0, d.prstd + r0,
                     d.pmid + <size_t>r0 * C, lp.ln2w, NULL, r1 - r0)
        decode_sync(d, w)
        prefill_columns(d, w, d.pfch, c.FW, d.pln, C, lp.fcw, NULL, NULL, c.FW, False)
        decode_sync(d, w)
        swiglu_forward(d.pact + <size_t>r0 * F, d.pfch + <size_t>r0 * c.FW, r1 - r0, F)
        decode_sync(d, w)
        prefill_columns(d, w, d.px, C, d.pact, F, lp.fcprojw, NULL, d.pmid, C, False)
        decode_sync(d, w)


cdef void prefill_layers(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # worker w's part of running d.pn positions from d.n on through every block, leaving their
    # residual streams in d.px: its share of the rows in the row-wise steps (embedding, layer
    # norms), its chunks of PREFILL_COLS output columns of each linear layer (all rows at
    # once: a short prompt keeps every thread busy too), its heads of the attention, with a
    # barrier between steps. The chunks are fixed by the model's sizes and the rows by the
    # prompt alone, and a matrix product's bits depend on its shape (BLAS takes other paths
    # for small products), so the thread count changes no bit.
    cdef const ModelConfig* c = &d.c
    cdef int C = c.C, F = c.F, t0 = d.n, n = d.pn, hs = c.C // c.NH, span = t0 + n
    cdef int l, h, i, j, r0, r1, h0, h1
    cdef LayerParams lp
    cdef float* qkv
    cdef float* row
    cdef float mx, s
    cdef float scale = 1.0 / sqrtf(<float>hs)
    if c.family == FAMILY_LLAMA:
        llama_prefill_layers(d, w)
        return
    rows_of(n, w.id, d.threads, &r0, &r1)
    rows_of(c.NH, w.id, d.threads, &h0, &h1)
    for i in range(r0, r1):
        decode_embed(d, d.px + <size_t>i * C, d.ptokens[i], t0 + i)
    for l in range(c.L):
        layer_params(&lp, <float*>d.params, c, l)
        qkv = d.qkv + <size_t>l * c.T * 3 * C
        # qkv rows = c_attn(ln_1(x)), written into the cache
        layernorm_forward(d.pln + <size_t>r0 * C, d.pmean + r0, d.prstd + r0,
                          d.px + <size_t>r0 * C, lp.ln1w, lp.ln1b, r1 - r0, C)
        decode_sync(d, w)
        prefill_columns(d, w, qkv + <size_t>t0 * 3 * C, 3 * C, d.pln, C, lp.qkvw, lp.qkvb,
                        NULL, 3 * C, False)
        decode_sync(d, w)
        for h in range(h0, h1):
            # scores of the n new rows against every cached row 0 .. span-1, causal
            sgemm_rm(False, True, n, span, hs, scale, qkv + <size_t>t0 * 3 * C + h * hs,
                     3 * C, qkv + C + h * hs, 3 * C, 0.0, w.pscores, span)
            for i in range(n):
                row = w.pscores + <size_t>i * span
                attention_softmax_row(row, t0 + i + 1, &mx, &s)
                for j in range(t0 + i + 1, span):
                    row[j] = 0.0
            sgemm_rm(False, False, n, hs, span, 1.0, w.pscores, span,
                     qkv + 2 * C + h * hs, 3 * C, 0.0, d.patty + h * hs, C)
        decode_sync(d, w)
        # mid = x + c_proj(atty); fch = gelu(c_fc(ln_2(mid))); x = mid + c_proj(fch)
        prefill_columns(d, w, d.pmid, C, d.patty, C, lp.attprojw, lp.attprojb, d.px, C, False)
        decode_sync(d, w)
        layernorm_forward(d.pln + <size_t>r0 * C, d.pmean + r0, d.prstd + r0,
                          d.pmid + <size_t>r0 * C, lp.ln2w, lp.ln2b, r1 - r0, C)
        decode_sync(d, w)
        prefill_columns(d, w, d.pfch, F, d.pln, C, lp.fcw, lp.fcb, NULL, F, True)
        decode_sync(d, w)
        prefill_columns(d, w, d.px, C, d.pfch, F, lp.fcprojw, lp.fcprojb, d.pmid, C, False)
        decode_sync(d, w)


cdef void decode_prefill(DecodeCache* d, const int* tokens, int n) noexcept nogil:
    # the model on n more positions d.n .. d.n+n-1 (d.n + n <= T) as one batched pass: their
    # qkv rows join the cache and d.logits holds the last one's logits
    d.ptokens = tokens
    d.pn = n
    decode_run(d, DECODE_PREFILL)
    d.n += n
