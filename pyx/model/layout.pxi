# The model's parameter layout: its sizes (ModelConfig), the one table of parameter tensors in
# buffer order, and the named views into the flat buffers (ModelParams, LayerParams). The
# activations and the pass follow in activations.pxi and forward_backward.pxi of this folder,
# generation in decoding/.
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


cdef enum:
    # model families: which parameter table and which block a model has
    FAMILY_GPT2 = 0
    FAMILY_LLAMA = 1


cdef struct ModelConfig:
    int family  # FAMILY_*
    int V       # vocabulary
    int C       # embedding width
    int L       # layers
    int NH      # query heads
    int F       # feed-forward width
    int T       # maximum sequence length (GPT-2: rows of wpe)
    int KVH     # key/value heads; NH query heads share them in groups of NH / KVH
    int W       # width of a block's q, k, v row: C + 2 * KVH * (C / NH)
    int FW      # width of the MLP's first product: F (GPT-2's c_fc), 2F (Llama's gate, up)
    int tied    # the output layer is the token embedding
    int qkv_bias  # q, k and v have biases (always in GPT-2)
    float norm_eps      # Llama's RMSNorm epsilon
    double rope_theta   # Llama's rotary base


# --- parameters: one table per family, in buffer order ---------------------------------------

cdef enum Dim:
    # the sizes a tensor's dimensions are made of
    DIM_NONE = 0    # no second dimension: a 1-D tensor
    DIM_V
    DIM_T
    DIM_C
    DIM_3C
    DIM_F
    DIM_KV          # KVH * head size: a key or value projection's outputs
    DIM_Q_BIAS      # C with q/k/v biases, else 0 (the tensor is absent)
    DIM_KV_BIAS     # KVH * head size with q/k/v biases, else 0
    DIM_HEAD        # V for an output layer of its own, 0 when tied to the embedding


cdef struct ParameterSpec:
    const char* name    # the tensor's name in the layout; block tensors are prefixed
    int rows            # Dim of the first dimension ([out, in] for linear weights)
    int cols            # Dim of the second one, DIM_NONE for a 1-D tensor


cdef struct FamilyTable:
    # a family's parameter layout: rows first_block .. end_block - 1 repeat for every block
    # (named block_prefix + "{l}." + name); a row of 0 floats is absent from the model
    const ParameterSpec* rows
    const char* block_prefix
    int first_block
    int end_block
    int num_rows


cdef enum:
    # GPT-2's rows outside the blocks, and the first of a block
    PT_WTE = 0
    PT_WPE = 1
    PT_LN1W = 2
    PT_LNFW = 14
    PT_LNFB = 15
    NUM_GPT2_ROWS = 16
    # Llama's: the embedding, the block's rows this file names, the final norm and the head
    LT_EMBED = 0
    LT_LN1 = 1
    LT_Q = 2            # q_proj.weight, then k_proj's and v_proj's: one [W, C] weight
    LT_Q_BIAS = 5       # q_proj.bias, then k_proj's and v_proj's (absent without biases)
    LT_O = 8
    LT_LN2 = 9
    LT_GATE = 10        # gate_proj.weight, then up_proj's: one [2F, C] weight
    LT_DOWN = 12
    LT_NORM = 13
    LT_HEAD = 14
    NUM_LLAMA_ROWS = 15
    TENSORS_PER_BLOCK = 12      # both families


