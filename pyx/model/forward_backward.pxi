# The forward / backward pass of one micro-batch, timed per profile bucket.

# --- profile: one table of time buckets ------------------------------------------------------

cdef enum:
    PROFILE_EMBEDDING = 0           # token + position embedding, forward and backward
    PROFILE_BLOCK_FORWARD = 1
    PROFILE_CLASSIFIER_LOSS = 2     # the final norm, logits and cross-entropy
    PROFILE_CLEAR = 3               # clearing the parameter gradients of a micro-batch
    PROFILE_CLASSIFIER_BACKWARD = 4
    PROFILE_BLOCK_BACKWARD = 5
    PROFILE_ACCUMULATE = 6          # gradient validation and ordered accumulation
    PROFILE_TURN_WAIT = 7           # waiting for the micro-batch's accumulation turn
    PROFILE_OPTIMIZER = 8           # mean, norm and update of this sphere's chunks
    NUM_PROFILE_BUCKETS = 9

cdef const char* PROFILE_BUCKET_NAMES[NUM_PROFILE_BUCKETS]
PROFILE_BUCKET_NAMES[:] = [b"embedding", b"block_forward", b"classifier_loss",
                           b"clear_gradients", b"classifier_backward", b"block_backward",
                           b"accumulate", b"turn_wait", b"optimizer"]


cdef inline void tock(double* timers, int bucket, double* t) noexcept nogil:
    # adds the time since t to a bucket (no-op when profiling is off) and restarts t
    cdef double now
    if timers != NULL:
        now = now_seconds()
        timers[bucket] += now - t[0]
        t[0] = now


# --- the pass --------------------------------------------------------------------------------

cdef inline float* site_h(const LayerActs* a, int site, int N) noexcept nogil:
    # where block a keeps the adapter of `site`'s x' A^T
    return a.lora_h + <size_t>site * N * a.lora.rank


cdef void adapted_residual_forward(LayerActs* a, float* out, const float* res, const float* inp,
                                   const float* weight, const float* bias, int N, int C,
                                   int OC, const ModelConfig* c, const Dropout* d, int l,
                                   int site, int drop_site) noexcept nogil:
    # out[N,OC] = res + dropout(inp @ weight^T + bias + the site's adapter): a projection
    # with an adapter, added onto the residual stream
    cdef size_t i, size = <size_t>N * OC
    linear_forward(a.bf16, out, inp, weight, bias, N, C, OC)
    lora_forward(a.lora, c, out, OC, site_h(a, site, N), a.lora_x, inp, N, d, l, site)
    if dropout_on(d):
        dropout_apply(out, out, size, d, dropout_key(d, l, drop_site), 0)
    for i in range(size):
        out[i] = res[i] + out[i]


cdef void block_forward(LayerActs* a, const float* res, const LayerParams* p, int B, int n,
                        const ModelConfig* c, const Dropout* d, int l) noexcept nogil:
    # block l on the residual stream res (N, C): a.residual3 = its output (d: NULL or p = 0
    # for no dropout)
    cdef int N = B * n, C = c.C, F = c.F
    cdef bint drop = dropout_on(d)
    # residual2 = res + dropout(c_proj(attention(c_attn(ln_1(res)))))
    layernorm_forward(a.ln, a.ln1_mean, a.ln1_rstd, res, p.ln1w, p.ln1b, N, C)
    linear_forward(a.bf16, a.qkv, a.ln, p.qkvw, p.qkvb, N, C, 3 * C)
    if lora_on(a.lora, LORA_QKV):
        lora_forward(a.lora, c, a.qkv, 3 * C, site_h(a, LORA_QKV, N), a.lora_x, a.ln, N, d, l,
                     LORA_QKV)
    attention_forward(bf16_products(a.bf16), a.atty, a.att_max, a.att_scale, a.att_probs, a.qkv,
                      B, n, C, c.NH, c.NH, d, l)
    if lora_on(a.lora, LORA_ATTPROJ):
        adapted_residual_forward(a, a.residual2, res, a.atty, p.attprojw, p.attprojb, N, C, C,
                                 c, d, l, LORA_ATTPROJ, DROP_ATTN_PROJ)
    elif drop:
        residual_dropout_forward(a.bf16, a.residual2, res, a.atty, p.attprojw, p.attprojb, N, C, C, d,
                                 dropout_key(d, l, DROP_ATTN_PROJ))
    else:
        residual_forward(a.bf16, a.residual2, res, a.atty, p.attprojw, p.attprojb, N, C, C)
    # residual3 = residual2 + dropout(c_proj(gelu(c_fc(ln_2(residual2)))))
    layernorm_forward(a.ln, a.ln2_mean, a.ln2_rstd, a.residual2, p.ln2w, p.ln2b, N, C)
    linear_forward(a.bf16, a.fch, a.ln, p.fcw, p.fcb, N, C, F)
    if lora_on(a.lora, LORA_FC):
        lora_forward(a.lora, c, a.fch, F, site_h(a, LORA_FC, N), a.lora_x, a.ln, N, d, l,
                     LORA_FC)
    gelu_forward(a.fch_gelu, a.fch, <size_t>N * F)
    if lora_on(a.lora, LORA_FCPROJ):
        adapted_residual_forward(a, a.residual3, a.residual2, a.fch_gelu, p.fcprojw, p.fcprojb,
                                 N, F, C, c, d, l, LORA_FCPROJ, DROP_MLP_PROJ)
    elif drop:
        residual_dropout_forward(a.bf16, a.residual3, a.residual2, a.fch_gelu, p.fcprojw, p.fcprojb,
                                 N, F, C, d, dropout_key(d, l, DROP_MLP_PROJ))
    else:
        residual_forward(a.bf16, a.residual3, a.residual2, a.fch_gelu, p.fcprojw, p.fcprojb, N, F, C)


