/* Helpers shared by the native CPU kernels. */
#ifndef INFERD_KERNELS_COMMON_H
#define INFERD_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = ((uint32_t)v) << 16;
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

/* Round to nearest even, as torch rounds float32 to bfloat16; NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded); /* a select, no branch */
}

/* exp(x) for x <= 0 (softmax after subtracting the peak, SiLU of either sign): 2^(x log2 e) split
 * into an integer power built in the exponent bits and a degree-6 polynomial of the fraction;
 * relative error about 2e-7. Plain arithmetic, so loops over it vectorise (libm's expf does not
 * without -ffast-math, which would also flush denormals for the whole process). */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504088896341f;
    const float whole = floorf(t);
    const float f = (t - whole) * 0.69314718055994531f;
    float p = 1.f / 720.f;
    p = p * f + 1.f / 120.f;
    p = p * f + 1.f / 24.f;
    p = p * f + 1.f / 6.f;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    const int32_t bits = ((int32_t)whole + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp(y) for y <= 0, as exp_nonpositive above: 2^n by vscalefps, the fraction by polynomial. */
static inline __m512 exp_nonpositive16(__m512 y) {
    y = _mm512_max_ps(y, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, whole), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, whole);
}

/* silu(x) * up on 16 lanes in float32: x * sigmoid(x), the sigmoid from exp(-|x|) and a
 * reciprocal refined by one Newton step (~23 bits). fused.c's silu_mul_bf16 and the gated linear
 * layers (bf16_linear.c) both use it, so their bf16 results are bitwise the same. */
static inline __m512 silu_mul16(__m512 x, __m512 up) {
    const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x))); /* exp(-|x|) */
    const __m512 denom = _mm512_add_ps(one, e);
    __m512 inv = _mm512_rcp14_ps(denom);
    inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(denom, inv, two));
    const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 sigmoid = _mm512_mul_ps(_mm512_mask_blend_ps(positive, e, one), inv);
    return _mm512_mul_ps(_mm512_mul_ps(x, sigmoid), up);
}

/* The 16 x 16 dwords of r transposed in place: r[j] gets dword j of each of r[0..15]. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* b[4g + e]: in each 128-bit lane L, dword 4L + e of rows 4g..4g+3 */
    for (int g = 0; g < 16; g += 4) {
        b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
        b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
        b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
        b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
    }
    for (int e = 0; e < 4; e++) {
        const __m512i x = _mm512_shuffle_i32x4(b[e], b[4 + e], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i y = _mm512_shuffle_i32x4(b[e], b[4 + e], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512i z = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i w = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], _MM_SHUFFLE(3, 1, 3, 1));
        r[e] = _mm512_shuffle_i32x4(x, z, _MM_SHUFFLE(2, 0, 2, 0));
        r[8 + e] = _mm512_shuffle_i32x4(x, z, _MM_SHUFFLE(3, 1, 3, 1));
        r[4 + e] = _mm512_shuffle_i32x4(y, w, _MM_SHUFFLE(2, 0, 2, 0));
        r[12 + e] = _mm512_shuffle_i32x4(y, w, _MM_SHUFFLE(3, 1, 3, 1));
    }
}
#endif

#endif