# The parameter layouts: the flat buffer holds these tensors in this order (parameters,
# gradients and AdamW m/v alike). Everything else about the layout (offsets, sizes, views,
# optimiser chunks, the tables exported to Python) is derived from them. Llama's q, k and v
# weights (and biases) follow each other, and so do gate and up: each group is one matrix
# product's weight, [W, C] and [2F, C].
cdef ParameterSpec GPT2_ROWS[NUM_GPT2_ROWS]
GPT2_ROWS[:] = [
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

cdef ParameterSpec LLAMA_ROWS[NUM_LLAMA_ROWS]
LLAMA_ROWS[:] = [
    ParameterSpec(b"embed_tokens.weight", DIM_V, DIM_C),
    ParameterSpec(b"input_layernorm.weight", DIM_C, DIM_NONE),
    ParameterSpec(b"self_attn.q_proj.weight", DIM_C, DIM_C),
    ParameterSpec(b"self_attn.k_proj.weight", DIM_KV, DIM_C),
    ParameterSpec(b"self_attn.v_proj.weight", DIM_KV, DIM_C),
    ParameterSpec(b"self_attn.q_proj.bias", DIM_Q_BIAS, DIM_NONE),
    ParameterSpec(b"self_attn.k_proj.bias", DIM_KV_BIAS, DIM_NONE),
    ParameterSpec(b"self_attn.v_proj.bias", DIM_KV_BIAS, DIM_NONE),
    ParameterSpec(b"self_attn.o_proj.weight", DIM_C, DIM_C),
    ParameterSpec(b"post_attention_layernorm.weight", DIM_C, DIM_NONE),
    ParameterSpec(b"mlp.gate_proj.weight", DIM_F, DIM_C),
    ParameterSpec(b"mlp.up_proj.weight", DIM_F, DIM_C),
    ParameterSpec(b"mlp.down_proj.weight", DIM_C, DIM_F),
    ParameterSpec(b"norm.weight", DIM_C, DIM_NONE),
    ParameterSpec(b"lm_head.weight", DIM_HEAD, DIM_C),
]

cdef FamilyTable FAMILY_TABLES[2]
FAMILY_TABLES[:] = [
    FamilyTable(NULL, b"h.", 2, 14, NUM_GPT2_ROWS),
    FamilyTable(NULL, b"layers.", 1, 13, NUM_LLAMA_ROWS),
]
# (set apart: Cython would copy an array given to the struct's constructor)
FAMILY_TABLES[FAMILY_GPT2].rows = &GPT2_ROWS[0]
FAMILY_TABLES[FAMILY_LLAMA].rows = &LLAMA_ROWS[0]


cdef inline const FamilyTable* family_table(const ModelConfig* c) noexcept nogil:
    return &FAMILY_TABLES[c.family]


cdef inline const ParameterSpec* table_row(const ModelConfig* c, int row) noexcept nogil:
    return &FAMILY_TABLES[c.family].rows[row]


cdef inline int head_size(const ModelConfig* c) noexcept nogil:
    return c.C // c.NH


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
    if dim == DIM_KV:
        return <size_t>c.KVH * head_size(c)
    if dim == DIM_Q_BIAS:
        return c.C if c.qkv_bias else 0
    if dim == DIM_KV_BIAS:
        return <size_t>c.KVH * head_size(c) if c.qkv_bias else 0
    if dim == DIM_HEAD:
        return 0 if c.tied else c.V
    return 1


cdef inline size_t row_floats(const ModelConfig* c, int row) noexcept nogil:
    return dim_size(c, table_row(c, row).rows) * dim_size(c, table_row(c, row).cols)


cdef inline size_t rows_floats(const ModelConfig* c, int begin, int end) noexcept nogil:
    # floats of table rows begin .. end - 1, once each
    cdef size_t total = 0
    cdef int row
    for row in range(begin, end):
        total += row_floats(c, row)
    return total


cdef inline size_t layer_size(const ModelConfig* c) noexcept nogil:
    cdef const FamilyTable* t = family_table(c)
    return rows_floats(c, t.first_block, t.end_block)


cdef inline size_t model_size(const ModelConfig* c) noexcept nogil:
    cdef const FamilyTable* t = family_table(c)
    return (rows_floats(c, 0, t.first_block) + c.L * layer_size(c)
            + rows_floats(c, t.end_block, t.num_rows))


cdef inline size_t tensor_offset(const ModelConfig* c, int row, int layer) noexcept nogil:
    # offset in floats of table row `row` (in block `layer` for a block row)
    cdef const FamilyTable* t = family_table(c)
    cdef size_t head = rows_floats(c, 0, t.first_block)
    if row < t.first_block:
        return rows_floats(c, 0, row)
    if row < t.end_block:
        return head + layer * layer_size(c) + rows_floats(c, t.first_block, row)
    return head + c.L * layer_size(c) + rows_floats(c, t.end_block, row)


cdef inline int num_tensors(const ModelConfig* c) noexcept nogil:
    # tensors of the layout, counting absent (0-float) rows
    cdef const FamilyTable* t = family_table(c)
    return t.num_rows + (c.L - 1) * (t.end_block - t.first_block)


cdef inline void tensor_row(const ModelConfig* c, int index, int* row, int* layer) noexcept nogil:
    # table row and block (-1 outside the blocks) of the index-th tensor in buffer order
    cdef const FamilyTable* t = family_table(c)
    cdef int per_block = t.end_block - t.first_block
    cdef int after = index - t.first_block - c.L * per_block
    if index < t.first_block:
        row[0], layer[0] = index, -1
    elif after < 0:
        row[0] = t.first_block + (index - t.first_block) % per_block
        layer[0] = (index - t.first_block) // per_block
    else:
        row[0], layer[0] = t.end_block + after, -1


cdef struct ModelParams:
    # the tensors outside the blocks; the same struct serves parameters and gradients
    float* wte       # (V, C) the token embedding
    float* wpe       # (T, C) GPT-2's positions; NULL in Llama
    float* lnfw      # (C,) the final norm
    float* lnfb      # (C,) GPT-2's; NULL in Llama (RMSNorm)
    float* lm_head   # (V, C) the output layer: wte when tied


cdef struct LayerParams:
    # one block's tensors; a NULL bias is absent (Llama's are, but q/k/v's in Qwen2). In
    # Llama: ln1w, ln2w the RMSNorms', qkvw the [W, C] weight of q_proj, k_proj, v_proj,
    # attprojw o_proj, fcw the [2F, C] weight of gate_proj, up_proj, fcprojw down_proj
    float* ln1w      # (C,)
    float* ln1b      # (C,)
    float* qkvw      # (W, C)
    float* qkvb      # (W,)
    float* attprojw  # (C, C)
    float* attprojb  # (C,)
    float* ln2w      # (C,)
    float* ln2b      # (C,)
    float* fcw       # (FW, C)
    float* fcb       # (FW,)
    float* fcprojw   # (C, F)
    float* fcprojb   # (C,)


cdef inline void model_params(ModelParams* p, float* base, const ModelConfig* c) noexcept nogil:
    if c.family == FAMILY_LLAMA:
        p.wte = base + tensor_offset(c, LT_EMBED, -1)
        p.wpe = NULL
        p.lnfw = base + tensor_offset(c, LT_NORM, -1)
        p.lnfb = NULL
        p.lm_head = p.wte if c.tied else base + tensor_offset(c, LT_HEAD, -1)
        return
    p.wte = base + tensor_offset(c, PT_WTE, -1)
    p.wpe = base + tensor_offset(c, PT_WPE, -1)
    p.lnfw = base + tensor_offset(c, PT_LNFW, -1)
    p.lnfb = base + tensor_offset(c, PT_LNFB, -1)
    p.lm_head = p.wte


cdef inline float* block_tensor(float* base, const ModelConfig* c, int row, int l) noexcept nogil:
    # block l's tensor of table row `row`, NULL when the model has none
    if row_floats(c, row) == 0:
        return NULL
    return base + tensor_offset(c, row, l)


cdef inline void layer_params(LayerParams* p, float* base, const ModelConfig* c, int l) noexcept nogil:
    cdef float** slots[TENSORS_PER_BLOCK]
    cdef float* q
    cdef int k
    if c.family == FAMILY_LLAMA:
        memset(p, 0, sizeof(LayerParams))
        p.ln1w = block_tensor(base, c, LT_LN1, l)
        p.qkvw = block_tensor(base, c, LT_Q, l)
        p.qkvb = block_tensor(base, c, LT_Q_BIAS, l)
        p.attprojw = block_tensor(base, c, LT_O, l)
        p.ln2w = block_tensor(base, c, LT_LN2, l)
        p.fcw = block_tensor(base, c, LT_GATE, l)
        p.fcprojw = block_tensor(base, c, LT_DOWN, l)
        return
    slots[:] = [&p.ln1w, &p.ln1b, &p.qkvw, &p.qkvb, &p.attprojw, &p.attprojb,
                &p.ln2w, &p.ln2b, &p.fcw, &p.fcb, &p.fcprojw, &p.fcprojb]
    q = base + tensor_offset(c, PT_LN1W, l)
    for k in range(TENSORS_PER_BLOCK):
        slots[k][0] = q
        q += row_floats(c, PT_LN1W + k)
