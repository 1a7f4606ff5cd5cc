/* bf16 linear layers for CPUs with AVX512-BF16: y = x W^T (+ bias), and the dispatch between this
 * kernel and the AMX one.
 *
 * The weight is packed as for amx_linear.c ([N/32][K/32][2][16][16][2]): each 64-byte line there
 * holds one pair of K for 16 output columns, which is exactly the operand VDPBF16PS multiplies
 * with a broadcast pair of x. A thread owns whole 32-column pairs and streams each one once per
 * call: every line loaded feeds up to 12 rows (24 accumulators), and the next rows re-read the
 * pair from L1/L2 (K x 32 columns, 36-96 KB on this project's models). Where oneDNN's packed
 * bf16 matmul reads a one-row decode's weights at ~37 GB/s on this project's 2-core machine
 * (memory reads run at ~47), this kernel is written to stay at the read bandwidth. */
#include <stdint.h>

void amx_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                     const float *bias, void *out, int64_t out_stride, int out_fp32);

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>

#define MAX_ROWS 12
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

/* One 16-column line of K pairs as 32 bf16: read as it is, or 32 int8 widened exactly (every int8
 * is a bf16) for the int8 weights. */
static inline __attribute__((always_inline)) __m512bh load_line(const char *line, const int int8) {
    if (!int8) return (__m512bh)_mm512_loadu_si512(line);
    const __m128i lo = _mm_loadu_si128((const __m128i *)line), hi = _mm_loadu_si128((const __m128i *)(line + 16));
    return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                               _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)));
}

/* rows (1..MAX_ROWS) rows of x against one 32-column pair; inlined per constant row count and
 * weight type so the accumulators live in registers. A step of 32 K is 2 KB of bf16 (1 KB of
 * int8): two halves of 16 lines, one per 16-column block. */
static inline __attribute__((always_inline)) void pair_rows(const int rows, const int int8, const uint16_t *x,
                                                            int64_t x_stride, int k, const char *w, int n0, int n,
                                                            const float *scale, const float *bias, char *out,
                                                            int64_t out_row_bytes, int out_fp32) {
    const int line = int8 ? 32 : 64, half = 16 * line, step = 2 * half;
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int s = 0; s < k / 32; s++) {
        const char *ws = w + (int64_t)s * step;
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++) {
            /* PREFETCH_STEPS steps of 32 K ahead: the lines this pair reads there */
            if (!int8 || (p & 1) == 0) {
                _mm_prefetch(ws + PREFETCH_STEPS * step + p * line, _MM_HINT_T0);
                _mm_prefetch(ws + PREFETCH_STEPS * step + half + p * line, _MM_HINT_T0);
            }
            const __m512bh w0 = load_line(ws + p * line, int8);
            const __m512bh w1 = load_line(ws + half + p * line, int8);
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
    for (int r = 0; r < rows; r++) {
        store_row(acc0[r], n0, n - n0, scale, bias, out + r * out_row_bytes, out_fp32);
        store_row(acc1[r], n0 + 16, n - n0 - 16, scale, bias, out + r * out_row_bytes, out_fp32);
    }
}

#define CASE(R)                                                                                          \
    case R:                                                                                              \
        if (int8)                                                                                        \
            pair_rows(R, 1, x, x_stride, k, w, n0, n, scale, bias, out, out_row_bytes, out_fp32);        \
        else                                                                                             \
            pair_rows(R, 0, x, x_stride, k, w, n0, n, scale, bias, out, out_row_bytes, out_fp32);        \
        break;

static void pair_block(int rows, int int8, const uint16_t *x, int64_t x_stride, int k, const char *w, int n0,
                       int n, const float *scale, const float *bias, char *out, int64_t out_row_bytes,
                       int out_fp32) {
    switch (rows) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
    }
}

/* x: (m, k) bf16, rows x_stride elements apart; out: (m, n) bf16 (or fp32 with out_fp32), rows
 * out_stride elements apart; k a multiple of 32. int8 weights (packed like the bf16 ones, one byte
 * an element) come with a float32 scale per output column: out = (x W^T) * scale + bias. */
static void avx512_linear(const uint16_t *x, int64_t x_stride, int m, int k, const void *packed, int int8,
                          const float *scale, int n, const float *bias, void *out, int64_t out_stride,
                          int out_fp32) {
    const int pairs = (n + 31) / 32;
    const int64_t pair_bytes = (int64_t)(k / 32) * (int8 ? 1024 : 2048);
    const int64_t out_row_bytes = out_stride * (out_fp32 ? 4 : 2);
#pragma omp parallel for schedule(static)
    for (int p = 0; p < pairs; p++) {
        const char *w = (const char *)packed + p * pair_bytes;
        for (int m0 = 0; m0 < m; m0 += MAX_ROWS) {
            const int rows = m - m0 < MAX_ROWS ? m - m0 : MAX_ROWS;
            pair_block(rows, int8, x + m0 * x_stride, x_stride, k, w, p * 32, n, scale, bias,
                       (char *)out + m0 * out_row_bytes, out_row_bytes, out_fp32);
        }
    }
}

void avx512_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                        const float *bias, void *out, int64_t out_stride, int out_fp32) {
    avx512_linear(x, x_stride, m, k, packed, 0, 0, n, bias, out, out_stride, out_fp32);
}

void linear_int8(const uint16_t *x, int64_t x_stride, int m, int k, const int8_t *packed, const float *scale,
                 int n, const float *bias, void *out, int64_t out_stride, int out_fp32) {
    avx512_linear(x, x_stride, m, k, packed, 1, scale, n, bias, out, out_stride, out_fp32);
}
#define HAVE_AVX512_LINEAR 1
#else
#define HAVE_AVX512_LINEAR 0
void avx512_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                        const float *bias, void *out, int64_t out_stride, int out_fp32) {}
void linear_int8(const uint16_t *x, int64_t x_stride, int m, int k, const int8_t *packed, const float *scale,
                 int n, const float *bias, void *out, int64_t out_stride, int out_fp32) {}
#endif

static int use_amx = 0;

/* Which kernel linear_bf16 runs: 1 AMX (once the OS granted it), 0 AVX512-BF16. Returns 1 when the
 * chosen kernel was built into this library (0: the caller must not call linear_bf16). */
int linear_bf16_select(int amx) {
    use_amx = amx;
    return amx || HAVE_AVX512_LINEAR;
}

/* 1 when linear_int8 was built into this library (it needs AVX512-BF16). */
int linear_int8_available(void) { return HAVE_AVX512_LINEAR; }

void linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                 const float *bias, void *out, int64_t out_stride, int out_fp32) {
    if (use_amx)
        amx_linear_bf16(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32);
    else
        avx512_linear_bf16(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32);
}
