/* Fused element-wise steps of a bf16 decoder layer on the CPU. Each replaces several torch ops
 * (and their intermediate tensors and thread-pool round trips) with one pass over the rows, and
 * computes in float32 with one rounding to bf16 at the end.
 *
 * Each step is written per row twice: with AVX-512 intrinsics (16 lanes, masked tails, bf16
 * rounding by vcvtneps2bf16) where the CPU has AVX512-BF16, and as portable loops elsewhere.
 * Rows are split over OpenMP threads only when there is enough work to pay for the fork. */
#include <omp.h>

#include <float.h>

#include "common.h"

#define PARALLEL_ELEMENTS 32768

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)

static inline __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __m256bh round_bf16(__m512 v) { return _mm512_cvtneps_pbh(v); }

static inline void store_bf16(uint16_t *p, __mmask16 m, __m256bh v) { _mm256_mask_storeu_epi16(p, m, (__m256i)v); }


static void rms_row(uint16_t *x, const uint16_t *d, const uint16_t *weight, float eps, int dim, uint16_t *out) {
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < dim; i += 16) {
        const __mmask16 m = lanes(dim - i);
        __m512 v = load_bf16(x + i, m);
        if (d) {
            const __m256bh sum = round_bf16(_mm512_add_ps(v, load_bf16(d + i, m)));
            store_bf16(x + i, m, sum);
            v = _mm512_cvtpbh_ps(sum);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 scale = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
    for (int i = 0; i < dim; i += 16) {
        const __mmask16 m = lanes(dim - i);
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load_bf16(x + i, m), scale), load_bf16(weight + i, m));
        store_bf16(out + i, m, round_bf16(v));
    }
}

static void silu_mul_row(const uint16_t *gate, const uint16_t *up, uint16_t *out, int width) {
    for (int i = 0; i < width; i += 16) {
        const __mmask16 m = lanes(width - i);
        store_bf16(out + i, m, round_bf16(silu_mul16(load_bf16(gate + i, m), load_bf16(up + i, m))));
    }
}

static void rope_row(uint16_t *row, int heads, int head_dim, const float *c, const float *s) {
    const int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        uint16_t *x = row + (int64_t)h * head_dim;
        for (int i = 0; i < half; i += 16) {
            const __mmask16 m = lanes(half - i);
            const __m512 a = load_bf16(x + i, m), b = load_bf16(x + i + half, m);
            const __m512 c1 = _mm512_maskz_loadu_ps(m, c + i), s1 = _mm512_maskz_loadu_ps(m, s + i);
            const __m512 c2 = _mm512_maskz_loadu_ps(m, c + i + half), s2 = _mm512_maskz_loadu_ps(m, s + i + half);
            store_bf16(x + i, m, round_bf16(_mm512_fmsub_ps(a, c1, _mm512_mul_ps(b, s1))));
            store_bf16(x + i + half, m, round_bf16(_mm512_fmadd_ps(b, c2, _mm512_mul_ps(a, s2))));
        }
    }
}

#else /* portable loops */

static void rms_row(uint16_t *x, const uint16_t *d, const uint16_t *weight, float eps, int dim, uint16_t *out) {
    float total = 0.f;
    for (int i = 0; i < dim; i++) {
        if (d) x[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(d[i]));
        const float v = bf16_to_float(x[i]);
        total += v * v;
    }
    const float scale = 1.f / sqrtf(total / (float)dim + eps);
    for (int i = 0; i < dim; i++) out[i] = float_to_bf16(bf16_to_float(x[i]) * scale * bf16_to_float(weight[i]));
}

static void silu_mul_row(const uint16_t *gate, const uint16_t *up, uint16_t *out, int width) {
    for (int i = 0; i < width; i++) {
        const float x = bf16_to_float(gate[i]);
        const float e = exp_nonpositive(x > 0.f ? -x : x); /* exp(-|x|) */
        const float sigmoid = (x > 0.f ? 1.f : e) / (1.f + e);
        out[i] = float_to_bf16(x * sigmoid * bf16_to_float(up[i]));
    }
}

static void rope_row(uint16_t *row, int heads, int head_dim, const float *c, const float *s) {
    const int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        uint16_t *x = row + (int64_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float a = bf16_to_float(x[i]), b = bf16_to_float(x[i + half]);
            x[i] = float_to_bf16(a * c[i] - b * s[i]);
            x[i + half] = float_to_bf16(b * c[i + half] + a * s[i + half]);
        }
    }
}
#endif

