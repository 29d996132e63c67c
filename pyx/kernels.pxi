# Forward/backward kernels of one micro-batch. Argument order: outputs, inputs, weights,
# sizes; gradients carry a d prefix. N = B * n rows of the micro-batch.
#
# Write rule: every backward kernel ADDS (+=) into every gradient it produces, parameter and
# input gradients alike; no kernel clears anything. Clearing is the caller's explicit step:
# model_forward(grads) clears the parameter gradients once per micro-batch, and each activation
# gradient buffer right before the kernels that add into it. So a tensor used twice (wte: the
# token embedding and the tied output projection) gets the sum of both uses, whatever order
# the calls come in. (crossentropy_forward_backward is the loss, not a backward kernel: it
# turns the logits into dloss/dlogits in place.)
from libc.math cimport sqrtf, log, isfinite, NAN

cdef extern from "deterministic_math.h" nogil:
    float cllm_expf(float x)
    float cllm_tanhf(float x)
    float cllm_row_max(const float* x, int n)
    double cllm_row_exp_sum(float* x, int n, float shift)
    float cllm_nonfinite_probe(const float* x, size_t n)
    double cllm_divide_sumsq(float* g, size_t n, float c)
    float cllm_row_sum(const float* x, int n)
    float cllm_row_sq_dev(const float* x, int n, float shift)
    void cllm_ln_backward_sums(const float* x, const float* d, const float* w, int n,
                               float mean, float rstd, float* sum_wd, float* sum_wd_norm)
from libc.string cimport memset, memcpy
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "dropout.h" nogil:
    uint64_t cllm_dropout_key(uint64_t seed, int64_t step, int64_t microbatch, int layer,
                              int site)
    int cllm_dropout_keep(uint64_t key, uint64_t index, uint32_t threshold)
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC

cdef extern from "bf16_gemm.h" nogil:
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
    const char* bf16_plan_impl(bf16_context* g, int index)


cdef struct Bf16Products:
    # a sphere's state for --precision bf16: every matrix product takes bf16 inputs
    bf16_context ctx
    const float* master         # the parameters whose rounded copy `weights` is
    const uint16_t* weights     # bf16(master), same offsets: shared, read-only while spheres run
    uint16_t* inputs            # scratch: one product's activation input, rounded
    uint16_t* grads             # scratch: one product's output gradient, rounded (attention:
                                # the layer's qkv)
    uint16_t* block             # scratch: one attention block's probabilities or their gradient


cdef inline const uint16_t* bf16_weight(const Bf16Products* b, const float* w) noexcept nogil:
    return b.weights + (w - b.master)


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


cdef float LN_EPS = 1e-5
cdef float GELU_SCALE = 0.7978845608028654  # sqrt(2/pi)


cdef void encoder_forward(float* out, const int* inp, int stride, const float* wte,
                          const float* wpe, int B, int n, int C) noexcept nogil:
    # out[B*n, C] = wte[inp[b, t]] + wpe[t]; inp rows are `stride` apart
    cdef int b, t, i
    cdef float* o
    cdef const float* we
    cdef const float* pe
    for b in range(B):
        for t in range(n):
            o = out + (<size_t>b * n + t) * C
            we = wte + <size_t>inp[<size_t>b * stride + t] * C
            pe = wpe + <size_t>t * C
            for i in range(C):
                o[i] = we[i] + pe[i]


cdef void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp,
                           int stride, int B, int n, int C) noexcept nogil:
    # dwte[inp[b, t]] += dout[b, t]; dwpe[t] += dout[b, t], in (b, t) order
    cdef int b, t, i
    cdef const float* d
    cdef float* dwe
    cdef float* dpe
    for b in range(B):
        for t in range(n):
            d = dout + (<size_t>b * n + t) * C
            dwe = dwte + <size_t>inp[<size_t>b * stride + t] * C
            dpe = dwpe + <size_t>t * C
            for i in range(C):
                dwe[i] += d[i]
                dpe[i] += d[i]


