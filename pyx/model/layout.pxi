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
    const char* name    # the tensor's name in the layout; block tensors are prefixed by h.{l}.
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


# The parameter layout: the flat buffer holds these tensors in this order (parameters, gradients and
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
