# The model of SPEC section 1 on one micro-batch: the layout tables (parameters, activations,
# profile buckets), named views into the flat buffers, and the forward / backward pass.
from libc.stdlib cimport calloc, malloc, free


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


# --- parameters: one table, in buffer order --------------------------------------------------

cdef enum Dim:
    # the sizes a tensor's dimensions are made of
    DIM_NONE = 0    # no second dimension: a 1-D tensor
    DIM_V
    DIM_T
    DIM_C
    DIM_3C
    DIM_F


cdef struct ParameterSpec:
    const char* name    # SPEC section 1 name; block tensors are prefixed by h.{l}.
    int rows            # Dim of the first dimension ([out, in] for linear weights)
    int cols            # Dim of the second one, DIM_NONE for a 1-D tensor


cdef enum:
    # rows of PARAMETER_TABLE; rows FIRST_BLOCK_ROW .. END_BLOCK_ROW - 1 repeat for every block
    PT_WTE = 0
    PT_WPE = 1
    FIRST_BLOCK_ROW = 2
    TENSORS_PER_BLOCK = 12
    END_BLOCK_ROW = 14
    PT_LNFW = 14
    PT_LNFB = 15
    NUM_PARAMETER_ROWS = 16


# SPEC section 1: the flat buffer holds these tensors in this order (parameters, gradients and
# AdamW m/v alike). Everything else about the layout (offsets, sizes, views, optimiser chunks,
# the tables exported to Python) is derived from it.
cdef ParameterSpec PARAMETER_TABLE[NUM_PARAMETER_ROWS]
PARAMETER_TABLE[:] = [
    ParameterSpec(b"wte", DIM_V, DIM_C),
    ParameterSpec(b"wpe", DIM_T, DIM_C),
    ParameterSpec(b"ln_1.weight", DIM_C, DIM_NONE),
    ParameterSpec(b"ln_1.bias", DIM_C, DIM_NONE),
    ParameterSpec(b"attn.c_attn.weight", DIM_3C, DIM_C),
    ParameterSpec(b"attn.c_attn.bias", DIM_3C, DIM_NONE),
    ParameterSpec(b"attn.c_proj.weight", DIM_C, DIM_C),
    ParameterSpec(b"attn.c_proj.bias", DIM_C, DIM_NONE),
    ParameterSpec(b"ln_2.weight", DIM_C, DIM_NONE),
    ParameterSpec(b"ln_2.bias", DIM_C, DIM_NONE),
    ParameterSpec(b"mlp.c_fc.weight", DIM_F, DIM_C),
    ParameterSpec(b"mlp.c_fc.bias", DIM_F, DIM_NONE),
    ParameterSpec(b"mlp.c_proj.weight", DIM_C, DIM_F),
    ParameterSpec(b"mlp.c_proj.bias", DIM_C, DIM_NONE),
    ParameterSpec(b"ln_f.weight", DIM_C, DIM_NONE),
    ParameterSpec(b"ln_f.bias", DIM_C, DIM_NONE),
]


cdef inline size_t dim_size(const ModelConfig* c, int dim) noexcept nogil:
    if dim == DIM_V:
        return c.V
    if dim == DIM_T:
        return c.T
    if dim == DIM_C:
        return c.C
    if dim == DIM_3C:
        return 3 * <size_t>c.C
    if dim == DIM_F:
        return c.F
    return 1


cdef inline size_t row_floats(const ModelConfig* c, int row) noexcept nogil:
    return dim_size(c, PARAMETER_TABLE[row].rows) * dim_size(c, PARAMETER_TABLE[row].cols)


cdef inline size_t rows_floats(const ModelConfig* c, int begin, int end) noexcept nogil:
    # floats of table rows begin .. end - 1, once each
    cdef size_t total = 0
    cdef int row
    for row in range(begin, end):
        total += row_floats(c, row)
    return total


cdef inline size_t layer_size(const ModelConfig* c) noexcept nogil:
    return rows_floats(c, FIRST_BLOCK_ROW, END_BLOCK_ROW)