cdef void layernorm_apply(float* out, const float* inp, const float* mean, const float* rstd,
                          const float* weight, const float* bias, int N, int C) noexcept nogil:
    # out[N,C] = (inp - mean) * rstd * weight + bias with a row's saved mean and rstd: the
    # forward's own expression, so that the backward recomputes its output bit for bit
    cdef int r, i
    cdef float m, s
    cdef const float* x
    cdef float* o
    for r in range(N):
        x = inp + <size_t>r * C
        o = out + <size_t>r * C
        m = mean[r]
        s = rstd[r]
        for i in range(C):
            o[i] = (x[i] - m) * s * weight[i] + bias[i]


cdef void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                            const float* weight, const float* bias, int N, int C) noexcept nogil:
    # out[N,C] = (inp - mean) * rstd * weight + bias, per row; biased variance
    cdef int r
    cdef float m, v
    cdef const float* x
    for r in range(N):
        x = inp + <size_t>r * C
        m = cllm_row_sum(x, C) / C
        v = cllm_row_sq_dev(x, C, m) / C
        mean[r] = m
        rstd[r] = 1.0 / sqrtf(v + LN_EPS)
    layernorm_apply(out, inp, mean, rstd, weight, bias, N, C)


cdef void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                             const float* inp, const float* weight, const float* mean,
                             const float* rstd, int N, int C) noexcept nogil:
    # dinp[N,C], dweight[C], dbias[C] += the gradients through out = layernorm(inp)
    cdef int r, i
    cdef float m, s, norm, dnorm, dnorm_mean, dnorm_norm_mean
    cdef const float* x
    cdef const float* d
    cdef float* dx
    for r in range(N):
        x = inp + <size_t>r * C
        d = dout + <size_t>r * C
        dx = dinp + <size_t>r * C
        m = mean[r]
        s = rstd[r]
        cllm_ln_backward_sums(x, d, weight, C, m, s, &dnorm_mean, &dnorm_norm_mean)
        dnorm_mean = dnorm_mean / C
        dnorm_norm_mean = dnorm_norm_mean / C
        for i in range(C):
            norm = (x[i] - m) * s
            dnorm = weight[i] * d[i]
            dbias[i] += d[i]
            dweight[i] += norm * d[i]
            dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s


cdef inline void weight_product(Bf16Products* b, float* out, const float* inp,
                                const float* weight, int N, int C, int OC,
                                bint accumulate) noexcept nogil:
    # out[N,OC] (+)= inp[N,C] @ weight[OC,C]^T, in fp32 (b NULL) or on bf16 inputs
    if b == NULL:
        sgemm_rm(False, True, N, OC, C, 1.0, inp, C, weight, C, 1.0 if accumulate else 0.0,
                 out, OC)
        return
    bf16_round_rows(b.inputs, inp, N, C, C)
    bf16_gemm(&b.ctx, False, True, N, OC, C, b.inputs, C, bf16_weight(b, weight), C,
              accumulate, out, OC)


cdef void linear_forward(Bf16Products* b, float* out, const float* inp, const float* weight,
                         const float* bias, int N, int C, int OC) noexcept nogil:
    # out[N,OC] = inp[N,C] @ weight[OC,C]^T (+ bias[OC]): the product adds onto the bias rows.
    # b: NULL for fp32, else the sphere's bf16 state (in every kernel that takes it)
    cdef int i, o
    cdef float* row
    if bias == NULL:
        weight_product(b, out, inp, weight, N, C, OC, False)
        return
    for i in range(N):
        row = out + <size_t>i * OC
        for o in range(OC):
            row[o] = bias[o]
    weight_product(b, out, inp, weight, N, C, OC, True)


