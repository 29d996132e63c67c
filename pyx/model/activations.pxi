# A sphere's activations: one table of sizes, carved out of one allocation, and the named
# slices of one block (LayerActs).

# --- activations: one table of sizes ---------------------------------------------------------

cdef enum:
    NUM_ACTIVATION_TENSORS = 24
    ALIGN_BYTES = 64            # every tensor starts on a 64-byte boundary
    ALIGN_FLOATS = 16
    CLASSIFIER_FLOATS = 1 << 23  # logits of one row block of the classifier: at most 32 MB


# in the order of fill_in_activation_sizes and of the Activations fields
cdef const char* ACTIVATION_NAMES[NUM_ACTIVATION_TENSORS]
ACTIVATION_NAMES[:] = [
    b"encoded", b"ln1_mean", b"ln1_rstd", b"qkv", b"atty", b"att_max", b"att_scale",
    b"residual2", b"ln2_mean", b"ln2_rstd", b"fch", b"residual3", b"lnf_rows", b"lnf_mean",
    b"lnf_rstd", b"shared", b"ln", b"dresidual", b"dresidual_mid", b"dnarrow", b"att_probs",
    b"att_dprobs", b"rope_cos", b"rope_sin",
]


cdef struct Activations:
    int maxB            # capacity in sequences of length T
    int cls_rows        # R: rows per block of the classifier and the loss
    int B, n            # shape of the current micro-batch
    # kept from forward to backward, per block: what backward cannot recompute cheaply
    float* encoded      # (N, C)
    float* ln1_mean     # (L, N)
    float* ln1_rstd     # (L, N)
    float* qkv          # (L, N, W) q, k, v (Llama: after the rotary positions)
    float* atty         # (L, N, C)
    float* att_max      # (L, B, NH, n) each attention row's max score
    float* att_scale    # (L, B, NH, n) and 1 / its sum of exponentials
    float* residual2    # (L, N, C)
    float* ln2_mean     # (L, N)
    float* ln2_rstd     # (L, N)
    float* fch          # (L, N, FW) c_fc's output (Llama: gate_proj's, up_proj's)
    float* residual3    # (L, N, C)
    # the classifier, one block of R rows at a time (forward and backward fused)
    float* lnf_rows     # (R, C) ln_f's output
    float* lnf_mean     # (R,)
    float* lnf_rstd     # (R,)
    float* logits_rows  # (R, V), then dlogits
    # one block's outputs of ln_1 / ln_2 and of gelu (Llama: the RMSNorms', silu(gate) * up),
    # recomputed in backward (the same float operations from the saved mean, rstd and fch, so
    # the same bits)
    float* ln           # (N, C)
    float* fch_gelu     # (N, F)
    # backward: gradients of activations, reused block after block
    float* dresidual    # (N, C) the residual stream at a block's output, then its input
    float* dresidual_mid  # (N, C) the residual stream between a block's two residuals
    float* dnarrow      # (N, C) at a layer norm's output or at the attention's output
    float* dwide        # (N, max(W, F)) at gelu's output, then at qkv
    float* dfch         # (N, FW) at c_fc's output
    # logits_rows, fch_gelu, dwide and dfch live in one tensor, "shared": the classifier's
    # logits are dead before a block's backward starts and the blocks' scratch is dead while
    # the classifier runs; dfch is fch_gelu's place (its last reader, c_proj's backward, is
    # done when dfch is cleared), dwide follows it (shared_layout)
    # attention: one block of query rows' probabilities and their gradient, (ATT_BLOCK, T)
    float* att_probs
    float* att_dprobs
    # Llama: the rotary positions' cos and sin, (T, hs/2) each; 0 floats in GPT-2
    float* rope_cos
    float* rope_sin
    float* memory       # the single allocation all of the above point into
    Bf16Products* bf16  # NULL for fp32, else the bf16 state of the weight products (owned)
    # adapters (activations_use_lora): NULL without
    const Lora* lora    # the adapters' settings and weights (not owned)
    float* lora_h       # (L, LORA_SITES, N, r) each adapter's x' A^T, kept for the backward
    float* lora_dh      # (N, r) its gradient, one site at a time
    float* lora_x       # (N, max(C, F)) an adapter's dropped input, or a gradient through it
    float* lora_memory  # the allocation of the three