cdef inline void site_backward(const LayerActs* la, const ModelConfig* c, float* lora_grads,
                               float* dx, const float* dy, int ldy, const float* x, int N,
                               const Dropout* d, int l, int site) noexcept nogil:
    # the adapter of `site` (if it has one): its gradients into lora_grads, its part of d(x);
    # dy: the gradient of the site's output columns, rows ldy apart
    if lora_on(la.lora, site):
        lora_backward(la.lora, c, lora_grads, dx, dy, ldy, site_h(la, site, N), la.lora_dh,
                      la.lora_x, x, N, d, l, site)


cdef void block_backward(Activations* a, const LayerActs* la, const float* res, const LayerParams* p,
                         LayerParams* g, float* lora_grads, const ModelConfig* c,
                         const Dropout* d, int l) noexcept nogil:
    # gradient of block l whose input was res: a.dresidual holds d(output) on entry and
    # d(res) on return; g += the gradients of the block's parameters (NULL fields: frozen),
    # lora_grads += the adapters' (with adapters). d: the forward's dropout
    cdef int B = a.B, n = a.n, N = a.B * a.n, C = c.C, F = c.F
    cdef size_t NC = <size_t>N * C
    cdef bint drop = dropout_on(d)
    # residual3 = residual2 + dropout(c_proj(gelu(c_fc(ln_2(residual2)))))
    clear(a.dresidual_mid, NC)
    residual_backward(a.dresidual_mid, a.dresidual, NC)
    if drop:     # the projection's gradient is dropped as its output was
        dropout_apply(a.dresidual, a.dresidual, NC, d, dropout_key(d, l, DROP_MLP_PROJ), 0)
    gelu_forward(la.fch_gelu, la.fch, <size_t>N * F)
    clear(a.dwide, <size_t>N * F)
    linear_backward(a.bf16, a.dwide, g.fcprojw, g.fcprojb, a.dresidual, la.fch_gelu, p.fcprojw, N, F, C)
    site_backward(la, c, lora_grads, a.dwide, a.dresidual, C, la.fch_gelu, N, d, l, LORA_FCPROJ)
    clear(a.dfch, <size_t>N * F)
    gelu_backward(a.dfch, la.fch, a.dwide, <size_t>N * F)
    layernorm_apply(la.ln, la.residual2, la.ln2_mean, la.ln2_rstd, p.ln2w, p.ln2b, N, C)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.fcw, g.fcb, a.dfch, la.ln, p.fcw, N, C, F)
    site_backward(la, c, lora_grads, a.dnarrow, a.dfch, F, la.ln, N, d, l, LORA_FC)
    layernorm_backward(a.dresidual_mid, g.ln2w, g.ln2b, a.dnarrow, la.residual2, p.ln2w,
                       la.ln2_mean, la.ln2_rstd, N, C)
    # residual2 = res + dropout(c_proj(attention(c_attn(ln_1(res)))))
    clear(a.dresidual, NC)
    residual_backward(a.dresidual, a.dresidual_mid, NC)
    if drop:
        dropout_apply(a.dresidual_mid, a.dresidual_mid, NC, d,
                      dropout_key(d, l, DROP_ATTN_PROJ), 0)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.attprojw, g.attprojb, a.dresidual_mid, la.atty, p.attprojw,
                    N, C, C)
    site_backward(la, c, lora_grads, a.dnarrow, a.dresidual_mid, C, la.atty, N, d, l,
                  LORA_ATTPROJ)
    clear(a.dwide, NC * 3)
    attention_backward(bf16_products(a.bf16), a.dwide, la.att_probs, la.att_dprobs, a.dnarrow,
                       la.qkv, la.att_max, la.att_scale, B, n, C, c.NH, c.NH, d, l)
    layernorm_apply(la.ln, res, la.ln1_mean, la.ln1_rstd, p.ln1w, p.ln1b, N, C)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.qkvw, g.qkvb, a.dwide, la.ln, p.qkvw, N, C, 3 * C)
    site_backward(la, c, lora_grads, a.dnarrow, a.dwide, 3 * C, la.ln, N, d, l, LORA_QKV)
    layernorm_backward(a.dresidual, g.ln1w, g.ln1b, a.dnarrow, res, p.ln1w, la.ln1_mean,
                       la.ln1_rstd, N, C)