cdef void linear_backward(Bf16Products* b, float* dinp, float* dweight, float* dbias,
                          const float* dout, const float* inp, const float* weight,
                          int N, int C, int OC) noexcept nogil:
    # dinp[N,C] += dout[N,OC] @ weight[OC,C]; dweight[OC,C] += dout^T @ inp[N,C];
    # dbias[OC] += the sum over rows of dout (dbias may be NULL)
    cdef int i, o
    cdef const float* row
    if b == NULL:
        sgemm_rm(False, False, N, C, OC, 1.0, dout, OC, weight, C, 1.0, dinp, C)
        sgemm_rm(True, False, OC, C, N, 1.0, dout, OC, inp, C, 1.0, dweight, C)
    else:
        bf16_round_rows(b.grads, dout, N, OC, OC)
        bf16_round_rows(b.inputs, inp, N, C, C)
        bf16_gemm(&b.ctx, False, False, N, C, OC, b.grads, OC, bf16_weight(b, weight), C,
                  True, dinp, C)
        bf16_gemm(&b.ctx, True, False, OC, C, N, b.grads, OC, b.inputs, C, True, dweight, C)
    if dbias != NULL:
        for i in range(N):
            row = dout + <size_t>i * OC
            for o in range(OC):
                dbias[o] += row[o]


cdef void residual_forward(Bf16Products* b, float* out, const float* res, const float* inp,
                           const float* weight, const float* bias, int N, int C,
                           int OC) noexcept nogil:
    # out[N,OC] = res[N,OC] + (inp[N,C] @ weight[OC,C]^T + bias[OC]): a projection added onto
    # the residual stream. Rounded as (res + bias) + inp @ weight^T: the product adds onto
    # res + bias, one rounding fewer than adding a separate projection.
    cdef int i, o
    cdef float* row
    cdef const float* r
    for i in range(N):
        row = out + <size_t>i * OC
        r = res + <size_t>i * OC
        for o in range(OC):
            row[o] = r[o] + bias[o]
    weight_product(b, out, inp, weight, N, C, OC, True)


cdef void residual_dropout_forward(Bf16Products* b, float* out, const float* res,
                                   const float* inp, const float* weight, const float* bias,
                                   int N, int C, int OC, const Dropout* d,
                                   uint64_t key) noexcept nogil:
    # out[N,OC] = res + dropout(inp @ weight^T + bias): the projection is dropped before it is
    # added onto the residual stream (element index: row * OC + column)
    cdef size_t i, size = <size_t>N * OC
    linear_forward(b, out, inp, weight, bias, N, C, OC)
    dropout_apply(out, out, size, d, key, 0)
    for i in range(size):
        out[i] = res[i] + out[i]


cdef void residual_backward(float* dres, const float* dout, size_t size) noexcept nogil:
    # dres += dout: the residual stream passes its gradient through; the projection's
    # gradients come from linear_backward on the same dout
    cdef size_t i
    for i in range(size):
        dres[i] += dout[i]


# float constants: a bare literal would be a C double and drag the loops into double math
cdef float GELU_CUBE = 0.044715
cdef float GELU_CUBE3 = 3.0 * 0.044715
cdef float HALF = 0.5
cdef float ONE = 1.0


cdef void gelu_forward(float* out, const float* inp, size_t N) noexcept nogil:
    # out[N] = gelu(inp), tanh approximation
    cdef size_t i
    cdef float x
    for i in range(N):
        x = inp[i]
        out[i] = HALF * x * (ONE + cllm_tanhf(GELU_SCALE * (x + GELU_CUBE * x * x * x)))


cdef void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N) noexcept nogil:
    # dinp[N] += dout * gelu'(inp); dinp must not alias dout
    cdef size_t i
    cdef float x, th
    for i in range(N):
        x = inp[i]
        th = cllm_tanhf(GELU_SCALE * (x + GELU_CUBE * x * x * x))
        dinp[i] += dout[i] * (HALF * (ONE + th)
                              + HALF * x * (ONE - th * th) * GELU_SCALE * (ONE + GELU_CUBE3 * x * x))


cdef enum:
    ATT_BLOCK = 32   # query rows per block: a block only needs the keys up to its end


