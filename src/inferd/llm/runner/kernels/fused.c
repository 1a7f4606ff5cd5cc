/* Fused element-wise steps of a bf16 decoder layer on the CPU. Each replaces several torch ops
 * (and their intermediate tensors and thread-pool round trips) with one pass over the rows, and
 * computes in float32 with one rounding to bf16 at the end.
 *
 * Rows are split over OpenMP threads only when there are enough of them to pay for the fork. */
#include <omp.h>

#include "common.h"

#define PARALLEL_ROWS 16

/* residual += delta (rounded to bf16, as the unfused residual add) when delta is given; then
 * out = residual * rsqrt(mean(residual^2) + eps) * weight. All (rows, dim), contiguous. */
void add_rms_norm_bf16(uint16_t *residual, const uint16_t *delta, const uint16_t *weight, float eps,
                       int rows, int dim, uint16_t *out) {
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int r = 0; r < rows; r++) {
        uint16_t *x = residual + (int64_t)r * dim;
        const uint16_t *d = delta ? delta + (int64_t)r * dim : 0;
        float total = 0.f;
        if (d) {
#pragma omp simd reduction(+ : total)
            for (int i = 0; i < dim; i++) {
                const uint16_t sum = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(d[i]));
                x[i] = sum;
                const float v = bf16_to_float(sum);
                total += v * v;
            }
        } else {
#pragma omp simd reduction(+ : total)
            for (int i = 0; i < dim; i++) {
                const float v = bf16_to_float(x[i]);
                total += v * v;
            }
        }
        const float scale = 1.f / sqrtf(total / (float)dim + eps);
        uint16_t *o = out + (int64_t)r * dim;
#pragma omp simd
        for (int i = 0; i < dim; i++) o[i] = float_to_bf16(bf16_to_float(x[i]) * scale * bf16_to_float(weight[i]));
    }
}

/* In chunks through a float buffer: gcc vectorises exp_nonpositive only in loops of float alone. */
static void silu_mul_row(const uint16_t *restrict gate, const uint16_t *restrict up, uint16_t *restrict out,
                         int width) {
    float x[256], s[256];
    for (int at = 0; at < width; at += 256) {
        const int n = width - at < 256 ? width - at : 256;
#pragma omp simd
        for (int i = 0; i < n; i++) x[i] = bf16_to_float(gate[at + i]);
#pragma omp simd
        for (int i = 0; i < n; i++) {
            const float e = exp_nonpositive(x[i] > 0.f ? -x[i] : x[i]); /* exp(-|x|) */
            s[i] = x[i] * (x[i] > 0.f ? 1.f : e) / (1.f + e);            /* x * sigmoid(x) */
        }
#pragma omp simd
        for (int i = 0; i < n; i++) out[at + i] = float_to_bf16(s[i] * bf16_to_float(up[at + i]));
    }
}

/* out = silu(gate) * up for gate_up rows laid out [gate (width) | up (width)]. */
void silu_mul_bf16(const uint16_t *gate_up, int rows, int width, uint16_t *out) {
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + (int64_t)r * 2 * width;
        silu_mul_row(gate, gate + width, out + (int64_t)r * width, width);
    }
}

/* Rotary embedding of q and k in place in the fused qkv rows (neox layout: each head's halves
 * rotate as pairs (d, d + head_dim/2)), then the rotated k and the v of every token stored in the
 * paged caches at its slot. qkv: (tokens, qkv_stride) with q, k, v heads packed at the start of a
 * row; cos, sin: (tokens, head_dim) float32; caches: (slots, num_kv_heads, head_dim). */
void rope_and_cache_bf16(uint16_t *qkv, int tokens, int qkv_stride, int num_heads, int num_kv_heads,
                         int head_dim, const float *cos, const float *sin, const int64_t *slots,
                         uint16_t *k_cache, uint16_t *v_cache) {
    const int half = head_dim / 2, rotated = num_heads + num_kv_heads;
#pragma omp parallel for if (tokens >= PARALLEL_ROWS) schedule(static)
    for (int t = 0; t < tokens; t++) {
        uint16_t *row = qkv + (int64_t)t * qkv_stride;
        const float *c = cos + (int64_t)t * head_dim, *s = sin + (int64_t)t * head_dim;
        for (int h = 0; h < rotated; h++) {
            uint16_t *x = row + (int64_t)h * head_dim;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float a = bf16_to_float(x[i]), b = bf16_to_float(x[i + half]);
                x[i] = float_to_bf16(a * c[i] - b * s[i]);
                x[i + half] = float_to_bf16(b * c[i + half] + a * s[i + half]);
            }
        }
        const int64_t kv_row = (int64_t)num_kv_heads * head_dim;
        memcpy(k_cache + slots[t] * kv_row, row + (int64_t)num_heads * head_dim, sizeof(uint16_t) * kv_row);
        memcpy(v_cache + slots[t] * kv_row, row + (int64_t)rotated * head_dim, sizeof(uint16_t) * kv_row);
    }
}
