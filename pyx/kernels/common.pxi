# What the forward/backward kernels of one micro-batch share: their conventions, the C helpers
# they call (deterministic_math.h, dropout.h, bf16_gemm.h, beside this file), Bf16Products and
# Dropout. The kernels are in layers.pxi, attention.pxi and loss.pxi of this folder.
#
# Argument order: outputs, inputs, weights, sizes; gradients carry a d prefix. N = B * n rows
# of the micro-batch.
#
# Write rule: every backward kernel ADDS (+=) into every gradient it produces, parameter and
# input gradients alike; no kernel clears anything. Clearing is the caller's explicit step:
# model_forward(grads) clears the parameter gradients once per micro-batch, and each activation
# gradient buffer right before the kernels that add into it. So a tensor used twice (wte: the
# token embedding and the tied output projection) gets the sum of both uses, whatever order
# the calls come in. (crossentropy_forward_backward is the loss, not a backward kernel: it
# turns the logits into dloss/dlogits in place.)
from libc.math cimport sqrtf, log, isfinite, NAN

cdef extern from "kernels/deterministic_math.h" nogil:
    float cllm_expf(float x)
    float cllm_tanhf(float x)
    float cllm_row_max(const float* x, int n)
    void cllm_row_exp_scale(float* x, int n, float shift, float scale)
    double cllm_row_exp_sum(float* x, int n, float shift)
    float cllm_nonfinite_probe(const float* x, size_t n)
    double cllm_divide_sumsq(float* g, size_t n, float c)
    void cllm_row_dots(float* dots, const float* a, const float* d, int rows, int n, int len0)
    float cllm_row_sum(const float* x, int n)
    float cllm_row_sq_dev(const float* x, int n, float shift)
    void cllm_ln_backward_sums(const float* x, const float* d, const float* w, int n,
                               float mean, float rstd, float* sum_wd, float* sum_wd_norm)

cdef extern from "kernels/activations.h" nogil:
    void cllm_gelu_forward(float* out, const float* inp, size_t n)
    void cllm_gelu_backward(float* dinp, const float* inp, const float* dout, size_t n)
    float cllm_sigmoid(float x)
    void cllm_swiglu_row(float* out, const float* gate, const float* up, int f)
    void cllm_swiglu_row_backward(float* dgate, float* dup, const float* gate, const float* up,
                                  const float* dout, int f)
from libc.string cimport memset, memcpy
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "kernels/dropout.h" nogil:
    uint64_t cllm_dropout_key(uint64_t seed, int64_t step, int64_t microbatch, int layer,
                              int site)
    int cllm_dropout_keep(uint64_t key, uint64_t index, uint32_t threshold)
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC

cdef extern from "kernels/bf16_gemm.h" nogil:
    ctypedef struct bf16_context:
        int status          # 0, or the first failure's oneDNN status (-1: out of memory)
        int num_plans
    int bf16_library_load(const char* path, char* err, size_t err_size)
    bint bf16_library_loaded()
    int bf16_context_init(bf16_context* g)
    void bf16_context_free(bf16_context* g)
    uint16_t bf16_round(float x)
    float bf16_to_float(uint16_t h)
    void bf16_round_rows(uint16_t* dst, const float* src, size_t rows, size_t cols, size_t ld)
    void bf16_gemm(bf16_context* g, int trans_a, int trans_b, int M, int N, int K,
                   const uint16_t* A, int lda, const uint16_t* B, int ldb, int accumulate,
                   float* C, int ldc)
    void f32_gemm(bf16_context* g, int trans_a, int trans_b, int M, int N, int K,
                  const float* A, int lda, const float* B, int ldb, int accumulate,
                  float* C, int ldc)
    const char* bf16_plan_impl(bf16_context* g, int index)


cdef struct Bf16Products:
    # a sphere's oneDNN state for its weight products: bf16 inputs (--precision bf16: every
    # matrix product takes bf16 inputs), or with fp32 set oneDNN's fp32 matmul on the fp32
    # inputs (--matmul onednn: the weight products only; attention and adapters stay on the
    # BLAS, and the bf16 fields below are unused)
    bf16_context ctx
    bint fp32
    const float* master         # the parameters whose rounded copy `weights` is
    const uint16_t* weights     # bf16(master), same offsets: shared, read-only while spheres run
    uint16_t* inputs            # scratch: one product's activation input, rounded
    # scratch: one product's output gradient, rounded (attention: the layer's qkv)
    uint16_t* grads
    uint16_t* block             # scratch: one attention block's probabilities or their gradient


cdef inline const uint16_t* bf16_weight(const Bf16Products* b, const float* w) noexcept nogil:
    return b.weights + (w - b.master)


cdef inline Bf16Products* bf16_products(Bf16Products* b) noexcept nogil:
    # b when its products take bf16 inputs, NULL for fp32 ones (the BLAS's, or oneDNN's fp32
    # kernel, which only the weight products use): what attention takes
    return b if b != NULL and not b.fp32 else NULL


cdef double now_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void clear(float* buf, size_t n) noexcept nogil:
    # the explicit step before kernels add into buf
    memset(buf, 0, n * sizeof(float))


cdef enum:
    # dropout sites, GPT-2's: the embedding sum, the attention probabilities, the outputs of
    # the attention's and the MLP's c_proj (before their residual adds)
    DROP_EMBEDDING = 0
    DROP_ATTENTION = 1
    DROP_ATTN_PROJ = 2
    DROP_MLP_PROJ = 3


cdef struct Dropout:
    # inverted dropout of one training micro-batch (dropout.h draws the masks)
    uint32_t threshold      # round(p * 2^32): an element is dropped when its draw is below it
    float scale             # 1 / (1 - p), applied to kept values
    uint64_t seed
    long long step
    long long microbatch    # the micro-batch's index in the global batch


cdef inline bint dropout_on(const Dropout* d) noexcept nogil:
    # NULL and p = 0 both mean no dropout: the kernels then run exactly as without it
    return d != NULL and d.threshold != 0


cdef inline uint64_t dropout_key(const Dropout* d, int layer, int site) noexcept nogil:
    return cllm_dropout_key(d.seed, d.step, d.microbatch, layer, site)


cdef void dropout_apply(float* dst, const float* src, size_t count, const Dropout* d,
                        uint64_t key, uint64_t first) noexcept nogil:
    # dst[i] = src[i] * scale where element first + i of the site is kept, else 0; dst may be
    # src. Forward (on values) and backward (on their gradients) use the same call.
    cdef size_t i
    for i in range(count):
        if cllm_dropout_keep(key, first + i, d.threshold):
            dst[i] = src[i] * d.scale
        else:
            dst[i] = 0.0


cdef inline uint64_t attention_mask_index(int b, int h, int row, int col, int NH,
                                          int n) noexcept nogil:
    # the element of the attention-probability site at (window b, head h, query row, key col)
    return ((<uint64_t>b * NH + h) * n + row) * n + col