cdef inline int classifier_rows(const ModelConfig* c, int maxB, int requested) noexcept nogil:
    # rows per classifier block: `requested` when > 0, else as many as CLASSIFIER_FLOATS of
    # logits hold; never more than a micro-batch has
    cdef size_t rows = <size_t>requested if requested > 0 else CLASSIFIER_FLOATS // <size_t>c.V
    cdef size_t N = <size_t>maxB * c.T
    if rows < 1:
        rows = 1
    return <int>(rows if rows < N else N)


cdef inline size_t shared_wide_at(const ModelConfig* c, size_t N) noexcept nogil:
    # where dwide starts in the shared tensor: after fch_gelu = dfch (N, FW), aligned
    return (N * c.FW + ALIGN_FLOATS - 1) & ~(<size_t>ALIGN_FLOATS - 1)


cdef inline size_t shared_floats(const ModelConfig* c, size_t N, size_t R) noexcept nogil:
    # the shared tensor: the classifier's logits block, or fch_gelu = dfch and then dwide
    cdef size_t wide = c.W if c.W > c.F else c.F
    cdef size_t blocks = shared_wide_at(c, N) + N * wide
    return R * c.V if R * c.V > blocks else blocks


cdef void fill_in_activation_sizes(size_t* sizes, const ModelConfig* c, int maxB,
                                   int cls_rows) noexcept nogil:
    # floats of each activation tensor for micro-batches of up to maxB sequences of T tokens
    # and classifier blocks of cls_rows rows (classifier_rows)
    cdef size_t N = <size_t>maxB * c.T, C = c.C, L = c.L, F = c.F, R = cls_rows
    cdef size_t W = c.W, FW = c.FW
    cdef size_t rope = <size_t>c.T * (head_size(c) // 2) if c.family == FAMILY_LLAMA else 0
    sizes[0] = N * C                                 # encoded
    sizes[1] = L * N; sizes[2] = L * N               # ln1_mean, ln1_rstd
    sizes[3] = L * N * W                             # qkv
    sizes[4] = L * N * C                             # atty
    sizes[5] = L * N * c.NH; sizes[6] = L * N * c.NH  # att_max, att_scale
    sizes[7] = L * N * C                             # residual2
    sizes[8] = L * N; sizes[9] = L * N               # ln2_mean, ln2_rstd
    sizes[10] = L * N * FW                           # fch
    sizes[11] = L * N * C                            # residual3
    sizes[12] = R * C; sizes[13] = R; sizes[14] = R  # lnf_rows, mean, rstd
    sizes[15] = shared_floats(c, N, R)               # logits_rows | fch_gelu = dfch, dwide
    sizes[16] = N * C                                # ln
    sizes[17] = N * C; sizes[18] = N * C             # dresidual, dresidual_mid
    sizes[19] = N * C                                # dnarrow
    sizes[20] = <size_t>ATT_BLOCK * c.T; sizes[21] = <size_t>ATT_BLOCK * c.T  # att_(d)probs
    sizes[22] = rope; sizes[23] = rope               # rope_cos, rope_sin


cdef inline size_t aligned_floats(size_t n) noexcept nogil:
    return (n + ALIGN_FLOATS - 1) & ~(<size_t>ALIGN_FLOATS - 1)


cdef size_t carved_floats(const size_t* sizes, int count) noexcept nogil:
    # floats carve allocates for tensors of these sizes: each aligned, and room to align the start
    cdef size_t total = ALIGN_FLOATS
    cdef int i
    for i in range(count):
        total += aligned_floats(sizes[i])
    return total


cdef float* carve(float*** slots, const size_t* sizes, int count) noexcept nogil:
    # one zeroed allocation cut into `count` aligned tensors, *slots[i] pointing at the i-th;
    # returns the allocation (to free), NULL when out of memory
    cdef float* memory = <float*>calloc(carved_floats(sizes, count), sizeof(float))
    cdef float* p
    cdef int i
    if memory == NULL:
        return NULL
    p = <float*>((<size_t>memory + ALIGN_BYTES - 1) & ~(<size_t>ALIGN_BYTES - 1))
    for i in range(count):
        slots[i][0] = p
        p += aligned_floats(sizes[i])
    return memory


cdef size_t activation_floats(const ModelConfig* c, int maxB, int cls_rows) noexcept nogil:
    # floats activations_alloc allocates
    cdef size_t sizes[NUM_ACTIVATION_TENSORS]
    fill_in_activation_sizes(sizes, c, maxB, cls_rows)
    return carved_floats(sizes, NUM_ACTIVATION_TENSORS)


cdef int activations_alloc(Activations* a, const ModelConfig* c, int maxB,
                           int cls_rows) noexcept nogil:
    # returns 0 on success, -1 when out of memory; cls_rows: rows per classifier block
    # (classifier_rows)
    cdef size_t sizes[NUM_ACTIVATION_TENSORS]
    cdef float** slots[NUM_ACTIVATION_TENSORS]
    fill_in_activation_sizes(sizes, c, maxB, cls_rows)
    slots[:] = [&a.encoded, &a.ln1_mean, &a.ln1_rstd, &a.qkv, &a.atty, &a.att_max,
                &a.att_scale, &a.residual2, &a.ln2_mean, &a.ln2_rstd, &a.fch, &a.residual3,
                &a.lnf_rows, &a.lnf_mean, &a.lnf_rstd, &a.logits_rows, &a.ln,
                &a.dresidual, &a.dresidual_mid, &a.dnarrow, &a.att_probs,
                &a.att_dprobs, &a.rope_cos, &a.rope_sin]
    a.memory = carve(slots, sizes, NUM_ACTIVATION_TENSORS)
    if a.memory == NULL:
        return -1
    a.fch_gelu = a.logits_rows
    a.dfch = a.logits_rows
    a.dwide = a.logits_rows + shared_wide_at(c, <size_t>maxB * c.T)
    if c.family == FAMILY_LLAMA:
        rope_tables(a.rope_cos, a.rope_sin, c.T, head_size(c), c.rope_theta)
    a.maxB = maxB
    a.cls_rows = cls_rows
    a.B = 0
    a.n = 0
    a.bf16 = NULL
    a.lora = NULL
    a.lora_memory = NULL
    return 0


cdef int activations_use_lora(Activations* a, const ModelConfig* c,
                              const Lora* lo) noexcept nogil:
    # gives a's passes the adapters lo, with room for their activations; 0 on success, -1
    # when out of memory
    cdef size_t N = <size_t>a.maxB * c.T
    cdef size_t sizes[3]
    cdef float** slots[3]
    sizes[0] = <size_t>c.L * LORA_SITES * N * lo.rank
    sizes[1] = N * lo.rank
    sizes[2] = N * max(c.C, c.F)
    slots[:] = [&a.lora_h, &a.lora_dh, &a.lora_x]
    a.lora_memory = carve(slots, sizes, 3)
    if a.lora_memory == NULL:
        return -1
    a.lora = lo
    return 0


cdef int activations_use_bf16(Activations* a, const ModelConfig* c, const float* master,
                              const uint16_t* weights) noexcept nogil:
    # switches a's weight products to bf16 inputs, with weights = bf16(master) (kept by the
    # caller); 0 on success, -1 when out of memory or oneDNN cannot start
    cdef size_t N = <size_t>a.maxB * c.T, C = c.C, F = c.F, R = a.cls_rows
    cdef size_t widest_in = max(N * max(C, F), R * C)
    cdef size_t widest_out = max(N * max(<size_t>c.W, <size_t>c.FW), R * <size_t>c.V)
    cdef Bf16Products* b = <Bf16Products*>calloc(1, sizeof(Bf16Products))
    if b == NULL:
        return -1
    b.inputs = <uint16_t*>malloc(widest_in * sizeof(uint16_t))
    b.grads = <uint16_t*>malloc(widest_out * sizeof(uint16_t))
    b.block = <uint16_t*>malloc(<size_t>ATT_BLOCK * c.T * sizeof(uint16_t))
    if (b.inputs == NULL or b.grads == NULL or b.block == NULL
            or bf16_context_init(&b.ctx) != 0):
        free(b.inputs)
        free(b.grads)
        free(b.block)
        free(b)
        return -1
    b.master = master
    b.weights = weights
    a.bf16 = b
    return 0


cdef int activations_use_onednn_fp32(Activations* a) noexcept nogil:
    # switches a's weight products to oneDNN's fp32 matmul; 0 on success, -1 when out of
    # memory or oneDNN cannot start
    cdef Bf16Products* b = <Bf16Products*>calloc(1, sizeof(Bf16Products))
    if b == NULL:
        return -1
    if bf16_context_init(&b.ctx) != 0:
        free(b)
        return -1
    b.fp32 = True
    a.bf16 = b
    return 0


cdef void activations_free(Activations* a) noexcept nogil:
    free(a.memory)
    a.memory = NULL
    free(a.lora_memory)
    a.lora_memory = NULL
    a.lora = NULL
    if a.bf16 != NULL:
        bf16_context_free(&a.bf16.ctx)
        free(a.bf16.inputs)
        free(a.bf16.grads)
        free(a.bf16.block)
        free(a.bf16)
        a.bf16 = NULL


cdef struct LayerActs:
    # one block's slices of the activations, for the current micro-batch (N = B * n rows)
    float* ln1_mean     # (N,)
    float* ln1_rstd     # (N,)
    float* qkv          # (N, W)
    float* atty         # (N, C)
    float* att_max      # (B, NH, n)
    float* att_scale    # (B, NH, n)
    float* residual2    # (N, C)
    float* ln2_mean     # (N,)
    float* ln2_rstd     # (N,)
    float* fch          # (N, FW)
    float* residual3    # (N, C)
    # the sphere's scratches, shared by all blocks
    float* ln           # (N, C)
    float* fch_gelu     # (N, F)
    float* att_probs    # (ATT_BLOCK, n)
    float* att_dprobs
    const float* rope_cos   # Llama's rotary tables, (T, hs/2)
    const float* rope_sin
    Bf16Products* bf16  # the sphere's bf16 state, or NULL
    const Lora* lora    # the adapters, or NULL
    float* lora_h       # (LORA_SITES, N, r) this block's
    float* lora_dh      # (N, r)
    float* lora_x       # (N, max(C, F))


cdef inline void layer_acts(LayerActs* la, const Activations* a, const ModelConfig* c,
                            int l) noexcept nogil:
    cdef size_t N = <size_t>a.B * a.n, C = c.C
    la.ln1_mean = a.ln1_mean + l * N
    la.ln1_rstd = a.ln1_rstd + l * N
    la.qkv = a.qkv + l * N * c.W
    la.atty = a.atty + l * N * C
    la.att_max = a.att_max + l * N * c.NH
    la.att_scale = a.att_scale + l * N * c.NH
    la.residual2 = a.residual2 + l * N * C
    la.ln2_mean = a.ln2_mean + l * N
    la.ln2_rstd = a.ln2_rstd + l * N
    la.fch = a.fch + l * N * c.FW
    la.residual3 = a.residual3 + l * N * C
    la.ln = a.ln
    la.fch_gelu = a.fch_gelu
    la.att_probs = a.att_probs
    la.att_dprobs = a.att_dprobs
    la.rope_cos = a.rope_cos
    la.rope_sin = a.rope_sin
    la.bf16 = a.bf16
    la.lora = a.lora
    la.lora_h = a.lora_h + l * LORA_SITES * N * (a.lora.rank if a.lora != NULL else 0)
    la.lora_dh = a.lora_dh
    la.lora_x = a.lora_x
