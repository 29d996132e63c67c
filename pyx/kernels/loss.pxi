# The loss: cross-entropy of the logits, turned into dloss/dlogits in place.


cdef void crossentropy_forward_backward(float* logits, double* total, int* counted,
                                        const int* targets, int stride, int n, int r0,
                                        int rows, int V, int pad_id,
                                        bint want_grad) noexcept nogil:
    # logits[rows, V] of rows r0 .. r0+rows-1 of the micro-batch (row r is position r % n of
    # sequence r / n, whose targets are `stride` apart): total += -log softmax[target] and
    # counted += 1 for each target that is neither negative (IGNORE_TARGET, masked out) nor
    # pad_id (pad_id -1: every id counts), row after row. The logits
    # are overwritten: with want_grad by d(sum)/dlogits = softmax - onehot (0 on rows that do
    # not count)
    cdef int r, i, tgt
    cdef float mx, xt, inv
    cdef double s
    cdef float* row
    for r in range(rows):
        row = logits + <size_t>r * V
        tgt = targets[<size_t>((r0 + r) // n) * stride + (r0 + r) % n]
        if tgt < 0 or tgt == pad_id:
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