cdef inline size_t model_size(const ModelConfig* c) noexcept nogil:
    return (rows_floats(c, 0, FIRST_BLOCK_ROW) + c.L * layer_size(c)
            + rows_floats(c, END_BLOCK_ROW, NUM_PARAMETER_ROWS))


cdef inline size_t tensor_offset(const ModelConfig* c, int row, int layer) noexcept nogil:
    # offset in floats of table row `row` (in block `layer` for a block row)
    cdef size_t head = rows_floats(c, 0, FIRST_BLOCK_ROW)
    if row < FIRST_BLOCK_ROW:
        return rows_floats(c, 0, row)
    if row < END_BLOCK_ROW:
        return head + layer * layer_size(c) + rows_floats(c, FIRST_BLOCK_ROW, row)
    return head + c.L * layer_size(c) + rows_floats(c, END_BLOCK_ROW, row)


cdef inline int num_tensors(const ModelConfig* c) noexcept nogil:
    return NUM_PARAMETER_ROWS - TENSORS_PER_BLOCK + c.L * TENSORS_PER_BLOCK


cdef inline void tensor_row(const ModelConfig* c, int index, int* row, int* layer) noexcept nogil:
    # table row and block (-1 outside the blocks) of the index-th tensor in buffer order
    cdef int after = index - FIRST_BLOCK_ROW - c.L * TENSORS_PER_BLOCK
    if index < FIRST_BLOCK_ROW:
        row[0], layer[0] = index, -1
    elif after < 0:
        row[0] = FIRST_BLOCK_ROW + (index - FIRST_BLOCK_ROW) % TENSORS_PER_BLOCK
        layer[0] = (index - FIRST_BLOCK_ROW) // TENSORS_PER_BLOCK
    else:
        row[0], layer[0] = END_BLOCK_ROW + after, -1


cdef struct ModelParams:
    # the tensors outside the blocks; the same struct serves parameters and gradients
    float* wte       # (V, C)
    float* wpe       # (T, C)
    float* lnfw      # (C,)
    float* lnfb      # (C,)


cdef struct LayerParams:
    # one block's tensors, in PARAMETER_TABLE order
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


cdef inline void model_params(ModelParams* p, float* base, const ModelConfig* c) noexcept nogil:
    p.wte = base + tensor_offset(c, PT_WTE, -1)
    p.wpe = base + tensor_offset(c, PT_WPE, -1)
    p.lnfw = base + tensor_offset(c, PT_LNFW, -1)
    p.lnfb = base + tensor_offset(c, PT_LNFB, -1)


cdef inline void layer_params(LayerParams* p, float* base, const ModelConfig* c, int l) noexcept nogil:
    cdef float** slots[TENSORS_PER_BLOCK]
    slots[:] = [&p.ln1w, &p.ln1b, &p.qkvw, &p.qkvb, &p.attprojw, &p.attprojb,
                &p.ln2w, &p.ln2b, &p.fcw, &p.fcb, &p.fcprojw, &p.fcprojb]
    cdef float* q = base + tensor_offset(c, FIRST_BLOCK_ROW, l)
    cdef int k
    for k in range(TENSORS_PER_BLOCK):
        slots[k][0] = q
        q += row_floats(c, FIRST_BLOCK_ROW + k)


# --- activations: one table of sizes ---------------------------------------------------------

cdef enum:
    NUM_ACTIVATION_TENSORS = 25
    ALIGN_BYTES = 64            # every tensor starts on a 64-byte boundary
    ALIGN_FLOATS = 16
    CLASSIFIER_FLOATS = 1 << 23 # logits of one row block of the classifier: at most 32 MB