cdef bint classifier_forward(Activations* a, double* loss, int* counted, const ModelParams* p,
                             ModelParams* g, const float* res, const ModelConfig* c,
                             const int* tgt, int stride, int pad_id, float* logits_out,
                             double* timers, double* t, const int* stop) noexcept nogil:
    # logits = norm_f(res) @ lm_head^T and the loss, in blocks of a.cls_rows rows, so that the
    # logits are never held whole (norm_f: GPT-2's ln_f, Llama's RMSNorm; lm_head: wte when
    # tied). With tgt, loss and counted get the sum over the targets != pad_id (row order).
    # With g (gradients), each block's dlogits go back through the classifier at once:
    # g.lm_head, g.lnfw, g.lnfb += their part and a.dresidual = d(res).
    # logits_out: NULL, or (N, V) rows to write the logits into. False when *stop was set.
    cdef int N = a.B * a.n, C = c.C, V = c.V
    cdef int r0 = 0, rows
    cdef float* logits
    cdef float* dln
    while r0 < N:
        if stopped(stop):
            return False
        rows = min(a.cls_rows, N - r0)
        norm_forward(c, a.lnf_rows, a.lnf_mean, a.lnf_rstd, res + <size_t>r0 * C, p.lnfw,
                     p.lnfb, rows)
        logits = logits_out + <size_t>r0 * V if logits_out != NULL else a.logits_rows
        linear_forward(a.bf16, logits, a.lnf_rows, p.lm_head, NULL, rows, C, V)
        if tgt != NULL:
            crossentropy_forward_backward(logits, loss, counted, tgt, stride, a.n, r0, rows, V,
                                          pad_id, g != NULL)
        tock(timers, PROFILE_CLASSIFIER_LOSS, t)
        if g != NULL:
            dln = a.dnarrow + <size_t>r0 * C
            clear(dln, <size_t>rows * C)
            linear_backward(a.bf16, dln, g.lm_head, NULL, logits, a.lnf_rows, p.lm_head, rows,
                            C, V)
            clear(a.dresidual + <size_t>r0 * C, <size_t>rows * C)
            if c.family == FAMILY_LLAMA:
                rmsnorm_backward(a.dresidual + <size_t>r0 * C, g.lnfw, dln, res + <size_t>r0 * C,
                                 p.lnfw, a.lnf_rstd, rows, C)
            else:
                layernorm_backward(a.dresidual + <size_t>r0 * C, g.lnfw, g.lnfb, dln,
                                   res + <size_t>r0 * C, p.lnfw, a.lnf_mean, a.lnf_rstd, rows, C)
            tock(timers, PROFILE_CLASSIFIER_BACKWARD, t)
        r0 += rows
    return True


cdef inline size_t trained_size(const Activations* a, const ModelConfig* c) noexcept nogil:
    # floats of the gradient a pass produces: the adapters', or the parameters'
    return lora_size(a.lora, c) if a.lora != NULL else model_size(c)


cdef inline void frozen_or_trained(ModelParams* g, float* grads, const Activations* a,
                                   const ModelConfig* c) noexcept nogil:
    # g: the views of grads, or all NULL when adapters are trained (the parameters are frozen)
    if a.lora != NULL:
        memset(g, 0, sizeof(ModelParams))
    else:
        model_params(g, grads, c)


