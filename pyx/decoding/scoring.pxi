# Scoring: a prefill that, instead of the last position's logits, gives the log-probability
# of a given target at each of its last positions and whether that target is the argmax (the
# loglikelihood requests of zero-shot task evaluation).
#
# The scored rows run through the final norm (each worker its share of rows), then the classifier in
# blocks of SCORE_ROWS rows: a block's logits [rows, V] are computed in fixed chunks of
# SCORE_COLS vocabulary columns, each worker taking whole chunks (one sgemm each), and after a
# barrier each worker reduces whole rows: max, first argmax, log of the sum of exponentials, as
# the loss kernel does (kernels/deterministic_math.h). Neither the chunks nor the blocks depend
# on the thread count, so neither do the results.

cdef enum:
    SCORE_ROWS = 32         # scored rows whose logits are held at once
    SCORE_COLS = 1024       # vocabulary columns per classifier product


cdef void score_row(float* row, int V, int target, double* logp,
                    unsigned char* greedy) noexcept nogil:
    # the log-softmax of the logits `row` at `target`, and whether target is the first index of
    # the row's maximum (as numpy's and torch's argmax pick it); the row is overwritten
    cdef float mx = cllm_row_max(row, V)
    cdef float xt = row[target]
    cdef bint first = xt == mx
    cdef int i
    if first:
        for i in range(target):
            if row[i] == mx:
                first = False
                break
    greedy[0] = first
    logp[0] = <double>(xt - mx) - log(cllm_row_exp_sum(row, V, mx))


cdef void decode_score_part(DecodeCache* d, DecodeWorker* w) noexcept nogil:
    # worker w's part of a scored prefill: prefill_layers, then the last d.pk rows' targets
    cdef const ModelConfig* c = &d.c
    cdef int C = c.C, V = c.V, k = d.pk, first = d.pn - d.pk
    cdef int chunks = (V + SCORE_COLS - 1) // SCORE_COLS
    cdef int a, b, m, i, q, v0, r0, r1, q0, q1
    cdef ModelParams p
    prefill_layers(d, w)
    if k == 0:
        return
    model_params(&p, <float*>d.params, c)
    rows_of(k, w.id, d.threads, &r0, &r1)
    norm_forward(c, d.pln + <size_t>(first + r0) * C, d.pmean + first + r0,
                 d.prstd + first + r0, d.px + <size_t>(first + r0) * C, p.lnfw, p.lnfb,
                 r1 - r0)
    decode_sync(d, w)
    rows_of(chunks, w.id, d.threads, &q0, &q1)
    for b in range((k + SCORE_ROWS - 1) // SCORE_ROWS):
        a = b * SCORE_ROWS
        m = min(<int>SCORE_ROWS, k - a)
        for q in range(q0, q1):
            v0 = q * SCORE_COLS
            sgemm_rm(False, True, m, min(<int>SCORE_COLS, V - v0), C, 1.0,
                     d.pln + <size_t>(first + a) * C, C, p.lm_head + <size_t>v0 * C, C, 0.0,
                     d.slogits + v0, V)
        decode_sync(d, w)
        rows_of(m, w.id, d.threads, &r0, &r1)
        for i in range(r0, r1):
            score_row(d.slogits + <size_t>i * V, V, d.ptargets[a + i], d.plogp + a + i,
                      d.pgreedy + a + i)
        decode_sync(d, w)


cdef void decode_score(DecodeCache* d, const int* tokens, int n, const int* targets, int k,
                       double* logp, unsigned char* greedy) noexcept nogil:
    # prefills n positions from d.n on (d.n + n <= T, d.slogits allocated) and scores the last
    # k <= n of them: logp[i] and greedy[i] for targets[i] at position d.n + n - k + i.
    # d.logits is left as it was.
    d.ptokens = tokens
    d.pn = n
    d.ptargets = targets
    d.pk = k
    d.plogp = logp
    d.pgreedy = greedy
    decode_run(d, DECODE_SCORE)
    d.n += n
