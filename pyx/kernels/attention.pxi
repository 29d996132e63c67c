# Causal multi-head attention, forward and backward, in blocks of ATT_BLOCK query rows:
# the probabilities are never held whole, backward recomputes them from the row statistics.
#
# A row of qkv is [q (NH heads) | k (KVH heads) | v (KVH heads)], W = C + 2 * KVH * hs floats
# (GPT-2: KVH = NH, W = 3C). Query head h reads key/value head h / (NH / KVH): grouped-query
# attention, and in backward the heads of a group add into their k and v in head order.


cdef enum:
    ATT_BLOCK = 32   # query rows per block: a block only needs the keys up to its end


cdef void attention_scores(Bf16Products* b, float* probs, const float* q, const float* k,
                           const uint16_t* q16, const uint16_t* k16, int r0, int rows, int n,
                           int W, int hs, float scale) noexcept nogil:
    # probs[rows, ld n] = scale * q[r0 .. r0+rows-1] @ k[0 .. r0+rows-1]^T for one head (q, k:
    # its slices of the qkv rows, W apart); with b, q16 and k16 are the same slices of
    # bf16(qkv) and the scale follows the product
    cdef int i, j
    cdef float* row
    if b == NULL:
        sgemm_rm(False, True, rows, r0 + rows, hs, scale, q + <size_t>r0 * W, W,
                 k, W, 0.0, probs, n)
        return
    bf16_gemm(&b.ctx, False, True, rows, r0 + rows, hs, q16 + <size_t>r0 * W, W,
              k16, W, False, probs, n)
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
                            int KVH, const Dropout* d, int layer) noexcept nogil:
    # qkv[B*n, W] -> out[B*n, C], causal softmax attention. The probabilities are never kept
    # whole: one block of ATT_BLOCK query rows at a time lives in the scratch probs
    # [ATT_BLOCK, n]; each row's max and 1/sum go to row_max, row_scale [B, NH, n], from which
    # attention_probs recomputes the block bit for bit. With dropout (d on; layer keys the
    # masks) out = dropout(probs) @ v, the block dropped in place.
    cdef int hs = C // NH, W = C + 2 * KVH * hs, group = NH // KVH
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef int b, h, t1, t2, r0, rows, cols
    cdef const float* q
    cdef const float* k
    cdef const float* v
    cdef float* row
    cdef float* mx
    cdef float* sc
    cdef bint drop = dropout_on(d)
    cdef uint64_t key = dropout_key(d, layer, DROP_ATTENTION) if drop else 0
    cdef const uint16_t* q16 = NULL
    cdef const uint16_t* k16 = NULL
    cdef const uint16_t* v16 = NULL
    cdef size_t kv_at
    if bp != NULL:      # bf16: the layer's q, k and v rounded once
        bf16_round_rows(bp.grads, qkv, 1, <size_t>B * n * W, <size_t>B * n * W)
    for b in range(B):
        for h in range(NH):
            kv_at = <size_t>b * n * W + C + (h // group) * hs
            q = qkv + <size_t>b * n * W + h * hs
            k = qkv + kv_at
            v = k + KVH * hs
            if bp != NULL:
                q16 = bp.grads + <size_t>b * n * W + h * hs
                k16 = bp.grads + kv_at
                v16 = k16 + KVH * hs
            mx = row_max + (<size_t>b * NH + h) * n
            sc = row_scale + (<size_t>b * NH + h) * n
            r0 = 0
            while r0 < n:
                rows = min(ATT_BLOCK, n - r0)
                cols = r0 + rows
                attention_scores(bp, probs, q, k, q16, k16, r0, rows, n, W, hs, scale)
                for t1 in range(r0, cols):
                    row = probs + <size_t>(t1 - r0) * n
                    attention_softmax_row(row, t1 + 1, mx + t1, sc + t1)
                    for t2 in range(t1 + 1, cols):
                        row[t2] = 0.0
                if drop:
                    attention_dropout_rows(probs, probs, b, h, r0, rows, n, NH, d, key)
                # out_h = att @ v
                if bp == NULL:
                    sgemm_rm(False, False, rows, hs, cols, 1.0, probs, n, v, W,
                             0.0, out + (<size_t>b * n + r0) * C + h * hs, C)
                else:
                    bf16_gemm(&bp.ctx, False, False, rows, hs, cols,
                              rounded_block(bp, probs, rows, cols, n), cols, v16,
                              W, False, out + (<size_t>b * n + r0) * C + h * hs, C)
                r0 += rows


cdef void attention_probs(Bf16Products* bp, float* probs, const float* q, const float* k,
                          const uint16_t* q16, const uint16_t* k16, const float* row_max,
                          const float* row_scale, int r0, int rows, int n, int W, int hs,
                          float scale) noexcept nogil:
    # the probabilities of query rows r0 .. r0+rows-1 of one head, as attention_forward had
    # them: the same scores, e^(score - max) * (1/sum) with the saved max and 1/sum, before
    # any dropout (attention_backward draws the forward's mask again).
    cdef int t1, t2
    cdef float* row
    cdef float mx, sc
    attention_scores(bp, probs, q, k, q16, k16, r0, rows, n, W, hs, scale)
    for t1 in range(r0, r0 + rows):
        row = probs + <size_t>(t1 - r0) * n
        mx = row_max[t1]
        sc = row_scale[t1]
        cllm_row_exp_scale(row, t1 + 1, mx, sc)
        for t2 in range(t1 + 1, r0 + rows):
            row[t2] = 0.0


cdef void attention_backward(Bf16Products* bp, float* dqkv, float* probs, float* dprobs,
                             const float* dout, const float* qkv, const float* row_max,
                             const float* row_scale, int B, int n, int C, int NH, int KVH,
                             const Dropout* d, int layer) noexcept nogil:
    # dqkv[B*n, W] += the gradient through attention_forward, whose row_max and row_scale
    # [B, NH, n] and dropout (d, layer) it takes; probs and dprobs are [ATT_BLOCK, n]
    # scratches. Blocks of query rows as in attention_forward, each block's probabilities
    # recomputed; dk and dv add up the blocks (and the heads of a group) in order. With
    # dropout the block's mask is drawn again: dv from the dropped probabilities (held in
    # dprobs until datt overwrites them), and datt is dropped as the probabilities were before
    # the softmax's backward.
    cdef int hs = C // NH, W = C + 2 * KVH * hs, group = NH // KVH
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef int b, h, t1, t2, r0, rows, cols
    cdef const float* q
    cdef const float* k
    cdef const float* v
    cdef const float* arow
    cdef const float* dout_h
    cdef float* dq
    cdef float* dk
    cdef float* dv
    cdef float* drow
    cdef const float* used
    cdef float dot
    cdef size_t q_at, kv_at
    cdef bint drop = dropout_on(d)
    cdef uint64_t key = dropout_key(d, layer, DROP_ATTENTION) if drop else 0
    cdef const uint16_t* q16 = NULL
    cdef const uint16_t* k16 = NULL
    cdef const uint16_t* v16 = NULL
    cdef const uint16_t* dout16 = NULL
    cdef const uint16_t* blk
    cdef float dots[ATT_BLOCK]
    if bp != NULL:      # bf16: q, k, v and the output gradient rounded once
        bf16_round_rows(bp.grads, qkv, 1, <size_t>B * n * W, <size_t>B * n * W)
        bf16_round_rows(bp.inputs, dout, 1, <size_t>B * n * C, <size_t>B * n * C)
    for b in range(B):
        for h in range(NH):
            q_at = <size_t>b * n * W + h * hs
            kv_at = <size_t>b * n * W + C + (h // group) * hs
            q = qkv + q_at
            k = qkv + kv_at
            v = k + KVH * hs
            dq = dqkv + q_at
            dk = dqkv + kv_at
            dv = dk + KVH * hs
            dout_h = dout + <size_t>b * n * C + h * hs
            if bp != NULL:
                q16 = bp.grads + q_at
                k16 = bp.grads + kv_at
                v16 = k16 + KVH * hs
                dout16 = bp.inputs + <size_t>b * n * C + h * hs
            r0 = 0
            while r0 < n:
                rows = min(ATT_BLOCK, n - r0)
                cols = r0 + rows
                attention_probs(bp, probs, q, k, q16, k16, row_max + (<size_t>b * NH + h) * n,
                                row_scale + (<size_t>b * NH + h) * n, r0, rows, n, W, hs,
                                scale)
                # dv += dropout(att)^T @ dout_h ; datt = dout_h @ v^T
                used = probs
                if drop:
                    attention_dropout_rows(dprobs, probs, b, h, r0, rows, n, NH, d, key)
                    used = dprobs
                if bp == NULL:
                    sgemm_rm(True, False, cols, hs, rows, 1.0, used, n,
                             dout_h + <size_t>r0 * C, C, 1.0, dv, W)
                    sgemm_rm(False, True, rows, cols, hs, 1.0, dout_h + <size_t>r0 * C, C,
                             v, W, 0.0, dprobs, n)
                else:
                    bf16_gemm(&bp.ctx, True, False, cols, hs, rows,
                              rounded_block(bp, used, rows, cols, n), cols,
                              dout16 + <size_t>r0 * C, C, True, dv, W)
                    bf16_gemm(&bp.ctx, False, True, rows, cols, hs, dout16 + <size_t>r0 * C, C,
                              v16, W, False, dprobs, n)
                if drop:
                    attention_dropout_rows(dprobs, dprobs, b, h, r0, rows, n, NH, d, key)
                # softmax backward, scaled: dpre = scale * att * (datt - sum(att * datt))
                cllm_row_dots(dots, probs, dprobs, rows, n, r0 + 1)
                for t1 in range(r0, cols):
                    arow = probs + <size_t>(t1 - r0) * n
                    drow = dprobs + <size_t>(t1 - r0) * n
                    dot = dots[t1 - r0]
                    for t2 in range(t1 + 1):
                        drow[t2] = scale * arow[t2] * (drow[t2] - dot)
                    for t2 in range(t1 + 1, cols):
                        drow[t2] = 0.0
                # dq += dpre @ k ; dk += dpre^T @ q
                if bp == NULL:
                    sgemm_rm(False, False, rows, hs, cols, 1.0, dprobs, n, k,
                             W, 1.0, dq + <size_t>r0 * W, W)
                    sgemm_rm(True, False, cols, hs, rows, 1.0, dprobs, n,
                             q + <size_t>r0 * W, W, 1.0, dk, W)
                else:
                    blk = rounded_block(bp, dprobs, rows, cols, n)
                    bf16_gemm(&bp.ctx, False, False, rows, hs, cols, blk, cols, k16,
                              W, True, dq + <size_t>r0 * W, W)
                    bf16_gemm(&bp.ctx, True, False, cols, hs, rows, blk, cols,
                              q16 + <size_t>r0 * W, W, True, dk, W)
                r0 += rows