# in the order of fill_in_activation_sizes and of the Activations fields
cdef const char* ACTIVATION_NAMES[NUM_ACTIVATION_TENSORS]
ACTIVATION_NAMES[:] = [
    b"encoded", b"ln1_mean", b"ln1_rstd", b"qkv", b"atty", b"att_max", b"att_scale",
    b"residual2", b"ln2_mean", b"ln2_rstd", b"fch", b"residual3", b"lnf_rows", b"lnf_mean",
    b"lnf_rstd", b"logits_rows", b"ln", b"fch_gelu", b"dresidual", b"dresidual_mid",
    b"dnarrow", b"dwide", b"dfch", b"att_probs", b"att_dprobs",
]


cdef struct Activations:
    int maxB            # capacity in sequences of length T
    int cls_rows        # R: rows per block of the classifier and the loss
    int B, n            # shape of the current micro-batch
    # kept from forward to backward, per block: what backward cannot recompute cheaply
    float* encoded      # (N, C)
    float* ln1_mean     # (L, N)
    float* ln1_rstd     # (L, N)
    float* qkv          # (L, N, 3C)
    float* atty         # (L, N, C)
    float* att_max      # (L, B, NH, n) each attention row's max score
    float* att_scale    # (L, B, NH, n) and 1 / its sum of exponentials
    float* residual2    # (L, N, C)
    float* ln2_mean     # (L, N)
    float* ln2_rstd     # (L, N)
    float* fch          # (L, N, F)
    float* residual3    # (L, N, C)
    # the classifier, one block of R rows at a time (forward and backward fused)
    float* lnf_rows     # (R, C) ln_f's output
    float* lnf_mean     # (R,)
    float* lnf_rstd     # (R,)
    float* logits_rows  # (R, V), then dlogits
    # one block's outputs of ln_1 / ln_2 and of gelu, recomputed in backward (the same float
    # operations from the saved mean, rstd and fch, so the same bits)
    float* ln           # (N, C)
    float* fch_gelu     # (N, F)
    # backward: gradients of activations, reused block after block
    float* dresidual    # (N, C) the residual stream at a block's output, then its input
    float* dresidual_mid  # (N, C) the residual stream between a block's two residuals
    float* dnarrow      # (N, C) at a layer norm's output or at the attention's output
    float* dwide        # (N, max(3C, F)) at gelu's output, then at qkv
    float* dfch         # (N, F) at c_fc's output
    # attention: one block of query rows' probabilities and their gradient, (ATT_BLOCK, T)
    float* att_probs
    float* att_dprobs
    float* memory       # the single allocation all of the above point into
    Bf16Products* bf16  # NULL for fp32, else the bf16 state of the weight products (owned)


cdef inline int classifier_rows(const ModelConfig* c, int maxB, int requested) noexcept nogil:
    # rows per classifier block: `requested` when > 0, else as many as CLASSIFIER_FLOATS of
    # logits hold; never more than a micro-batch has
    cdef size_t rows = <size_t>requested if requested > 0 else CLASSIFIER_FLOATS // <size_t>c.V
    cdef size_t N = <size_t>maxB * c.T
    if rows < 1:
        rows = 1
    return <int>(rows if rows < N else N)