cdef void attention_scores(Bf16Products* b, float* probs, const float* q, const uint16_t* q16,
                           int r0, int rows, int n, int C, int hs, float scale) noexcept nogil:
    # probs[rows, ld n] = scale * q[r0 .. r0+rows-1] @ k[0 .. r0+rows-1]^T for one head;
    # with b, q16 is the same head's slice of bf16(qkv) and the scale follows the product
    cdef int i, j
    cdef float* row
    if b == NULL:
        sgemm_rm(False, True, rows, r0 + rows, hs, scale, q + <size_t>r0 * 3 * C, 3 * C,
                 q + C, 3 * C, 0.0, probs, n)
        return
    bf16_gemm(&b.ctx, False, True, rows, r0 + rows, hs, q16 + <size_t>r0 * 3 * C, 3 * C,
              q16 + C, 3 * C, False, probs, n)
    for i in range(rows):
        row = probs + <size_t>i * n
        for j in range(r0 + rows):
            row[j] = row[j] * scale


cdef inline const uint16_t* rounded_block(Bf16Products* b, const float* block, int rows,
                                          int cols, int ld) noexcept nogil:
    # bf16 of a [rows, cols] block (leading dim ld) in b.block, leading dim cols
    bf16_round_rows(b.block, block, rows, cols, ld)
    return b.block


cdef inline void attention_softmax_row(float* row, int count, float* row_max,
                                       float* row_scale) noexcept nogil:
    # row[0..count-1] = softmax of its scores in place; *row_max, *row_scale = the max and
    # 1/sum attention_probs recomputes it from
    cdef int t2
    cdef float m = cllm_row_max(row, count)
    cdef float s = <float>(1.0 / cllm_row_exp_sum(row, count, m))
    for t2 in range(count):
        row[t2] = row[t2] * s
    row_max[0] = m
    row_scale[0] = s


cdef void attention_dropout_rows(float* dropped, const float* probs, int b, int h, int r0,
                                 int rows, int n, int NH, const Dropout* d,
                                 uint64_t key) noexcept nogil:
    # dropped = dropout(probs) for the block of query rows r0 .. r0+rows-1 of one (b, h) and
    # its key columns 0 .. r0+rows-1, both [rows, ld n] (dropped may be probs)
    cdef int t1
    for t1 in range(r0, r0 + rows):
        dropout_apply(dropped + <size_t>(t1 - r0) * n, probs + <size_t>(t1 - r0) * n,
                      r0 + rows, d, key, attention_mask_index(b, h, t1, 0, NH, n))


cdef void attention_forward(Bf16Products* bp, float* out, float* row_max, float* row_scale,
                            float* probs, const float* qkv, int B, int n, int C, int NH,
                            const Dropout* d, int layer) noexcept nogil:
    # qkv[B*n, 3C] -> out[B*n, C], causal softmax attention. The probabilities are never kept
    # whole: one block of ATT_BLOCK query rows at a time lives in the scratch probs
    # [ATT_BLOCK, n]; each row's max and 1/sum go to row_max, row_scale [B, NH, n], from which
    # attention_probs recomputes the block bit for bit. With dropout (d on; layer keys the
    # masks) out = dropout(probs) @ v, the block dropped in place.
    cdef int hs = C // NH
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef int b, h, t1, t2, r0, rows, cols
    cdef const float* q
    cdef float* row
    cdef float* mx
    cdef float* sc
    cdef bint drop = dropout_on(d)
    cdef uint64_t key = dropout_key(d, layer, DROP_ATTENTION) if drop else 0
    cdef const uint16_t* q16 = NULL
    if bp != NULL:      # bf16: the layer's q, k and v rounded once
        bf16_round_rows(bp.grads, qkv, 1, <size_t>B * n * 3 * C, <size_t>B * n * 3 * C)
    for b in range(B):
        for h in range(NH):
            q = qkv + <size_t>b * n * 3 * C + h * hs
            if bp != NULL:
                q16 = bp.grads + <size_t>b * n * 3 * C + h * hs
            mx = row_max + (<size_t>b * NH + h) * n
            sc = row_scale + (<size_t>b * NH + h) * n
            r0 = 0
            while r0 < n:
                rows = min(ATT_BLOCK, n - r0)
                cols = r0 + rows
                attention_scores(bp, probs, q, q16, r0, rows, n, C, hs, scale)
                for t1 in range(r0, cols):
                    row = probs + <size_t>(t1 - r0) * n
                    attention_softmax_row(row, t1 + 1, mx + t1, sc + t1)
                    for t2 in range(t1 + 1, cols):
                        row[t2] = 0.0
                if drop:
                    attention_dropout_rows(probs, probs, b, h, r0, rows, n, NH, d, key)
                # out_h = att @ v
                if bp == NULL:
                    sgemm_rm(False, False, rows, hs, cols, 1.0, probs, n, q + 2 * C, 3 * C,
                             0.0, out + (<size_t>b * n + r0) * C + h * hs, C)
                else:
                    bf16_gemm(&bp.ctx, False, False, rows, hs, cols,
                              rounded_block(bp, probs, rows, cols, n), cols, q16 + 2 * C,
                              3 * C, False, out + (<size_t>b * n + r0) * C + h * hs, C)
                r0 += rows


