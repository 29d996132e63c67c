# LoRA adapters: rank-r updates of chosen linear layers of every block (each family's sites),
#     y = x W^T + b + scale * (x' A^T) B^T,   x' = x, or x through the adapters' dropout,
# trained while the model's own parameters stay frozen. Their layout (one flat buffer, like
# the parameters': per block, per adapted site in site order, A (r, in) then B (out, r)) and
# their forward and backward on one site of one block. The products are fp32 in every
# precision: they are small, and an adapter's update is what fine-tuning trains.

cdef enum:
    # the linear layers ("sites") of a block that can carry an adapter, in buffer order.
    # GPT-2's:
    LORA_QKV = 0        # attn.c_attn
    LORA_ATTPROJ = 1    # attn.c_proj
    LORA_FC = 2         # mlp.c_fc
    LORA_FCPROJ = 3     # mlp.c_proj
    # Llama's:
    LORA_Q = 0
    LORA_K = 1
    LORA_V = 2
    LORA_O = 3
    LORA_GATE = 4
    LORA_UP = 5
    LORA_DOWN = 6
    LORA_SITES = 7      # the most sites of a family
    DROP_LORA = 4       # dropout site of an adapter's input: DROP_LORA + its site


cdef const char* GPT2_LORA_SITES[4]
GPT2_LORA_SITES[:] = [b"attn.c_attn", b"attn.c_proj", b"mlp.c_fc", b"mlp.c_proj"]
cdef const char* LLAMA_LORA_SITES[7]
LLAMA_LORA_SITES[:] = [b"self_attn.q_proj", b"self_attn.k_proj", b"self_attn.v_proj",
                       b"self_attn.o_proj", b"mlp.gate_proj", b"mlp.up_proj", b"mlp.down_proj"]


cdef inline int lora_sites(const ModelConfig* c) noexcept nogil:
    # the number of sites of c's family
    return LORA_SITES if c.family == FAMILY_LLAMA else 4


cdef inline const char* lora_site_name(const ModelConfig* c, int site) noexcept nogil:
    return LLAMA_LORA_SITES[site] if c.family == FAMILY_LLAMA else GPT2_LORA_SITES[site]


cdef struct Lora:
    int rank
    int targets                 # bit `site` set: that site of every block has an adapter
    float scale                 # alpha / rank
    uint32_t drop_threshold     # the adapters' dropout on their inputs (as Dropout's fields)
    float drop_scale
    float* params               # the adapters, lora_size floats; NULL: no adapters


cdef inline bint lora_on(const Lora* lo, int site) noexcept nogil:
    return lo != NULL and (lo.targets >> site) & 1


cdef inline int site_in(const ModelConfig* c, int site) noexcept nogil:
    if c.family == FAMILY_LLAMA:
        return c.F if site == LORA_DOWN else c.C
    return c.F if site == LORA_FCPROJ else c.C


cdef inline int site_out(const ModelConfig* c, int site) noexcept nogil:
    if c.family == FAMILY_LLAMA:
        if site == LORA_K or site == LORA_V:
            return c.KVH * head_size(c)
        return c.F if site == LORA_GATE or site == LORA_UP else c.C
    if site == LORA_QKV:
        return 3 * c.C
    return c.F if site == LORA_FC else c.C


cdef inline int site_column(const ModelConfig* c, int site) noexcept nogil:
    # the first column of the site's output in the product it adds onto: Llama's q, k, v are
    # columns of one qkv row, gate and up of one gate/up row; every other site's is its own
    if c.family != FAMILY_LLAMA:
        return 0
    if site == LORA_K:
        return c.C
    if site == LORA_V:
        return c.C + c.KVH * head_size(c)
    return c.F if site == LORA_UP else 0


cdef inline size_t site_floats(const Lora* lo, const ModelConfig* c, int site) noexcept nogil:
    return <size_t>lo.rank * (site_in(c, site) + site_out(c, site))