cdef void fill_in_activation_sizes(size_t* sizes, const ModelConfig* c, int maxB,
                                   int cls_rows) noexcept nogil:
    # floats of each activation tensor for micro-batches of up to maxB sequences of T tokens
    # and classifier blocks of cls_rows rows (classifier_rows)
    cdef size_t N = <size_t>maxB * c.T, C = c.C, L = c.L, F = c.F, R = cls_rows
    cdef size_t wide = 3 * C if 3 * C > F else F
    sizes[0] = N * C                                 # encoded
    sizes[1] = L * N; sizes[2] = L * N               # ln1_mean, ln1_rstd
    sizes[3] = L * N * 3 * C                         # qkv
    sizes[4] = L * N * C                             # atty
    sizes[5] = L * N * c.NH; sizes[6] = L * N * c.NH # att_max, att_scale
    sizes[7] = L * N * C                             # residual2
    sizes[8] = L * N; sizes[9] = L * N               # ln2_mean, ln2_rstd
    sizes[10] = L * N * F                            # fch
    sizes[11] = L * N * C                            # residual3
    sizes[12] = R * C; sizes[13] = R; sizes[14] = R  # lnf_rows, mean, rstd
    sizes[15] = R * c.V                              # logits_rows
    sizes[16] = N * C; sizes[17] = N * F             # ln, fch_gelu
    sizes[18] = N * C; sizes[19] = N * C             # dresidual, dresidual_mid
    sizes[20] = N * C; sizes[21] = N * wide; sizes[22] = N * F    # dnarrow, dwide, dfch
    sizes[23] = <size_t>ATT_BLOCK * c.T; sizes[24] = <size_t>ATT_BLOCK * c.T  # att_(d)probs


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
                &a.lnf_rows, &a.lnf_mean, &a.lnf_rstd, &a.logits_rows, &a.ln, &a.fch_gelu,
                &a.dresidual, &a.dresidual_mid, &a.dnarrow, &a.dwide, &a.dfch, &a.att_probs,
                &a.att_dprobs]
    a.memory = carve(slots, sizes, NUM_ACTIVATION_TENSORS)
    if a.memory == NULL:
        return -1
    a.maxB = maxB
    a.cls_rows = cls_rows
    a.B = 0
    a.n = 0
    a.bf16 = NULL
    return 0


cdef int activations_use_bf16(Activations* a, const ModelConfig* c, const float* master,
                              const uint16_t* weights) noexcept nogil:
    # switches a's weight products to bf16 inputs, with weights = bf16(master) (kept by the
    # caller); 0 on success, -1 when out of memory or oneDNN cannot start
    cdef size_t N = <size_t>a.maxB * c.T, C = c.C, F = c.F, R = a.cls_rows
    cdef size_t widest_in = max(N * max(C, F), R * C)
    cdef size_t widest_out = max(N * max(3 * C, F), R * <size_t>c.V)
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


cdef void activations_free(Activations* a) noexcept nogil:
    free(a.memory)
    a.memory = NULL
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
    float* qkv          # (N, 3C)
    float* atty         # (N, C)
    float* att_max      # (B, NH, n)
    float* att_scale    # (B, NH, n)
    float* residual2    # (N, C)
    float* ln2_mean     # (N,)
    float* ln2_rstd     # (N,)
    float* fch          # (N, F)
    float* residual3    # (N, C)
    # the sphere's scratches, shared by all blocks
    float* ln           # (N, C)
    float* fch_gelu     # (N, F)
    float* att_probs    # (ATT_BLOCK, n)
    float* att_dprobs
    Bf16Products* bf16  # the sphere's bf16 state, or NULL


cdef inline void layer_acts(LayerActs* la, const Activations* a, const ModelConfig* c,
                            int l) noexcept nogil:
    cdef size_t N = <size_t>a.B * a.n, C = c.C, F = c.F
    la.ln1_mean = a.ln1_mean + l * N
    la.ln1_rstd = a.ln1_rstd + l * N
    la.qkv = a.qkv + l * N * 3 * C
    la.atty = a.atty + l * N * C
    la.att_max = a.att_max + l * N * c.NH
    la.att_scale = a.att_scale + l * N * c.NH
    la.residual2 = a.residual2 + l * N * C
    la.ln2_mean = a.ln2_mean + l * N
    la.ln2_rstd = a.ln2_rstd + l * N
    la.fch = a.fch + l * N * F
    la.residual3 = a.residual3 + l * N * C
    la.ln = a.ln
    la.fch_gelu = a.fch_gelu
    la.att_probs = a.att_probs
    la.att_dprobs = a.att_dprobs
    la.bf16 = a.bf16


# --- profile: one table of time buckets ------------------------------------------------------

cdef enum:
    PROFILE_EMBEDDING = 0           # token + position embedding, forward and backward
    PROFILE_BLOCK_FORWARD = 1
    PROFILE_CLASSIFIER_LOSS = 2     # ln_f, logits and cross-entropy
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

