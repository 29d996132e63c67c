# Row-major sgemm on top of scipy's column-major BLAS (one thread per caller).
from scipy.linalg.cython_blas cimport sgemm


cdef inline void sgemm_rm(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                          const float* A, int lda, const float* B, int ldb, float beta,
                          float* C, int ldc) noexcept nogil:
    # C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, all row-major.
    # Row-major C is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    sgemm(&tb, &ta, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda, &beta, C, &ldc)


cdef inline void linear_forward(float* out, const float* inp, const float* weight,
                                const float* bias, int N, int C, int OC, float beta) noexcept nogil:
    # out[N,OC] = beta * out + inp[N,C] @ weight[OC,C]^T (+ bias[OC])
    cdef int i, o
    cdef float* row
    if bias != NULL:
        for i in range(N):
            row = out + <size_t>i * OC
            if beta == 0.0:
                for o in range(OC):
                    row[o] = bias[o]
            else:
                for o in range(OC):
                    row[o] = row[o] + bias[o]
        beta = 1.0
    sgemm_rm(False, True, N, OC, C, 1.0, inp, C, weight, C, beta, out, OC)


cdef inline void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                                 const float* inp, const float* weight,
                                 int N, int C, int OC) noexcept nogil:
    # dinp[N,C] = dout[N,OC] @ weight[OC,C]; dweight[OC,C] = dout^T @ inp[N,C];
    # dbias[OC] = sum over rows of dout (all three overwritten)
    cdef int i, o
    cdef const float* row
    sgemm_rm(False, False, N, C, OC, 1.0, dout, OC, weight, C, 0.0, dinp, C)
    sgemm_rm(True, False, OC, C, N, 1.0, dout, OC, inp, C, 0.0, dweight, C)
    if dbias != NULL:
        memset(dbias, 0, OC * sizeof(float))
        for i in range(N):
            row = dout + <size_t>i * OC
            for o in range(OC):
                dbias[o] += row[o]
