/* Dropout masks from a counter-based generator: whether element `index` of one dropout site
 * is kept is a pure function of (seed, step, micro-batch, layer, site, index), so the masks
 * do not depend on which thread, in which order, computes what.
 *
 * The hash is SplitMix64's finaliser (Steele, Lea, Flood 2014): the key folds the five
 * coordinates in one after another, each through the finaliser; an element's draw is the
 * finaliser of key + (index + 1) * golden ratio, its top 32 bits compared with
 * threshold = round(p * 2^32): kept when the draw is >= threshold, i.e. with probability
 * 1 - p (to 2^-32). _engine.dropout_mask exports it to Python (tests/reference.py uses it);
 * tests/test_dropout.py writes the same arithmetic again in Python integers. */
#ifndef CLLM_DROPOUT_H
#define CLLM_DROPOUT_H

#include <stdint.h>

#define CLLM_GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t cllm_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* the key of one site of one micro-batch of one step */
static inline uint64_t cllm_dropout_key(uint64_t seed, int64_t step, int64_t microbatch,
                                        int32_t layer, int32_t site) {
    uint64_t k = cllm_mix64(seed + CLLM_GOLDEN);
    k = cllm_mix64(k ^ (uint64_t)step);
    k = cllm_mix64(k ^ (uint64_t)microbatch);
    k = cllm_mix64(k ^ (uint64_t)(uint32_t)layer);
    return cllm_mix64(k ^ (uint64_t)(uint32_t)site);
}

static inline int cllm_dropout_keep(uint64_t key, uint64_t index, uint32_t threshold) {
    return (uint32_t)(cllm_mix64(key + (index + 1) * CLLM_GOLDEN) >> 32) >= threshold;
}

#endif
