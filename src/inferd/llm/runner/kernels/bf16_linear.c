/* bf16 linear layers for CPUs with AVX512-BF16: y = x W^T (+ bias), and the dispatch between this
 * kernel and the AMX one.
 *
 * The weight is packed as for amx_linear.c ([N/32][K/32][2][16][16][2]): each 64-byte line there
 * holds one pair of K for 16 output columns, which is exactly the operand VDPBF16PS multiplies
 * with a broadcast pair of x. A thread owns whole 32-column pairs (a gated layer: 16 gate columns with
 * their 16 up columns, see linear_gated) and streams each one once per block of ROW_BLOCK rows: every line loaded feeds up to 12 rows (24 accumulators), and the next
 * rows re-read the pair from L1/L2 (K x 32 columns, 36-96 KB on this project's models). A block of
 * rows stays in L2 while the thread's pairs pass (prefills: re-reading all rows of x from L3 for
 * every pair cost 5-13 % on 1,900 rows). Where oneDNN's packed
 * bf16 matmul reads a one-row decode's weights at ~37 GB/s on this project's 2-core machine
 * (memory reads run at ~47), this kernel is written to stay at the read bandwidth. */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include "common.h"

void amx_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                     const float *bias, void *out, int64_t out_stride, int out_fp32);

static int use_amx = 0; /* linear_bf16 runs amx_linear_bf16 (see linear_bf16_select) */

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>

#define MAX_ROWS 12
#ifndef ROW_BLOCK
#define ROW_BLOCK 192 /* rows of x a thread takes through all its column pairs before the next rows */
#endif
#ifndef PREFETCH_STEPS
#define PREFETCH_STEPS 4
#endif

static inline void store_row(__m512 acc, int n0, int n_valid, const float *scale, const float *bias, void *out,
                             int out_fp32) {
    if (n_valid <= 0) return;
    const __mmask16 mask = n_valid >= 16 ? 0xffff : (__mmask16)((1u << n_valid) - 1);
    if (scale) acc = _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(mask, scale + n0));
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias + n0));
    if (out_fp32)
        _mm512_mask_storeu_ps((float *)out + n0, mask, acc);
    else
        _mm256_mask_storeu_epi16((uint16_t *)out + n0, mask, (__m256i)_mm512_cvtneps_pbh(acc));
}

/* One row's two 16-column accumulators: stored at columns n0 and n0 + 16 of n; or, with gated > 0
 * (a gated MLP's gate_up, see linear_gated), acc0 holds gate columns n0.. and acc1 the up
 * columns gated + n0.., each rounded to bf16 as the plain layer would store it, and silu(gate) * up
 * is stored at n0 (bias unused). */
static inline void store_pair(__m512 acc0, __m512 acc1, int n0, int n, const float *scale, const float *bias,
                              void *out, int out_fp32, int gated) {
    if (!gated) {
        store_row(acc0, n0, n - n0, scale, bias, out, out_fp32);
        store_row(acc1, n0 + 16, n - n0 - 16, scale, bias, out, out_fp32);
        return;
    }
    if (scale) {
        acc0 = _mm512_mul_ps(acc0, _mm512_loadu_ps(scale + n0));
        acc1 = _mm512_mul_ps(acc1, _mm512_loadu_ps(scale + gated + n0));
    }
    const __m512 gate = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(acc0)), up = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(acc1));
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + n0), (__m256i)_mm512_cvtneps_pbh(silu_mul16(gate, up)));
}

/* rows (1..MAX_ROWS) rows of x against one 32-column pair; inlined per constant row count so the
 * accumulators live in registers. A step of 32 K is 2 KB: two halves of 16 lines, one per
 * 16-column block. */
static inline __attribute__((always_inline)) void pair_rows(const int rows, const uint16_t *x, int64_t x_stride,
                                                            int k, const char *w_lo, const char *w_hi, int n0, int n,
                                                            const float *bias, char *out, int64_t out_row_bytes,
                                                            int out_fp32, int gated) {
    const int line = 64, half = 16 * line, step = 2 * half;
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int s = 0; s < k / 32; s++) {
        const char *ws0 = w_lo + (int64_t)s * step, *ws1 = w_hi + (int64_t)s * step;
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++) {
            /* PREFETCH_STEPS steps of 32 K ahead: the lines this pair reads there */
            _mm_prefetch(ws0 + PREFETCH_STEPS * step + p * line, _MM_HINT_T0);
            _mm_prefetch(ws1 + PREFETCH_STEPS * step + p * line, _MM_HINT_T0);
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(ws0 + p * line);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(ws1 + p * line);
            const int kk = s * 32 + 2 * p;
#pragma GCC unroll 12
            for (int r = 0; r < rows; r++) {
                int32_t pair;
                __builtin_memcpy(&pair, x + r * x_stride + kk, sizeof(pair));
                const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
                acc0[r] = _mm512_dpbf16_ps(acc0[r], b, w0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], b, w1);
            }
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) store_pair(acc0[r], acc1[r], n0, n, 0, bias, out + r * out_row_bytes, out_fp32, gated);
}