/* residual += delta (rounded to bf16, as the unfused residual add) when delta is given; then
 * out = residual * rsqrt(mean(residual^2) + eps) * weight. All (rows, dim), contiguous. */
void add_rms_norm_bf16(uint16_t *residual, const uint16_t *delta, const uint16_t *weight, float eps,
                       int rows, int dim, uint16_t *out) {
#pragma omp parallel for if ((int64_t)rows * dim >= PARALLEL_ELEMENTS) schedule(static)
    for (int r = 0; r < rows; r++)
        rms_row(residual + (int64_t)r * dim, delta ? delta + (int64_t)r * dim : 0, weight, eps, dim,
                out + (int64_t)r * dim);
}

/* out = silu(gate) * up for gate_up rows laid out [gate (width) | up (width)]. */
void silu_mul_bf16(const uint16_t *gate_up, int rows, int width, uint16_t *out) {
#pragma omp parallel for if ((int64_t)rows * width >= PARALLEL_ELEMENTS) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + (int64_t)r * 2 * width;
        silu_mul_row(gate, gate + width, out + (int64_t)r * width, width);
    }
}

/* One head's head_dim (<= 256) bf16 values x quantised to int8, symmetric: scale = max |x| / 127
 * (0, and values 0, for a head whose scale would be below FLT_MIN: its reciprocal, which the
 * attention multiplies by, would overflow), q = round(x / scale) to nearest even, as torch.round;
 * *scale stored, and value pair j (dims 2j, 2j + 1) at out + j * pair_stride. The AVX-512 path
 * divides and rounds each lane as the scalar one does: bitwise equal for finite x (a NaN in x
 * leaves some in-range int8 and scale; that token's own output is NaN anyway). */