cdef void block_forward(LayerActs* a, const float* res, const LayerParams* p, int B, int n,
                        const ModelConfig* c, const Dropout* d, int l) noexcept nogil:
    # block l on the residual stream res (N, C): a.residual3 = its output (d: NULL or p = 0
    # for no dropout)
    cdef int N = B * n, C = c.C, F = c.F
    cdef bint drop = dropout_on(d)
    # residual2 = res + dropout(c_proj(attention(c_attn(ln_1(res)))))
    layernorm_forward(a.ln, a.ln1_mean, a.ln1_rstd, res, p.ln1w, p.ln1b, N, C)
    linear_forward(a.bf16, a.qkv, a.ln, p.qkvw, p.qkvb, N, C, 3 * C)
    attention_forward(a.bf16, a.atty, a.att_max, a.att_scale, a.att_probs, a.qkv, B, n, C, c.NH, d, l)
    if drop:
        residual_dropout_forward(a.bf16, a.residual2, res, a.atty, p.attprojw, p.attprojb, N, C, C, d,
                                 dropout_key(d, l, DROP_ATTN_PROJ))
    else:
        residual_forward(a.bf16, a.residual2, res, a.atty, p.attprojw, p.attprojb, N, C, C)
    # residual3 = residual2 + dropout(c_proj(gelu(c_fc(ln_2(residual2)))))
    layernorm_forward(a.ln, a.ln2_mean, a.ln2_rstd, a.residual2, p.ln2w, p.ln2b, N, C)
    linear_forward(a.bf16, a.fch, a.ln, p.fcw, p.fcb, N, C, F)
    gelu_forward(a.fch_gelu, a.fch, <size_t>N * F)
    if drop:
        residual_dropout_forward(a.bf16, a.residual3, a.residual2, a.fch_gelu, p.fcprojw, p.fcprojb,
                                 N, F, C, d, dropout_key(d, l, DROP_MLP_PROJ))
    else:
        residual_forward(a.bf16, a.residual3, a.residual2, a.fch_gelu, p.fcprojw, p.fcprojb, N, F, C)


cdef void block_backward(Activations* a, const LayerActs* la, const float* res, const LayerParams* p,
                         LayerParams* g, const ModelConfig* c, const Dropout* d,
                         int l) noexcept nogil:
    # gradient of block l whose input was res: a.dresidual holds d(output) on entry and
    # d(res) on return; g += the gradients of the block's parameters. d: the forward's dropout
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
    clear(a.dfch, <size_t>N * F)
    gelu_backward(a.dfch, la.fch, a.dwide, <size_t>N * F)
    layernorm_apply(la.ln, la.residual2, la.ln2_mean, la.ln2_rstd, p.ln2w, p.ln2b, N, C)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.fcw, g.fcb, a.dfch, la.ln, p.fcw, N, C, F)
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
    clear(a.dwide, NC * 3)
    attention_backward(a.bf16, a.dwide, la.att_probs, la.att_dprobs, a.dnarrow, la.qkv, la.att_max,
                       la.att_scale, B, n, C, c.NH, d, l)
    layernorm_apply(la.ln, res, la.ln1_mean, la.ln1_rstd, p.ln1w, p.ln1b, N, C)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.qkvw, g.qkvb, a.dwide, la.ln, p.qkvw, N, C, 3 * C)
    layernorm_backward(a.dresidual, g.ln1w, g.ln1b, a.dnarrow, res, p.ln1w, la.ln1_mean,
                       la.ln1_rstd, N, C)