cdef void attention_probs(Bf16Products* bp, float* probs, const float* q, const uint16_t* q16,
                          const float* row_max, const float* row_scale, int r0, int rows,
                          int n, int C, int hs, float scale) noexcept nogil:
    # the probabilities of query rows r0 .. r0+rows-1 of one head, as attention_forward had
    # them: the same scores, e^(score - max) * (1/sum) with the saved max and 1/sum, before
    # any dropout (attention_backward draws the forward's mask again).
    cdef int t1, t2
    cdef float* row
    cdef float mx, sc
    attention_scores(bp, probs, q, q16, r0, rows, n, C, hs, scale)
    for t1 in range(r0, r0 + rows):
        row = probs + <size_t>(t1 - r0) * n
        mx = row_max[t1]
        sc = row_scale[t1]
        for t2 in range(t1 + 1):
            row[t2] = cllm_expf(row[t2] - mx) * sc
        for t2 in range(t1 + 1, r0 + rows):
            row[t2] = 0.0


cdef void attention_backward(Bf16Products* bp, float* dqkv, float* probs, float* dprobs,
                             const float* dout, const float* qkv, const float* row_max,
                             const float* row_scale, int B, int n, int C, int NH,
                             const Dropout* d, int layer) noexcept nogil:
    # dqkv[B*n, 3C] += the gradient through attention_forward, whose row_max and row_scale
    # [B, NH, n] and dropout (d, layer) it takes; probs and dprobs are [ATT_BLOCK, n]
    # scratches. Blocks of query rows as in attention_forward, each block's probabilities
    # recomputed; dk and dv add up the blocks in order. With dropout the block's mask is drawn
    # again: dv from the dropped probabilities (held in dprobs until datt overwrites them),
    # and datt is dropped as the probabilities were before the softmax's backward.
    cdef int hs = C // NH
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef int b, h, t1, t2, r0, rows, cols
    cdef const float* q
    cdef const float* arow
    cdef const float* dout_h
    cdef float* dq
    cdef float* drow
    cdef const float* used
    cdef float dot
    cdef bint drop = dropout_on(d)
    cdef uint64_t key = dropout_key(d, layer, DROP_ATTENTION) if drop else 0
    cdef const uint16_t* q16 = NULL
    cdef const uint16_t* dout16 = NULL
    cdef const uint16_t* blk
    if bp != NULL:      # bf16: q, k, v and the output gradient rounded once
        bf16_round_rows(bp.grads, qkv, 1, <size_t>B * n * 3 * C, <size_t>B * n * 3 * C)
        bf16_round_rows(bp.inputs, dout, 1, <size_t>B * n * C, <size_t>B * n * C)
    for b in range(B):
        for h in range(NH):
            q = qkv + <size_t>b * n * 3 * C + h * hs
            dq = dqkv + <size_t>b * n * 3 * C + h * hs
            dout_h = dout + <size_t>b * n * C + h * hs
            if bp != NULL:
                q16 = bp.grads + <size_t>b * n * 3 * C + h * hs
                dout16 = bp.inputs + <size_t>b * n * C + h * hs
            r0 = 0
            while r0 < n:
                rows = min(ATT_BLOCK, n - r0)
                cols = r0 + rows
                attention_probs(bp, probs, q, q16, row_max + (<size_t>b * NH + h) * n,
                                row_scale + (<size_t>b * NH + h) * n, r0, rows, n, C, hs, scale)
                # dv += dropout(att)^T @ dout_h ; datt = dout_h @ v^T
                used = probs
                if drop:
                    attention_dropout_rows(dprobs, probs, b, h, r0, rows, n, NH, d, key)
                    used = dprobs
                if bp == NULL:
                    sgemm_rm(True, False, cols, hs, rows, 1.0, used, n,
                             dout_h + <size_t>r0 * C, C, 1.0, dq + 2 * C, 3 * C)
                    sgemm_rm(False, True, rows, cols, hs, 1.0, dout_h + <size_t>r0 * C, C,
                             q + 2 * C, 3 * C, 0.0, dprobs, n)
                else:
                    bf16_gemm(&bp.ctx, True, False, cols, hs, rows,
                              rounded_block(bp, used, rows, cols, n), cols,
                              dout16 + <size_t>r0 * C, C, True, dq + 2 * C, 3 * C)
                    bf16_gemm(&bp.ctx, False, True, rows, cols, hs, dout16 + <size_t>r0 * C, C,
                              q16 + 2 * C, 3 * C, False, dprobs, n)
                if drop:
                    attention_dropout_rows(dprobs, dprobs, b, h, r0, rows, n, NH, d, key)
                # softmax backward, scaled: dpre = scale * att * (datt - sum(att * datt))
                for t1 in range(r0, cols):
                    arow = probs + <size_t>(t1 - r0) * n
                    drow = dprobs + <size_t>(t1 - r0) * n
                    dot = 0.0
                    for t2 in range(t1 + 1):
                        dot += arow[t2] * drow[t2]
                    for t2 in range(t1 + 1):
                        drow[t2] = scale * arow[t2] * (drow[t2] - dot)
                    for t2 in range(t1 + 1, cols):
                        drow[t2] = 0.0
                # dq += dpre @ k ; dk += dpre^T @ q
                if bp == NULL:
                    sgemm_rm(False, False, rows, hs, cols, 1.0, dprobs, n, q + C,
                             3 * C, 1.0, dq + <size_t>r0 * 3 * C, 3 * C)
                    sgemm_rm(True, False, cols, hs, rows, 1.0, dprobs, n,
                             q + <size_t>r0 * 3 * C, 3 * C, 1.0, dq + C, 3 * C)
                else:
                    blk = rounded_block(bp, dprobs, rows, cols, n)
                    bf16_gemm(&bp.ctx, False, False, rows, hs, cols, blk, cols, q16 + C,
                              3 * C, True, dq + <size_t>r0 * 3 * C, 3 * C)
                    bf16_gemm(&bp.ctx, True, False, cols, hs, rows, blk, cols,
                              q16 + <size_t>r0 * 3 * C, 3 * C, True, dq + C, 3 * C)
                r0 += rows


