/* bf16 linear layers on Intel AMX: y = x W^T (+ bias) with W packed once into AMX tile order.
 *
 * oneDNN's AMX matmul reaches memory bandwidth at one row but slows down at 8-64 rows on this
 * project's small matrices (N = 576-3072), which is exactly the decode batch. Here each thread
 * streams its own share of the packed weight once per call, and every weight tile is used by all
 * of the call's rows: up to 32 rows per pass, 16 per A tile; more rows re-read the thread's share
 * from L2 (a share of a 576-wide layer is tens of KB), so prefill batches work too.
 *
 * Packed layout (see pack_amx_weight in __init__.py): output columns in pairs of 16-column
 * blocks, each pair a contiguous run over K in steps of 32: [N/32][K/32][2][16][16][2] — for one
 * 16x16 block, row r holds the pairs (W[n][k0 + 2r], W[n][k0 + 2r + 1]) for its 16 columns n, the
 * VNNI order TDPBF16PS reads. N is padded to a multiple of 32 and K must be a multiple of 32. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out AMX state only to processes that ask for it; returns 1 when granted. */
int amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tmm0-3: accumulators (row half 0/1 x column block 0/1); tmm4-5: x rows; tmm6-7: weights. */
static void configure(int rows0, int rows1) {
    tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
    for (int t = 0; t < 8; t++) {
        if (rows[t] == 0) continue;
        cfg.rows[t] = (uint8_t)rows[t];
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* One 16x16 fp32 accumulator block (+ bias) into out, rounded to bf16 or kept in fp32 (out_fp32);
 * columns past n dropped. */
static void store_block(const float *acc, int rows, int n0, int n_valid, const float *bias, void *out,
                        int64_t out_stride, int out_fp32) {
    if (n_valid <= 0) return;
    const __mmask16 mask = n_valid >= 16 ? 0xffff : (__mmask16)((1u << n_valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(acc + r * 16), b);
        if (out_fp32)
            _mm512_mask_storeu_ps((float *)out + r * out_stride + n0, mask, v);
        else
            _mm256_mask_storeu_epi16((uint16_t *)out + r * out_stride + n0, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

/* x: (m, k) bf16, rows x_stride elements apart; out: (m, n) bf16 (or fp32 with out_fp32), rows
 * out_stride elements apart. */
void amx_linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                     const float *bias, void *out, int64_t out_stride, int out_fp32) {
    const int pairs = (n + 31) / 32, steps = k / 32;
    const int64_t pair_elems = (int64_t)steps * 1024;
    /* Rows in blocks whose x fits in L2 (about 1 MiB): each block re-streams the weights, but
     * within one the x rows are re-read from L2 for every column pair instead of from L3. */
    int row_block = (int)((1 << 20) / ((int64_t)k * 2)) / 32 * 32;
    row_block = row_block < 32 ? 32 : row_block;
#pragma omp parallel
    {
        float acc[4][256] __attribute__((aligned(64)));
        int have0 = -1, have1 = -1;
        for (int first_row = 0; first_row < m; first_row += row_block) {
            const int end_row = m - first_row < row_block ? m : first_row + row_block;
#pragma omp for schedule(static)
            for (int p = 0; p < pairs; p++) {
                const uint16_t *w = packed + p * pair_elems;
                for (int m0 = first_row; m0 < end_row; m0 += 32) {
                    const int rows0 = end_row - m0 < 16 ? end_row - m0 : 16;
                    const int rest = end_row - m0 - 16, rows1 = rest <= 0 ? 0 : (rest < 16 ? rest : 16);
                    if (rows0 != have0 || rows1 != have1) {
                        configure(rows0, rows1);
                        have0 = rows0, have1 = rows1;
                    }
                    const uint16_t *a = x + m0 * x_stride;
                    _tile_zero(0);
                    _tile_zero(1);
                    if (rows1) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    for (int s = 0; s < steps; s++) {
                        const uint16_t *ws = w + s * 1024;
                        for (int line = 0; line < 2048; line += 64) /* two steps ahead */
                            _mm_prefetch((const char *)(ws + 2048) + line, _MM_HINT_T0);
                        _tile_loadd(4, a + s * 32, x_stride * 2);
                        _tile_loadd(6, ws, 64);
                        _tile_loadd(7, ws + 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (rows1) {
                            _tile_loadd(5, a + 16 * x_stride + s * 32, x_stride * 2);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, acc[0], 64);
                    _tile_stored(1, acc[1], 64);
                    if (rows1) {
                        _tile_stored(2, acc[2], 64);
                        _tile_stored(3, acc[3], 64);
                    }
                    const int n0 = p * 32;
                    const size_t elem = out_fp32 ? sizeof(float) : sizeof(uint16_t);
                    char *o = (char *)out + (size_t)m0 * out_stride * elem;
                    char *o1 = o + (size_t)16 * out_stride * elem;
                    store_block(acc[0], rows0, n0, n - n0, bias, o, out_stride, out_fp32);
                    store_block(acc[1], rows0, n0 + 16, n - n0 - 16, bias, o, out_stride, out_fp32);
                    if (rows1) {
                        store_block(acc[2], rows1, n0, n - n0, bias, o1, out_stride, out_fp32);
                        store_block(acc[3], rows1, n0 + 16, n - n0 - 16, bias, o1, out_stride, out_fp32);
                    }
                }
            }
        }
        if (have0 >= 0) _tile_release();
    }
}
#else
int amx_init(void) { return 0; }
void amx_linear_bf16(const void *x, long x_stride, int m, int k, const void *packed, int n, const float *bias,
                     void *out, long out_stride, int out_fp32) {}
#endif