cdef double model_forward(Activations* a, int* counted, float* params, const ModelConfig* c,
                          const int* inp, const int* tgt, int stride, int B, int n, int pad_id,
                          float* grads, float* logits_out, const Dropout* d, double* timers,
                          const int* stop) noexcept nogil:
    # Forward pass of B sequences of n tokens (n <= T, B <= maxB) and the summed loss over
    # targets != pad_id (0 with tgt == NULL). With grads (training: the parameters', or with
    # adapters (a.lora) the adapters' only, trained_size floats), it clears grads and runs
    # the classifier's backward fused with its forward (classifier_forward); model_backward
    # does the rest. logits_out: NULL or (B*n, V) to receive the logits. d: the micro-batch's
    # dropout (NULL: none). timers: NULL or the profile buckets. When *stop becomes set the
    # pass gives up between blocks and returns NaN.
    cdef int l
    cdef ModelParams p, g
    cdef LayerParams lp
    cdef LayerActs la
    cdef const float* res
    cdef double t = now_seconds() if timers != NULL else 0.0
    cdef double loss = 0.0
    a.B = B
    a.n = n
    counted[0] = 0
    model_params(&p, params, c)
    encoder_forward(a.encoded, inp, stride, p.wte, p.wpe, B, n, c.C)
    if dropout_on(d) and c.family == FAMILY_GPT2:
        dropout_apply(a.encoded, a.encoded, <size_t>B * n * c.C, d,
                      dropout_key(d, 0, DROP_EMBEDDING), 0)
    tock(timers, PROFILE_EMBEDDING, &t)
    res = a.encoded
    for l in range(c.L):
        if stopped(stop):
            return NAN
        layer_params(&lp, params, c, l)
        layer_acts(&la, a, c, l)
        if c.family == FAMILY_LLAMA:
            llama_block_forward(&la, res, &lp, B, n, c, d, l)
        else:
            block_forward(&la, res, &lp, B, n, c, d, l)
        res = la.residual3
        tock(timers, PROFILE_BLOCK_FORWARD, &t)
    if grads != NULL:
        clear(grads, trained_size(a, c))
        frozen_or_trained(&g, grads, a, c)
        tock(timers, PROFILE_CLEAR, &t)
    if not classifier_forward(a, &loss, counted, &p, &g if grads != NULL else NULL, res, c,
                              tgt, stride, pad_id, logits_out, timers, &t, stop):
        return NAN
    return loss


cdef void model_backward(float* grads, Activations* a, float* params, const ModelConfig* c,
                         const int* inp, int stride, const Dropout* d, double* timers,
                         const int* stop) noexcept nogil:
    # grads += d(summed loss)/d(params) of the blocks and the embeddings, after
    # model_forward(grads) with the same d left a.dresidual = d(last block's output) and the classifier's
    # part in grads. When *stop becomes set it gives up between blocks (grads are then
    # partial).
    cdef int B = a.B, n = a.n, C = c.C
    cdef int l
    cdef ModelParams g
    cdef LayerParams lp, lg
    cdef LayerActs la
    cdef const float* res
    cdef double t = now_seconds() if timers != NULL else 0.0
    cdef float* lora_grads = grads if a.lora != NULL else NULL
    frozen_or_trained(&g, grads, a, c)
    memset(&lg, 0, sizeof(lg))
    for l in range(c.L - 1, -1, -1):
        if stopped(stop):
            return
        layer_params(&lp, params, c, l)
        if lora_grads == NULL:
            layer_params(&lg, grads, c, l)
        res = a.encoded
        if l > 0:
            layer_acts(&la, a, c, l - 1)
            res = la.residual3                 # the block's input: the previous output
        layer_acts(&la, a, c, l)
        if c.family == FAMILY_LLAMA:
            llama_block_backward(a, &la, res, &lp, &lg, lora_grads, c, d, l)
        else:
            block_backward(a, &la, res, &lp, &lg, lora_grads, c, d, l)
        tock(timers, PROFILE_BLOCK_BACKWARD, &t)
    if lora_grads != NULL:       # the embeddings are frozen
        return
    if dropout_on(d) and c.family == FAMILY_GPT2:
        dropout_apply(a.dresidual, a.dresidual, <size_t>B * n * C, d,
                      dropout_key(d, 0, DROP_EMBEDDING), 0)
    encoder_backward(g.wte, g.wpe, a.dresidual, inp, stride, B, n, C)
    tock(timers, PROFILE_EMBEDDING, &t)
