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

static inline void store_row(__m512 acc, int n0, int n_valid, const float *bias, void *out, int out_fp32) {
    if (n_valid <= 0) return;
    const __mmask16 mask = n_valid >= 16 ? 0xffff : (__mmask16)((1u << n_valid) - 1);
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias + n0));
    if (out_fp32)
        _mm512_mask_storeu_ps((float *)out + n0, mask, acc);
    else
        _mm256_mask_storeu_epi16((uint16_t *)out + n0, mask, (__m256i)_mm512_cvtneps_pbh(acc));
}

/* rows (1..MAX_ROWS) rows of x against one 32-column pair; inlined per constant row count so the
 * accumulators live in registers. */
static inline __attribute__((always_inline)) void pair_rows(const int rows, const uint16_t *x, int64_t x_stride,
                                                            int k, const uint16_t *w, int n0, int n,
                                                            const float *bias, char *out, int64_t out_row_bytes,
                                                            int out_fp32) {
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int s = 0; s < k / 32; s++) {
        const uint16_t *ws = w + (int64_t)s * 1024;
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++) {
            /* PREFETCH_STEPS steps of 32 K ahead (2 KB each): both lines this pair reads there */
            _mm_prefetch((const char *)(ws + PREFETCH_STEPS * 1024 + p * 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(ws + PREFETCH_STEPS * 1024 + 512 + p * 32), _MM_HINT_T0);
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(ws + p * 32);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(ws + 512 + p * 32);
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
        store_row(acc0[r], n0, n - n0, bias, out + r * out_row_bytes, out_fp32);
        store_row(acc1[r], n0 + 16, n - n0 - 16, bias, out + r * out_row_bytes, out_fp32);
    }
}

#define CASE(R)                                                                                   \
    case R:                                                                                       \
        pair_rows(R, x, x_stride, k, w, n0, n, bias, out, out_row_bytes, out_fp32);               \
        break;

static void pair_block(int rows, const uint16_t *x, int64_t x_stride, int k, const uint16_t *w, int n0, int n,
                       const float *bias, char *out, int64_t out_row_bytes, int out_fp32) {
    switch (rows) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
    }
}

/* x: (m, k) bf16, rows x_stride elements apart; out: (m, n) bf16 (or fp32 with out_fp32), rows
 * out_stride elements apart; k a multiple of 32. */
void avx512_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                        const float *bias, void *out, int64_t out_stride, int out_fp32) {
    const int pairs = (n + 31) / 32;
    const int64_t pair_elems = (int64_t)(k / 32) * 1024;
    const int64_t out_row_bytes = out_stride * (out_fp32 ? 4 : 2);
#pragma omp parallel for schedule(static)
    for (int p = 0; p < pairs; p++) {
        const uint16_t *w = packed + p * pair_elems;
        for (int m0 = 0; m0 < m; m0 += MAX_ROWS) {
            const int rows = m - m0 < MAX_ROWS ? m - m0 : MAX_ROWS;
            pair_block(rows, x + m0 * x_stride, x_stride, k, w, p * 32, n, bias, (char *)out + m0 * out_row_bytes,
                       out_row_bytes, out_fp32);
        }
    }
}
#define HAVE_AVX512_LINEAR 1
#else
#define HAVE_AVX512_LINEAR 0
void avx512_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                        const float *bias, void *out, int64_t out_stride, int out_fp32) {}
#endif

static int use_amx = 0;

/* Which kernel linear_bf16 runs: 1 AMX (once the OS granted it), 0 AVX512-BF16. Returns 1 when the
 * chosen kernel was built into this library (0: the caller must not call linear_bf16). */
int linear_bf16_select(int amx) {
    use_amx = amx;
    return amx || HAVE_AVX512_LINEAR;
}

void linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                 const float *bias, void *out, int64_t out_stride, int out_fp32) {
    if (use_amx)
        amx_linear_bf16(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32);
    else
        avx512_linear_bf16(x, x_stride, m, k, packed, n, bias, out, out_stride, out_fp32);
}