#define CASE(R)                                                                                          \
    case R:                                                                                              \
        pair_rows(R, x, x_stride, k, w_lo, w_hi, n0, n, bias, out, out_row_bytes, out_fp32, gated);      \
        break;

static void pair_block(int rows, const uint16_t *x, int64_t x_stride, int k, const char *w_lo, const char *w_hi,
                       int n0, int n, const float *bias, char *out, int64_t out_row_bytes, int out_fp32, int gated) {
    switch (rows) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
    }
}

/* Where unit u of a layer's output reads its weights, in a packed weight of pairs pair_bytes long
 * whose 16-column halves are half_bytes apart within each step: unit u is pair u (n0 = 32 u), or,
 * with gated > 0, gate columns 16 u.. with up columns gated + 16 u.. (n0 = 16 u). */
static inline int unit_weights(const char *packed, int64_t pair_bytes, int half_bytes, int u, int gated,
                               const char **w_lo, const char **w_hi) {
    if (!gated) {
        *w_lo = packed + u * pair_bytes, *w_hi = *w_lo + half_bytes;
        return 32 * u;
    }
    const int up = gated / 16 + u;
    *w_lo = packed + (u / 2) * pair_bytes + (u % 2) * half_bytes;
    *w_hi = packed + (up / 2) * pair_bytes + (up % 2) * half_bytes;
    return 16 * u;
}

static void avx512_bf16_units(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                              const float *bias, void *out, int64_t out_stride, int out_fp32, int gated) {
    const int units = gated ? gated / 16 : (n + 31) / 32;
    const int64_t pair_bytes = (int64_t)(k / 32) * 2048;
    const int64_t out_row_bytes = out_stride * (out_fp32 ? 4 : 2);
#pragma omp parallel
    {
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        const int u0 = (int)((int64_t)units * me / threads), u1 = (int)((int64_t)units * (me + 1) / threads);
        for (int mb = 0; mb < m; mb += ROW_BLOCK) {
            const int mend = m - mb < ROW_BLOCK ? m : mb + ROW_BLOCK;
            for (int u = u0; u < u1; u++) {
                const char *w_lo, *w_hi;
                const int n0 = unit_weights((const char *)packed, pair_bytes, 1024, u, gated, &w_lo, &w_hi);
                for (int m0 = mb; m0 < mend; m0 += MAX_ROWS) {
                    const int rows = mend - m0 < MAX_ROWS ? mend - m0 : MAX_ROWS;
                    pair_block(rows, x + m0 * x_stride, x_stride, k, w_lo, w_hi, n0, gated ? gated : n, bias,
                               (char *)out + m0 * out_row_bytes, out_row_bytes, out_fp32, gated);
                }
            }
        }
    }
}

/* x: (m, k) bf16, rows x_stride elements apart; out: (m, n) bf16 (or fp32 with out_fp32), rows
 * out_stride elements apart; k a multiple of 32. */
void avx512_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                        const float *bias, void *out, int64_t out_stride, int out_fp32) {
    avx512_bf16_units(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32, 0);
}

/* int8 linear layers (--quantization int8) on AVX512-VNNI: int8 weights (per output column scale)
 * times int8 activations, each row of x quantised per group of 32 inputs (symmetric, its own
 * scale), products summed exactly in int32 within a group (VPDPBUSD) and the groups in float32 in
 * order. A row's result depends on that row alone, whatever the batch (batch invariance, as the
 * bf16 kernels). VPDPBUSD multiplies unsigned by signed bytes: the weights are stored plus 128
 * (unsigned), which adds 128 x (the group's sum of quantised x) to every column's sum: the same
 * for every column, taken off each group's int32 sums before they are scaled. The functions carry
 * the avx512vnni target themselves (the build targets AVX512-BF16; linear_int8_available asks the
 * CPU for VNNI). */
#define VNNI __attribute__((target("avx512vnni")))
#define I8_ROWS 6
#define I8_GROUP 32 /* quantise_row reads a group as two 16-value halves */

/* Row r of x: each group's int8 values (q), scale (scales; NaN where the group holds a NaN or an
 * infinity, so the row's outputs are NaN as torch's would be) and 128 x sum(q) (offsets). */
