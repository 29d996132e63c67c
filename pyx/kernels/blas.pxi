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
