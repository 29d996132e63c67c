/* The activations' element-wise kernels, 16 lanes at a time: GELU (tanh approximation) for
 * GPT-2, SiLU-gated units (SwiGLU) for the Llama form, forward and backward. Every element
 * goes through the same float operations, in the same order, whether it lands in a vector or
 * in the scalar tail (cllm_expf16 has cllm_expf's bits lane by lane), so the results do not
 * depend on n or on where a row starts. */
#ifndef CLLM_ACTIVATIONS_H
#define CLLM_ACTIVATIONS_H
#include <stddef.h>
#include "deterministic_math.h"

/* the constants as float (a bare literal would be a double and drag the sums into double) */
#define CLLM_GELU_SCALE ((float)0.7978845608028654)      /* sqrt(2/pi) */
#define CLLM_GELU_CUBE ((float)0.044715)
#define CLLM_GELU_CUBE3 ((float)(3.0 * 0.044715))

/* the argument of GELU's tanh: sqrt(2/pi) (x + 0.044715 x^3) */
#define CLLM_GELU_INNER(x) (CLLM_GELU_SCALE * ((x) + ((CLLM_GELU_CUBE * (x)) * (x)) * (x)))

static inline float cllm_gelu(float x) {
    return (0.5f * x) * (1.0f + cllm_tanhf(CLLM_GELU_INNER(x)));
}

/* d gelu(x) / dx, from th = tanh(inner(x)) */
#define CLLM_GELU_SLOPE(x, th) \
    (0.5f * (1.0f + (th)) \
     + (((0.5f * (x)) * (1.0f - (th) * (th))) * CLLM_GELU_SCALE) \
       * (1.0f + (CLLM_GELU_CUBE3 * (x)) * (x)))

/* out[n] = gelu(inp); out may be inp */
static inline void cllm_gelu_forward(float *out, const float *inp, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        cllm_v16 x = cllm_load16(inp + i);
        cllm_store16(out + i, (0.5f * x) * (1.0f + cllm_tanhf16(CLLM_GELU_INNER(x))));
    }
    for (; i < n; i++) out[i] = cllm_gelu(inp[i]);
}

/* dinp[n] += dout * gelu'(inp); dinp must not alias dout */
static inline void cllm_gelu_backward(float *dinp, const float *inp, const float *dout,
                                      size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        cllm_v16 x = cllm_load16(inp + i);
        cllm_v16 th = cllm_tanhf16(CLLM_GELU_INNER(x));
        cllm_store16(dinp + i, cllm_load16(dinp + i) + cllm_load16(dout + i) * CLLM_GELU_SLOPE(x, th));
    }
    for (; i < n; i++) {
        float x = inp[i], th = cllm_tanhf(CLLM_GELU_INNER(x));
        dinp[i] += dout[i] * CLLM_GELU_SLOPE(x, th);
    }
}

static inline float cllm_sigmoid(float x) {
    return 1.0f / (1.0f + cllm_expf(-x));
}

static inline cllm_v16 cllm_sigmoid16(cllm_v16 x) {
    return 1.0f / (1.0f + cllm_expf16(-x));
}

/* out[f] = silu(gate) * up = gate * sigmoid(gate) * up, for one row of f units */
static inline void cllm_swiglu_row(float *out, const float *gate, const float *up, int f) {
    int i = 0;
    for (; i + 16 <= f; i += 16) {
        cllm_v16 g = cllm_load16(gate + i);
        cllm_store16(out + i, (g * cllm_sigmoid16(g)) * cllm_load16(up + i));
    }
    for (; i < f; i++) out[i] = (gate[i] * cllm_sigmoid(gate[i])) * up[i];
}

/* the gradient through cllm_swiglu_row: dgate += dout * up * s * (1 + gate (1 - s)),
 * dup += dout * gate * s, s = sigmoid(gate) */
static inline void cllm_swiglu_row_backward(float *dgate, float *dup, const float *gate,
                                            const float *up, const float *dout, int f) {
    int i = 0;
    for (; i + 16 <= f; i += 16) {
        cllm_v16 g = cllm_load16(gate + i), d = cllm_load16(dout + i);
        cllm_v16 s = cllm_sigmoid16(g);
        cllm_store16(dgate + i, cllm_load16(dgate + i)
                     + ((d * cllm_load16(up + i)) * s) * (1.0f + g * (1.0f - s)));
        cllm_store16(dup + i, cllm_load16(dup + i) + (d * g) * s);
    }
    for (; i < f; i++) {
        float g = gate[i], d = dout[i], s = cllm_sigmoid(g);
        dgate[i] += ((d * up[i]) * s) * (1.0f + g * (1.0f - s));
        dup[i] += (d * g) * s;
    }
}
#endif