static VNNI void quantise_row(const uint16_t *x, int k, int8_t *q, float *scales, int32_t *offsets) {
    for (int g = 0; g < k / I8_GROUP; g++) {
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + g * I8_GROUP))), 16));
        const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + g * I8_GROUP + 16))), 16));
        const float peak = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const int finite = !(_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) &&
                           peak <= 3.4e38f;
        /* a group of zeros (or of values so small that 127 / peak overflows) quantises to zeros */
        const float inv = finite && peak > 1e-30f ? 127.f / peak : 0.f, scale = finite ? peak / 127.f : NAN;
        const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
        const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(q + g * I8_GROUP), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(q + g * I8_GROUP + 16), _mm512_cvtsepi32_epi8(qhi));
        scales[g] = scale;
        offsets[g] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

/* rows (1..I8_ROWS) quantised rows against one 32-column pair of packed int8 weights
 * ([K/4][2][16][4] bytes: for each 4 inputs, the two 16-column blocks' 64-byte lines), read from
 * w_lo and w_hi: a pair's two halves, or (gated) a gate half and an up half of different pairs. */
static inline VNNI __attribute__((always_inline)) void i8_pair_rows(const int rows, const int8_t *q,
                                                                    const float *scales, const int32_t *offsets,
                                                                    int k, const char *w_lo, const char *w_hi,
                                                                    int n0, int n, const float *wscale,
                                                                    const float *bias, char *out,
                                                                    int64_t out_row_bytes, int out_fp32, int gated) {
    const int groups = k / I8_GROUP, quads = I8_GROUP / 4;
    __m512 f0[I8_ROWS], f1[I8_ROWS];
#pragma GCC unroll 6
    for (int r = 0; r < rows; r++) f0[r] = f1[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const char *wg0 = w_lo + (int64_t)g * quads * 128, *wg1 = w_hi + (int64_t)g * quads * 128;
        __m512i i0[I8_ROWS], i1[I8_ROWS];
#pragma GCC unroll 6
        for (int r = 0; r < rows; r++) i0[r] = i1[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int u = 0; u < quads; u++) {
            _mm_prefetch(wg0 + PREFETCH_STEPS * 1024 + u * 128, _MM_HINT_T0);
            _mm_prefetch(wg1 + PREFETCH_STEPS * 1024 + u * 128, _MM_HINT_T0);
            const __m512i w0 = _mm512_loadu_si512(wg0 + u * 128), w1 = _mm512_loadu_si512(wg1 + u * 128);
#pragma GCC unroll 6
            for (int r = 0; r < rows; r++) {
                int32_t quad;
                __builtin_memcpy(&quad, q + (int64_t)r * k + g * I8_GROUP + 4 * u, sizeof(quad));
                const __m512i b = _mm512_set1_epi32(quad);
                i0[r] = _mm512_dpbusd_epi32(i0[r], w0, b);
                i1[r] = _mm512_dpbusd_epi32(i1[r], w1, b);
            }
        }
#pragma GCC unroll 6
        for (int r = 0; r < rows; r++) {
            const int64_t at = (int64_t)r * groups + g;
            const __m512 s = _mm512_set1_ps(scales[at]);
            const __m512i offset = _mm512_set1_epi32(offsets[at]);
            f0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i0[r], offset)), s, f0[r]);
            f1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i1[r], offset)), s, f1[r]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < rows; r++) store_pair(f0[r], f1[r], n0, n, wscale, bias, out + r * out_row_bytes, out_fp32, gated);
}

#define I8_CASE(R)                                                                                       \
    case R:                                                                                              \
        i8_pair_rows(R, q, scales, offsets, k, w_lo, w_hi, n0, n, wscale, bias, out, out_row_bytes, out_fp32, \
                     gated);                                                                             \
        break;

static VNNI void i8_pair_block(int rows, const int8_t *q, const float *scales, const int32_t *offsets, int k,
                               const char *w_lo, const char *w_hi, int n0, int n, const float *wscale,
                               const float *bias, char *out, int64_t out_row_bytes, int out_fp32, int gated) {
    switch (rows) { I8_CASE(1) I8_CASE(2) I8_CASE(3) I8_CASE(4) I8_CASE(5) I8_CASE(6) }
}

/* The int8 layer's units (see unit_weights; a unit's halves are 64 bytes apart in each 128-byte
 * quad), each thread its own range of them, after the rows of x are quantised. */
