/* Deterministic float math: exp, tanh and the row reductions of the kernels, made only of IEEE
 * float operations in a fixed order, so that every machine and every thread computes the same
 * bits (no libm dispatch, no fast-math, no reassociation by the compiler).
 * cllm_expf: x = k ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial of degree 7
 * (truncation error below 5e-9 relative), 2^k assembled in the exponent bits. */
#ifndef CLLM_DETERMINISTIC_MATH_H
#define CLLM_DETERMINISTIC_MATH_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* e^r for |r| <= ln2/2 by Horner's rule on its Taylor polynomial of degree 7; r a float or a
 * vector of floats (the same operations either way) */
#define CLLM_EXP_TAYLOR(r) \
    ((((((((1.0f / 5040.0f) * (r) + 1.0f / 720.0f) * (r) + 1.0f / 120.0f) * (r) \
         + 1.0f / 24.0f) * (r) + 1.0f / 6.0f) * (r) + 0.5f) * (r) + 1.0f) * (r) + 1.0f)

static inline float cllm_expf(float x) {
    const float round_magic = 12582912.0f;          /* 1.5 * 2^23: adds round-to-nearest */
    x = x < -87.0f ? -87.0f : x;                    /* keeps 2^k a normal number; NaN passes */
    x = x > 88.0f ? 88.0f : x;
    float k = (x * 1.44269504088896341f + round_magic) - round_magic;
    k = k != k ? 0.0f : k;                          /* NaN: keep the int conversion defined */
    float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;   /* Cody-Waite ln2 = hi + lo */
    float p = CLLM_EXP_TAYLOR(r);
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float cllm_tanhf(float x) {
    /* 1 - 2 / (e^2x + 1): saturates to +-1 through the clamp of cllm_expf */
    return 1.0f - 2.0f / (cllm_expf(2.0f * x) + 1.0f);
}

/* 16 lanes at once (a GCC vector type): reductions run in fixed lanes, combined in a fixed
 * order, so they vectorise without letting the compiler reassociate and give the same bits
 * on every run. */
typedef float cllm_v16 __attribute__((vector_size(64)));
typedef int32_t cllm_i16 __attribute__((vector_size(64)));

static inline cllm_v16 cllm_load16(const float *p) {
    cllm_v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cllm_store16(float *p, cllm_v16 v) {
    memcpy(p, &v, sizeof v);
}

/* where `take`, a, else b (take: -1 or 0 per lane, as a vector comparison gives) */
static inline cllm_v16 cllm_select16(cllm_i16 take, cllm_v16 a, cllm_v16 b) {
    return (cllm_v16)(((cllm_i16)a & take) | ((cllm_i16)b & ~take));
}

/* cllm_expf of 16 lanes: the same float operations in the same order, lane by lane, so each
 * lane has cllm_expf's bits; written as whole vectors, where the compiler turns the scalar
 * function's branches into masked work */
static inline cllm_v16 cllm_expf16(cllm_v16 x) {
    const cllm_v16 round_magic = (cllm_v16){0} + 12582912.0f;
    cllm_v16 k, r, p, scale;
    cllm_i16 bits;
    x = cllm_select16(x < -87.0f, (cllm_v16){0} - 87.0f, x);
    x = cllm_select16(x > 88.0f, (cllm_v16){0} + 88.0f, x);
    k = (x * 1.44269504088896341f + round_magic) - round_magic;
    k = cllm_select16(k != k, (cllm_v16){0}, k);
    r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    p = CLLM_EXP_TAYLOR(r);
    bits = (__builtin_convertvector(k, cllm_i16) + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline cllm_v16 cllm_tanhf16(cllm_v16 x) {
    return 1.0f - 2.0f / (cllm_expf16(2.0f * x) + 1.0f);
}

static inline float cllm_row_max(const float *x, int n) {
    int i = 0, j;
    float m = x[0];
    if (n >= 16) {
        cllm_v16 lane = cllm_load16(x);
        for (i = 16; i + 16 <= n; i += 16) {
            cllm_v16 v = cllm_load16(x + i);
            cllm_i16 take = v > lane;                  /* -1 where v is larger */
            lane = (cllm_v16)(((cllm_i16)v & take) | ((cllm_i16)lane & ~take));
        }
        for (j = 0; j < 16; j++) m = lane[j] > m ? lane[j] : m;
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* x[i] = e^(x[i] - shift) in place; returns the sum of the results */
static inline double cllm_row_exp_sum(float *x, int n, float shift) {
    cllm_v16 lane = {0};
    double s = 0.0;
    int i, j;
    for (i = 0; i + 16 <= n; i += 16) cllm_store16(x + i, cllm_expf16(cllm_load16(x + i) - shift));
    for (; i < n; i++) x[i] = cllm_expf(x[i] - shift);
    for (i = 0; i + 16 <= n; i += 16) lane += cllm_load16(x + i);
    for (j = 0; j < 16; j++) s += lane[j];
    for (; i < n; i++) s += x[i];
    return s;
}

/* x[i] = e^(x[i] - shift) * scale in place */
static inline void cllm_row_exp_scale(float *x, int n, float shift, float scale) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        cllm_store16(x + i, cllm_expf16(cllm_load16(x + i) - shift) * scale);
    for (; i < n; i++) x[i] = cllm_expf(x[i] - shift) * scale;
}

/* NaN when some x[i] is NaN or infinite (x * 0 is NaN exactly then), else 0 */
static inline float cllm_nonfinite_probe(const float *x, size_t n) {
    cllm_v16 lane = {0};
    float probe = 0.0f;
    size_t i = 0;
    int j;
    for (; i + 16 <= n; i += 16) lane += cllm_load16(x + i) * 0.0f;
    for (j = 0; j < 16; j++) probe += lane[j];
    for (; i < n; i++) probe += x[i] * 0.0f;
    return probe;
}

/* g[i] /= c in place; returns the sum of the squares of the results, in double lanes */
typedef double cllm_d8 __attribute__((vector_size(64)));

static inline double cllm_divide_sumsq(float *g, size_t n, float c) {
    cllm_d8 lane = {0};
    double s = 0.0;
    size_t i = 0;
    int j;
    for (; i + 8 <= n; i += 8) {
        cllm_d8 v;
        for (j = 0; j < 8; j++) {
            g[i + j] = g[i + j] / c;
            v[j] = (double)g[i + j];
        }
        lane += v * v;
    }
    for (j = 0; j < 8; j++) s += lane[j];
    for (; i < n; i++) {
        g[i] = g[i] / c;
        s += (double)g[i] * g[i];
    }
    return s;
}

/* sum of x[i] and of (x[i] - shift)^2 over a row: layer norm's mean and variance */
static inline float cllm_row_sum(const float *x, int n) {
    cllm_v16 lane = {0};
    float s = 0.0f;
    int i = 0, j;
    for (; i + 16 <= n; i += 16) lane += cllm_load16(x + i);
    for (j = 0; j < 16; j++) s += lane[j];
    for (; i < n; i++) s += x[i];
    return s;
}

static inline float cllm_row_sq_dev(const float *x, int n, float shift) {
    cllm_v16 lane = {0};
    float s = 0.0f;
    int i = 0, j;
    for (; i + 16 <= n; i += 16) {
        cllm_v16 d = cllm_load16(x + i) - shift;
        lane += d * d;
    }
    for (j = 0; j < 16; j++) s += lane[j];
    for (; i < n; i++) s += (x[i] - shift) * (x[i] - shift);
    return s;
}

/* layer norm backward: sum of w*d and of w*d*(x - mean)*rstd over a row */
static inline void cllm_ln_backward_sums(const float *x, const float *d, const float *w, int n,
                                         float mean, float rstd, float *sum_wd,
                                         float *sum_wd_norm) {
    cllm_v16 a = {0}, b = {0};
    float sa = 0.0f, sb = 0.0f;
    int i = 0, j;
    for (; i + 16 <= n; i += 16) {
        cllm_v16 wd = cllm_load16(w + i) * cllm_load16(d + i);
        cllm_v16 norm = (cllm_load16(x + i) - mean) * rstd;
        a += wd;
        b += wd * norm;
    }
    for (j = 0; j < 16; j++) {
        sa += a[j];
        sb += b[j];
    }
    for (; i < n; i++) {
        float wd = w[i] * d[i];
        sa += wd;
        sb += wd * ((x[i] - mean) * rstd);
    }
    *sum_wd = sa;
    *sum_wd_norm = sb;
}

/* dots[j] = a[j] . d[j] for rows j = 0 .. rows-1 of two [rows, ld n] blocks, row j over its
 * first len0 + j elements (a causal block's rows): each product rounded, then added in order
 * from +0, the serial sum of one row. With AVX-512, 16 rows run side by side, one per lane
 * (their elements gathered), so the sums' latency overlaps; each lane does its row's serial
 * sum, the bits are the same. */
static inline void cllm_row_dots(float *dots, const float *a, const float *d, int rows, int n,
                                 int len0)
{
    int j = 0, t;
#if defined(__AVX512F__)
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; j + 16 <= rows; j += 16) {
        const float *aj = a + (size_t)j * n, *dj = d + (size_t)j * n;
        __m512i at = _mm512_mullo_epi32(lane, _mm512_set1_epi32(n));
        __m512 dot = _mm512_setzero_ps();
        int common = len0 + j;          /* every lane's row is at least this long */
        for (t = 0; t < common; t++) {
            __m512 p = _mm512_mul_ps(_mm512_i32gather_ps(at, aj + t, 4),
                                     _mm512_i32gather_ps(at, dj + t, 4));
            dot = _mm512_add_ps(dot, p);
        }
        for (; t < common + 15; t++) {  /* lane i runs to common + i */
            __mmask16 live = _mm512_cmpgt_epi32_mask(lane, _mm512_set1_epi32(t - common));
            __m512 none = _mm512_setzero_ps();
            __m512 p = _mm512_mul_ps(_mm512_mask_i32gather_ps(none, live, at, aj + t, 4),
                                     _mm512_mask_i32gather_ps(none, live, at, dj + t, 4));
            dot = _mm512_mask_add_ps(dot, live, dot, p);
        }
        _mm512_storeu_ps(dots + j, dot);
    }
#endif
    for (; j < rows; j++) {
        const float *aj = a + (size_t)j * n, *dj = d + (size_t)j * n;
        float dot = 0.0f;
        for (t = 0; t < len0 + j; t++)
            dot = dot + aj[t] * dj[t];
        dots[j] = dot;
    }
}
#endif