cdef bint classifier_forward(Activations* a, double* loss, int* counted, const ModelParams* p,
                             ModelParams* g, const float* res, const ModelConfig* c,
                             const int* tgt, int stride, int pad_id, float* logits_out,
                             double* timers, double* t, const int* stop) noexcept nogil:
    # logits = ln_f(res) @ wte^T and the loss, in blocks of a.cls_rows rows, so that the
    # logits are never held whole. With tgt, loss and counted get the sum over the targets
    # != pad_id (row order). With g (gradients), each block's dlogits go back through the
    # classifier at once: g.wte, g.lnfw, g.lnfb += their part and a.dresidual = d(res).
    # logits_out: NULL, or (N, V) rows to write the logits into. False when *stop was set.
    cdef int N = a.B * a.n, C = c.C, V = c.V
    cdef int r0 = 0, rows
    cdef float* logits
    cdef float* dln
    while r0 < N:
        if stopped(stop):
            return False
        rows = min(a.cls_rows, N - r0)
        layernorm_forward(a.lnf_rows, a.lnf_mean, a.lnf_rstd, res + <size_t>r0 * C, p.lnfw,
                          p.lnfb, rows, C)
        logits = logits_out + <size_t>r0 * V if logits_out != NULL else a.logits_rows
        linear_forward(a.bf16, logits, a.lnf_rows, p.wte, NULL, rows, C, V)
        if tgt != NULL:
            crossentropy_forward_backward(logits, loss, counted, tgt, stride, a.n, r0, rows, V,
                                          pad_id, g != NULL)
        tock(timers, PROFILE_CLASSIFIER_LOSS, t)
        if g != NULL:
            dln = a.dnarrow + <size_t>r0 * C
            clear(dln, <size_t>rows * C)
            linear_backward(a.bf16, dln, g.wte, NULL, logits, a.lnf_rows, p.wte, rows, C, V)
            clear(a.dresidual + <size_t>r0 * C, <size_t>rows * C)
            layernorm_backward(a.dresidual + <size_t>r0 * C, g.lnfw, g.lnfb, dln,
                               res + <size_t>r0 * C, p.lnfw, a.lnf_mean, a.lnf_rstd, rows, C)
            tock(timers, PROFILE_CLASSIFIER_BACKWARD, t)
        r0 += rows
    return True


cdef double model_forward(Activations* a, int* counted, float* params, const ModelConfig* c,
                          const int* inp, const int* tgt, int stride, int B, int n, int pad_id,
                          float* grads, float* logits_out, const Dropout* d, double* timers,
                          const int* stop) noexcept nogil:
    # Forward pass of B sequences of n tokens (n <= T, B <= maxB) and the summed loss over
    # targets != pad_id (0 with tgt == NULL). With grads (training), it clears grads and runs
    # the classifier's backward fused with its forward (classifier_forward); model_backward
    # does the rest. logits_out: NULL or (B*n, V) to receive the logits. d: the micro-batch's
    # dropout (NULL: none). timers: NULL or the profile buckets. When *stop becomes set the pass gives up between blocks and returns NaN.
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
    if dropout_on(d):
        dropout_apply(a.encoded, a.encoded, <size_t>B * n * c.C, d,
                      dropout_key(d, 0, DROP_EMBEDDING), 0)
    tock(timers, PROFILE_EMBEDDING, &t)
    res = a.encoded
    for l in range(c.L):
        if stopped(stop):
            return NAN
        layer_params(&lp, params, c, l)
        layer_acts(&la, a, c, l)
        block_forward(&la, res, &lp, B, n, c, d, l)
        res = la.residual3
        tock(timers, PROFILE_BLOCK_FORWARD, &t)
    if grads != NULL:
        clear(grads, model_size(c))
        model_params(&g, grads, c)
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
    model_params(&g, grads, c)
    for l in range(c.L - 1, -1, -1):
        if stopped(stop):
            return
        layer_params(&lp, params, c, l)
        layer_params(&lg, grads, c, l)
        res = a.encoded
        if l > 0:
            layer_acts(&la, a, c, l - 1)
            res = la.residual3                 # the block's input: the previous output
        layer_acts(&la, a, c, l)
        block_backward(a, &la, res, &lp, &lg, c, d, l)
        tock(timers, PROFILE_BLOCK_BACKWARD, &t)
    if dropout_on(d):
        dropout_apply(a.dresidual, a.dresidual, <size_t>B * n * C, d,
                      dropout_key(d, 0, DROP_EMBEDDING), 0)
    encoder_backward(g.wte, g.wpe, a.dresidual, inp, stride, B, n, C)
    tock(timers, PROFILE_EMBEDDING, &t)


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
