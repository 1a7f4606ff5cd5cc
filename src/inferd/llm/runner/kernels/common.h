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
#endif

#endif