static void quantise_int8(const uint16_t *x, int head_dim, int8_t *out, int64_t pair_stride, float *scale) {
    int8_t q[256];
    float s;
#if defined(__AVX512F__) && defined(__AVX512BF16__) /* the builds whose attention reads int8 caches */
    if (head_dim % 16 == 0) {
        __m512 peak = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; d += 16)
            peak = _mm512_max_ps(peak, _mm512_abs_ps(load_bf16(x + d, 0xffff)));
        s = _mm512_reduce_max_ps(peak) / 127.f;
        if (!(s >= FLT_MIN)) s = 0.f;
        const __m512 by = _mm512_set1_ps(s), low = _mm512_set1_ps(-127.f), high = _mm512_set1_ps(127.f);
        for (int d = 0; d < head_dim; d += 16) {
            __m512 r = s > 0.f ? _mm512_roundscale_ps(_mm512_div_ps(load_bf16(x + d, 0xffff), by), _MM_FROUND_TO_NEAREST_INT)
                               : _mm512_setzero_ps();
            r = _mm512_min_ps(_mm512_max_ps(r, low), high); /* vmaxps gives its second operand for a NaN */
            _mm_storeu_si128((__m128i *)(q + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
        }
    } else
#endif
    {
        float peak = 0.f;
        for (int d = 0; d < head_dim; d++) peak = fmaxf(peak, fabsf(bf16_to_float(x[d])));
        s = peak / 127.f;
        if (!(s >= FLT_MIN)) s = 0.f;
        for (int d = 0; d < head_dim; d++) {
            const float r = s > 0.f ? nearbyintf(bf16_to_float(x[d]) / s) : 0.f;
            q[d] = (int8_t)fminf(fmaxf(r, -127.f), 127.f);
        }
    }
    *scale = s;
    if (pair_stride == 2) {
        memcpy(out, q, head_dim);
        return;
    }
    for (int j = 0; j < head_dim / 2; j++) memcpy(out + j * pair_stride, q + 2 * j, 2);
}

/* Rotary embedding of q and k in place in the fused qkv rows (neox layout: each head's halves
 * rotate as pairs (d, d + head_dim/2)), then the rotated k and the v of every token stored in the
 * paged caches at its slot. qkv: (tokens, qkv_stride) with q, k, v heads packed at the start of a
 * row; cos, sin: (tokens, head_dim) float32; caches: (slots, num_kv_heads, head_dim), or with
 * k_block > 0 the key cache packed in blocks of k_block slots (paged_decode.c, packed_keys_take).
 * With kv_scales (and k_block > 0) the caches hold int8: each token's rotated k and its v
 * quantised per kv head, their scales stored in kv_scales (the layout packed_keys_take states). */
void rope_and_cache_bf16(uint16_t *qkv, int tokens, int qkv_stride, int num_heads, int num_kv_heads,
                         int head_dim, const float *cos, const float *sin, const int64_t *slots, int k_block,
                         void *k_cache, void *v_cache, float *kv_scales) {
    const int rotated = num_heads + num_kv_heads, half = head_dim / 2;
    const int64_t kv_row = (int64_t)num_kv_heads * head_dim;
/* split from 8 tokens: the time goes into first touches of the cache lines each token's k and v
 * land in, not into arithmetic (a 32-row decode step: ~0.55 ms on one thread, ~0.4 on two) */
#pragma omp parallel for if (tokens >= 8) schedule(static)
    for (int t = 0; t < tokens; t++) {
        uint16_t *row = qkv + (int64_t)t * qkv_stride;
        rope_row(row, rotated, head_dim, cos + (int64_t)t * head_dim, sin + (int64_t)t * head_dim);
        const uint16_t *k = row + (int64_t)num_heads * head_dim;
        if (kv_scales) {
            const int64_t block = slots[t] / k_block, offset = slots[t] % k_block;
            for (int h = 0; h < num_kv_heads; h++) {
                const int64_t at = block * num_kv_heads + h;
                float *scales = kv_scales + at * 2 * k_block + offset;
                /* keys: pair j at row j of the block's (half, k_block, 2) bytes of this head */
                quantise_int8(k + (int64_t)h * head_dim, head_dim, (int8_t *)k_cache + at * head_dim * k_block + offset * 2,
                              2 * k_block, scales);
                quantise_int8(row + ((int64_t)rotated + h) * head_dim, head_dim,
                              (int8_t *)v_cache + slots[t] * kv_row + (int64_t)h * head_dim, 2, scales + k_block);
            }
        } else if (k_block) { /* the packed key layout of paged_decode.c's packed_keys_take */
            const int64_t block = slots[t] / k_block, offset = slots[t] % k_block;
            uint32_t *dst = (uint32_t *)k_cache + block * num_kv_heads * half * k_block + offset;
            for (int j = 0; j < num_kv_heads * half; j++) memcpy(dst + (int64_t)j * k_block, k + 2 * j, 4);
        } else {
            memcpy((uint16_t *)k_cache + slots[t] * kv_row, k, sizeof(uint16_t) * kv_row);
        }
        if (!kv_scales)
            memcpy((uint16_t *)v_cache + slots[t] * kv_row, row + (int64_t)rotated * head_dim, sizeof(uint16_t) * kv_row);
    }
}

/* out[r] = the index of the largest of row r's first `cols` floats (the first one on ties; a NaN
 * counts as the largest, as in torch.argmax, whose CPU kernel is ~15x slower on (32, 49152)). */
static int64_t argmax_scalar(const float *row, int cols) {
    int found = 0;
    for (int i = 0; i < cols; i++) {
        if (row[i] != row[i]) return i;
        if (row[i] > row[found]) found = i;
    }
    return found;
}

void argmax_rows_f32(const float *x, int64_t stride, int rows, int cols, int64_t *out) {
#pragma omp parallel for if ((int64_t)rows * cols >= 4 * PARALLEL_ELEMENTS) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *row = x + (int64_t)r * stride;
#if defined(__AVX512F__)
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_at = _mm512_setzero_si512();
        __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nan = 0;
        for (int i = 0; i < cols; i += 16) {
            const int left = cols - i;
            const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(m, row + i);
            nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
            /* strictly greater: each lane keeps its first maximum */
            const __mmask16 better = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);
            best = _mm512_mask_blend_ps(better, best, v);
            best_at = _mm512_mask_blend_epi32(better, best_at, at);
            at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
        }
        const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
        /* no lane above -inf (a row of -inf) leaves every lane at index 0's lane: torch gives 0 */
        out[r] = nan ? argmax_scalar(row, cols) : (tops ? _mm512_mask_reduce_min_epi32(tops, best_at) : 0);
#else
        out[r] = argmax_scalar(row, cols);
#endif
    }
}