cdef void crossentropy_forward_backward(float* logits, double* total, int* counted,
                                        const int* targets, int stride, int n, int r0,
                                        int rows, int V, int pad_id,
                                        bint want_grad) noexcept nogil:
    # logits[rows, V] of rows r0 .. r0+rows-1 of the micro-batch (row r is position r % n of
    # sequence r / n, whose targets are `stride` apart): total += -log softmax[target] and
    # counted += 1 for each target != pad_id (pad_id -1: all count), row after row. The logits
    # are overwritten: with want_grad by d(sum)/dlogits = softmax - onehot (0 on rows that do
    # not count)
    cdef int r, i, tgt
    cdef float mx, xt, inv
    cdef double s
    cdef float* row
    for r in range(rows):
        row = logits + <size_t>r * V
        tgt = targets[<size_t>((r0 + r) // n) * stride + (r0 + r) % n]
        if tgt == pad_id:
            if want_grad:
                memset(row, 0, V * sizeof(float))
            continue
        mx = cllm_row_max(row, V)
        xt = row[tgt] - mx
        s = cllm_row_exp_sum(row, V, mx)
        total[0] += log(s) - xt
        counted[0] += 1
        if want_grad:
            inv = <float>(1.0 / s)
            for i in range(V):
                row[i] = row[i] * inv
            row[tgt] -= ONE