cdef size_t lora_offset(const Lora* lo, const ModelConfig* c, int l, int site) noexcept nogil:
    # offset in floats of block l's adapter on `site` (its A; B follows); with l = c.L and
    # site 0, the size of the whole buffer
    cdef size_t layer = 0, before = 0
    cdef int s
    for s in range(lora_sites(c)):
        if lora_on(lo, s):
            layer += site_floats(lo, c, s)
            if s < site:
                before += site_floats(lo, c, s)
    return <size_t>l * layer + before


cdef inline size_t lora_size(const Lora* lo, const ModelConfig* c) noexcept nogil:
    return lora_offset(lo, c, c.L, 0)


cdef inline bint lora_dropout(const Lora* lo, const Dropout* d, Dropout* out) noexcept nogil:
    # the adapters' dropout in a training micro-batch (d: its masks' keys) into out; False
    # when there is none
    if lo.drop_threshold == 0 or d == NULL:
        return False
    out[0] = d[0]
    out.threshold = lo.drop_threshold
    out.scale = lo.drop_scale
    return True


cdef void lora_forward(const Lora* lo, const ModelConfig* c, float* y, int ldy, float* h,
                       float* scratch, const float* x, int N, const Dropout* d, int l,
                       int site) noexcept nogil:
    # y[N, out] (rows ldy apart) += scale * h B^T with h[N, r] = x' A^T, kept for the
    # backward; scratch: N x in floats for x' under dropout
    cdef int r = lo.rank, fan_in = site_in(c, site), fan_out = site_out(c, site)
    cdef const float* A = lo.params + lora_offset(lo, c, l, site)
    cdef const float* B = A + <size_t>r * fan_in
    cdef const float* xin = x
    cdef Dropout ld
    if lora_dropout(lo, d, &ld):
        dropout_apply(scratch, x, <size_t>N * fan_in, &ld, dropout_key(&ld, l, DROP_LORA + site), 0)
        xin = scratch
    sgemm_rm(False, True, N, r, fan_in, 1.0, xin, fan_in, A, fan_in, 0.0, h, r)
    sgemm_rm(False, True, N, fan_out, r, lo.scale, h, r, B, r, 1.0, y, ldy)


cdef void lora_backward(const Lora* lo, const ModelConfig* c, float* grads, float* dx,
                        const float* dy, int ldy, const float* h, float* dh, float* scratch,
                        const float* x, int N, const Dropout* d, int l,
                        int site) noexcept nogil:
    # with dy = d(y) of the site (rows ldy apart): grads' A and B of this adapter += their
    # gradients, and dx[N, in] += the adapter's part of d(x). h: the forward's; dh: N x r,
    # scratch: N x in
    cdef int r = lo.rank, fan_in = site_in(c, site), fan_out = site_out(c, site)
    cdef size_t offset = lora_offset(lo, c, l, site), i, count = <size_t>N * fan_in
    cdef const float* A = lo.params + offset
    cdef const float* B = A + <size_t>r * fan_in
    cdef float* gA = grads + offset
    cdef float* gB = gA + <size_t>r * fan_in
    cdef Dropout ld
    cdef bint drop = lora_dropout(lo, d, &ld)
    cdef uint64_t key = dropout_key(&ld, l, DROP_LORA + site) if drop else 0
    sgemm_rm(True, False, fan_out, r, N, lo.scale, dy, ldy, h, r, 1.0, gB, r)
    sgemm_rm(False, False, N, r, fan_out, lo.scale, dy, ldy, B, r, 0.0, dh, r)
    if not drop:
        sgemm_rm(True, False, r, fan_in, N, 1.0, dh, r, x, fan_in, 1.0, gA, fan_in)
        sgemm_rm(False, False, N, fan_in, r, 1.0, dh, r, A, fan_in, 1.0, dx, fan_in)
        return
    dropout_apply(scratch, x, count, &ld, key, 0)
    sgemm_rm(True, False, r, fan_in, N, 1.0, dh, r, scratch, fan_in, 1.0, gA, fan_in)
    sgemm_rm(False, False, N, fan_in, r, 1.0, dh, r, A, fan_in, 0.0, scratch, fan_in)
    dropout_apply(scratch, scratch, count, &ld, key, 0)
    for i in range(count):
        dx[i] += scratch[i]
