/* The matrix-vector products of generation: one output row is the dot product of a weight row
 * with the input vector, summed in 16 fixed lanes (a GCC vector type: the loop vectorises
 * without the compiler reassociating anything) which are then added in a fixed order. A row's
 * result therefore depends only on its weights and the input, never on which other rows are
 * computed with it or by which thread: generation gives the same bits for any thread count. */
#ifndef CLLM_DECODE_MATH_H
#define CLLM_DECODE_MATH_H
#include <string.h>

typedef float cllm_dv16 __attribute__((vector_size(64)));

static inline cllm_dv16 cllm_dload16(const float *p) {
    cllm_dv16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float cllm_dlanes(cllm_dv16 lane, const float *w, const float *x, int i, int n) {
    float s = 0.0f;
    int j;
    for (j = 0; j < 16; j++) s += lane[j];
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

/* Generation reads every weight once per position, so its speed is the memory's: a core keeps
 * only so many cache-line requests in flight, and the hardware prefetcher starts each short
 * row anew. Asking for the line CLLM_PREFETCH_BYTES ahead into the core's L2 cache (past the
 * row's end: the next rows follow in memory) keeps the stream going; on an Intel Xeon one
 * core's rate at rows of 576 to 3,072 floats went from 15-17 GB/s to 20-24 GB/s (ahead into
 * L1, or 4 KiB ahead, gave 18-22). A prefetch changes no result. */
#define CLLM_PREFETCH_BYTES 16384

static inline void cllm_prefetch_ahead(const void *p) {
    __builtin_prefetch((const char *)p + CLLM_PREFETCH_BYTES, 0, 2);
}

/* out[r - r0] = dot(W[r, :], x) for the rows r0 <= r < r1 of the row-major W[., n], one row
 * after another, as the weights are laid out */
static inline void cllm_matvec_rows(float *out, const float *W, const float *x, int r0, int r1,
                                    int n) {
    int r, i;
    for (r = r0; r < r1; r++) {
        const float *w = W + (size_t)r * n;
        cllm_dv16 a = {0};
        for (i = 0; i + 16 <= n; i += 16) {
            cllm_prefetch_ahead(w + i);
            a += cllm_dload16(w + i) * cllm_dload16(x + i);
        }
        out[r - r0] = cllm_dlanes(a, w, x, i, n);
    }
}

/* The same products on bf16 weights (generation with --precision bf16: half the bytes to
 * read). A load of 64 bytes holds 32 bf16 weights, two in each 32-bit lane: the one in the low
 * half becomes a float by a shift, the one in the high half by masking the low half off, so no
 * widening is needed. The input comes already rounded to bf16 and split the same way
 * (cllm_bf16_split): for each block of 32, its 16 even elements, then its 16 odd ones; the
 * elements past the last whole block stay in order. Every product is exact in float; only the
 * sums round, in 16 fixed lanes (even elements first, then odd ones, block after block). */
typedef unsigned int cllm_du32 __attribute__((vector_size(64)));

static inline cllm_du32 cllm_dload32_bf16(const unsigned short *p) {
    cllm_du32 u;
    memcpy(&u, p, sizeof u);
    return u;
}

static inline cllm_dv16 cllm_du32_as_float(cllm_du32 u) {
    cllm_dv16 v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static inline float cllm_bf16_value(unsigned short h) {
    unsigned int u = (unsigned int)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* xs = x rounded to bf16 (as floats) and split for cllm_matvec_rows_bf16 */
static inline void cllm_bf16_split(float *xs, const float *x, int n) {
    int b, k, i;
    for (b = 0; b + 32 <= n; b += 32)
        for (k = 0; k < 16; k++) {
            xs[b + k] = cllm_bf16_value(bf16_round(x[b + 2 * k]));
            xs[b + 16 + k] = cllm_bf16_value(bf16_round(x[b + 2 * k + 1]));
        }
    for (i = b; i < n; i++) xs[i] = cllm_bf16_value(bf16_round(x[i]));
}

static inline float cllm_dlanes_bf16(cllm_dv16 lane, const unsigned short *w, const float *xs,
                                     int i, int n) {
    float s = 0.0f;
    int j;
    for (j = 0; j < 16; j++) s += lane[j];
    for (; i < n; i++) s += cllm_bf16_value(w[i]) * xs[i];
    return s;
}

#define CLLM_BF16_TERM(acc, u, xe, xo) do { \
        acc = acc + cllm_du32_as_float((u) << 16) * (xe); \
        acc = acc + cllm_du32_as_float((u) & 0xffff0000u) * (xo); \
    } while (0)

/* out[r - r0] = dot(W[r, :], x) for rows r0 <= r < r1 of the row-major bf16 W[., n], with
 * xs = cllm_bf16_split(x) */
static inline void cllm_matvec_rows_bf16(float *out, const unsigned short *W, const float *xs,
                                         int r0, int r1, int n) {
    int r, i;
    for (r = r0; r < r1; r++) {
        const unsigned short *w = W + (size_t)r * n;
        cllm_dv16 a = {0};
        for (i = 0; i + 32 <= n; i += 32) {
            cllm_prefetch_ahead(w + i);
            CLLM_BF16_TERM(a, cllm_dload32_bf16(w + i), cllm_dload16(xs + i),
                           cllm_dload16(xs + i + 16));
        }
        out[r - r0] = cllm_dlanes_bf16(a, w, xs, i, n);
    }
}
#endif

/* A barrier for the phases of one decoded position: the threads arrive within microseconds
 * of each other, so they spin (with a pause) instead of sleeping in the kernel, which would
 * cost tens of microseconds per phase; after many spins a waiter yields its core, so that more
 * threads than cores still make progress. Sense-reversing: each thread keeps its own sense. */
#ifndef CLLM_SPIN_BARRIER
#define CLLM_SPIN_BARRIER
#include <sched.h>
typedef struct {
    int count;      /* threads arrived in the current phase */
    int sense;      /* flips when the last one arrives */
    int n;
} cllm_spin_barrier;

static inline void cllm_spin_init(cllm_spin_barrier *b, int n) {
    b->count = 0;
    b->sense = 0;
    b->n = n;
}

static inline void cllm_spin_wait(cllm_spin_barrier *b, int *local_sense) {
    int sense = !*local_sense, spins = 0;
    *local_sense = sense;
    if (__atomic_fetch_add(&b->count, 1, __ATOMIC_ACQ_REL) == b->n - 1) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, sense, __ATOMIC_RELEASE);
        return;
    }
    while (__atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != sense) {
        if (++spins < 20000)
            __builtin_ia32_pause();
        else
            sched_yield();
    }
}
#endif