static VNNI int int8_units(const uint16_t *x, int64_t x_stride, int m, int k, const int8_t *packed, const float *scale,
                          int n, const float *bias, void *out, int64_t out_stride, int out_fp32, int gated) {
    const int groups = k / I8_GROUP, units = gated ? gated / 16 : (n + 31) / 32;
    int8_t *q = malloc((size_t)m * k + (sizeof(float) + sizeof(int32_t)) * (size_t)m * groups);
    if (!q) return -1;
    float *scales = (float *)(q + (size_t)m * k);
    int32_t *offsets = (int32_t *)(scales + (size_t)m * groups);
    const int64_t pair_bytes = (int64_t)k * 32, out_row_bytes = out_stride * (out_fp32 ? 4 : 2);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int r = 0; r < m; r++)
            quantise_row(x + r * x_stride, k, q + (int64_t)r * k, scales + (int64_t)r * groups, offsets + (int64_t)r * groups);
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        const int u0 = (int)((int64_t)units * me / threads), u1 = (int)((int64_t)units * (me + 1) / threads);
        for (int mb = 0; mb < m; mb += ROW_BLOCK) {
            const int mend = m - mb < ROW_BLOCK ? m : mb + ROW_BLOCK;
            for (int u = u0; u < u1; u++) {
                const char *w_lo, *w_hi;
                const int n0 = unit_weights((const char *)packed, pair_bytes, 64, u, gated, &w_lo, &w_hi);
                for (int m0 = mb; m0 < mend; m0 += I8_ROWS) {
                    const int rows = mend - m0 < I8_ROWS ? mend - m0 : I8_ROWS;
                    i8_pair_block(rows, q + (int64_t)m0 * k, scales + (int64_t)m0 * groups,
                                  offsets + (int64_t)m0 * groups, k, w_lo, w_hi, n0, gated ? gated : n, scale, bias,
                                  (char *)out + m0 * out_row_bytes, out_row_bytes, out_fp32, gated);
                }
            }
        }
    }
    free(q);
    return 0;
}

/* x: (m, k) bf16, rows x_stride elements apart, k a multiple of 32; packed: pack_int8_weight's
 * weights with per-column scales; out as avx512_linear_bf16's. Returns 0, -1 when scratch memory
 * ran out (-2 from a build without it). */
VNNI int linear_int8(const uint16_t *x, int64_t x_stride, int m, int k, const int8_t *packed, const float *scale,
                     int n, const float *bias, void *out, int64_t out_stride, int out_fp32) {
    return int8_units(x, x_stride, m, k, packed, scale, n, bias, out, out_stride, out_fp32, 0);
}

/* A gated MLP's activation in one pass: out = silu(gate) * up, (m, width) bf16 rows out_stride
 * apart, where the packed weight is the layer's fused gate_up (2 x width outputs: the gate's
 * columns, then the up's; no bias) and width a multiple of 16. Each thread takes 16 gate columns
 * with the matching 16 up columns, so the activation is computed from registers instead of from
 * a (m, 2 x width) output written and read back; bitwise what the layer followed by silu_mul_bf16
 * gives. Returns 0, -1 when scratch memory ran out, -3 when this build (or the kernel linear_bf16
 * runs: AMX) has no gated form: the caller runs the two steps. int8 weights where scale is given. */
int linear_gated(const uint16_t *x, int64_t x_stride, int m, int k, const void *packed, const float *scale,
                 int width, void *out, int64_t out_stride) {
    if (width % 16) return -3;
    if (scale) return int8_units(x, x_stride, m, k, packed, scale, 2 * width, 0, out, out_stride, 0, width);
    if (use_amx) return -3;
    avx512_bf16_units(x, x_stride, m, k, packed, 2 * width, 0, out, out_stride, 0, width);
    return 0;
}
#define HAVE_AVX512_LINEAR 1
#else
#define HAVE_AVX512_LINEAR 0
void avx512_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                        const float *bias, void *out, int64_t out_stride, int out_fp32) {}
int linear_int8(const uint16_t *x, int64_t x_stride, int m, int k, const int8_t *packed, const float *scale,
                int n, const float *bias, void *out, int64_t out_stride, int out_fp32) {
    return -2;
}
int linear_gated(const uint16_t *x, int64_t x_stride, int m, int k, const void *packed, const float *scale,
                 int width, void *out, int64_t out_stride) {
    return -3;
}
#endif


/* Which kernel linear_bf16 runs: 1 AMX (once the OS granted it), 0 AVX512-BF16. Returns 1 when the
 * chosen kernel was built into this library (0: the caller must not call linear_bf16). */
int linear_bf16_select(int amx) {
    use_amx = amx;
    return amx || HAVE_AVX512_LINEAR;
}

/* 1 when linear_int8 was built into this library (the AVX512-BF16 builds) and this CPU has the
 * AVX512-VNNI it runs on. */
int linear_int8_available(void) {
#if HAVE_AVX512_LINEAR
    return __builtin_cpu_supports("avx512vnni") != 0;
#else
    return 0;
#endif
}

void linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                 const float *bias, void *out, int64_t out_stride, int out_fp32) {
    if (use_amx)
        amx_linear_bf16(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32);
    else
        avx512_linear_bf16(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32);
}
