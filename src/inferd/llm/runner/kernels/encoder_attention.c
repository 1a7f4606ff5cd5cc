/* Attention of an unpadded ("varlen") encoder batch: the items' tokens packed one after another,
 * each token attending (both ways, no mask) to the tokens of its own item only.
 *
 * q, k and v are float32 rows `stride` floats apart (views into a fused qkv output), head h of a
 * token at h * head_dim; out is (tokens, heads * head_dim) rows `out_stride` floats apart. Work is
 * split over (item, head, block of up to CHUNK query rows) with OpenMP. Each task packs its
 * item's keys for the head transposed (kt: head_dim rows of the item's positions, padded with
 * zeros to a multiple of 16), scores ROWS query rows at a time against them, takes the softmax
 * over the item's positions and adds up the value rows in position order. A row's result depends
 * only on its item: not on the other items of the batch, nor on how the rows were split.
 *
 * The scores and p . v keep their accumulators in registers (ROWS rows x two 16-wide vectors);
 * the softmax's division is left to the end, one multiply per output vector. AVX-512 builds only:
 * the others return -3 and the encoder keeps torch's matrix products (as fast as C loops there).
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

#define ROWS 8    /* query rows scored (and summed over the values) together */
#define CHUNK 64  /* most query rows of one task */

#if defined(__AVX512F__)
#include <immintrin.h>

/* kt (head_dim x padded): the n keys of one head transposed, positions n..padded - 1 zero; 16 x 16
 * blocks at a time. */
static void pack_keys(const float *k, int64_t stride, int n, int head_dim, int padded, float *kt) {
    for (int j0 = 0; j0 < padded; j0 += 16)
        for (int d0 = 0; d0 < head_dim; d0 += 16) {
            __m512i r[16];
            for (int lane = 0; lane < 16; lane++)
                r[lane] = j0 + lane < n ? _mm512_loadu_si512(k + (j0 + lane) * stride + d0) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(kt + (int64_t)(d0 + i) * padded + j0, r[i]);
        }
}

/* scores[r][j..j + 16 * NV) = scale * q[r] . kt[.][j..] for the ROWS rows (past `rows`: q row 0
 * again, scored and never used). */
#define SCORE_BLOCK(NV)                                                                        \
    do {                                                                                       \
        __m512 acc[ROWS][NV];                                                                  \
        for (int r = 0; r < ROWS; r++)                                                         \
            for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();                      \
        for (int d = 0; d < head_dim; d++) {                                                   \
            __m512 key[NV];                                                                    \
            for (int c = 0; c < NV; c++) key[c] = _mm512_loadu_ps(kt + (int64_t)d * padded + j + 16 * c); \
            for (int r = 0; r < ROWS; r++) {                                                   \
                const __m512 qb = _mm512_set1_ps(qr[r][d]);                                    \
                for (int c = 0; c < NV; c++) acc[r][c] = _mm512_fmadd_ps(qb, key[c], acc[r][c]); \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < ROWS; r++)                                                         \
            for (int c = 0; c < NV; c++)                                                       \
                _mm512_storeu_ps(scores + r * padded + j + 16 * c, _mm512_mul_ps(acc[r][c], vscale)); \
    } while (0)

static void score_rows(const float *q, int64_t stride, int rows, float scale, const float *kt, int head_dim,
                       int padded, float *scores) {
    const float *qr[ROWS];
    for (int r = 0; r < ROWS; r++) qr[r] = q + (r < rows ? r : 0) * stride;
    const __m512 vscale = _mm512_set1_ps(scale);
    int j = 0;
    for (; j + 32 <= padded; j += 32) SCORE_BLOCK(2);
    if (j < padded) SCORE_BLOCK(1);
}

/* exp(score - the row's peak) in place over each row's n scores, and 1 / the row's total in inv:
 * NaN when a score is NaN or the peak is infinite (an input that was NaN or infinite), so the row
 * comes out NaN as torch's softmax makes it, never a finite average that hides the fault. */
static void exp_rows(float *scores, int rows, int n, int padded, float *inv) {
    for (int r = 0; r < rows; r++) {
        float *s = scores + r * padded;
        __m512 peak = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int j = 0; j < n; j += 16) {
            const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 x = _mm512_maskz_loadu_ps(m, s + j);
            nan |= _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
            peak = _mm512_mask_max_ps(peak, m, peak, x);
        }
        const float most = _mm512_reduce_max_ps(peak);
        if (nan || !isfinite(most)) {
            inv[r] = NAN;
            continue;
        }
        const __m512 top = _mm512_set1_ps(most);
        for (int j = 0; j < n; j += 16) {
            const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + j), top)));
            _mm512_storeu_ps(s + j, e);
            total = _mm512_add_ps(total, e);
        }
        inv[r] = 1.f / _mm512_reduce_add_ps(total);
    }
}

/* out rows (rows of them) = inv[r] * scores[r][0..n) . v, head_dim in blocks of 32 (then 16). */
#define VALUE_BLOCK(NV)                                                                         \
    do {                                                                                        \
        __m512 acc[ROWS][NV];                                                                   \
        for (int r = 0; r < ROWS; r++)                                                          \
            for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();                       \
        for (int j = 0; j < n; j++) {                                                           \
            __m512 val[NV];                                                                     \
            for (int c = 0; c < NV; c++) val[c] = _mm512_loadu_ps(v + j * stride + d0 + 16 * c); \
            for (int r = 0; r < ROWS; r++) {                                                    \
                const __m512 pb = _mm512_set1_ps(scores[r * padded + j]);                       \
                for (int c = 0; c < NV; c++) acc[r][c] = _mm512_fmadd_ps(pb, val[c], acc[r][c]); \
            }                                                                                   \
        }                                                                                       \
        for (int r = 0; r < rows; r++)                                                          \
            for (int c = 0; c < NV; c++)                                                        \
                _mm512_storeu_ps(out + r * out_stride + d0 + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))); \
    } while (0)

static void value_rows(const float *scores, const float *inv, const float *v, int64_t stride, int n, int rows,
                       int head_dim, int padded, float *out, int64_t out_stride) {
    int d0 = 0;
    for (; d0 + 32 <= head_dim; d0 += 32) VALUE_BLOCK(2);
    if (d0 < head_dim) VALUE_BLOCK(1);
}

/* Returns 0; -1 for a head_dim that is not a multiple of 16 or an item of no tokens, -2 when
 * scratch memory could not be had. bounds: (start, end) per item. */
int varlen_attention_f32(const float *q, const float *k, const float *v, int64_t stride, const int64_t *bounds,
                         int items, int heads, int head_dim, float scale, float *out, int64_t out_stride) {
    if (head_dim <= 0 || head_dim % 16) return -1;
    int64_t longest = 0, tasks = 0;
    for (int i = 0; i < items; i++) {
        const int64_t n = bounds[2 * i + 1] - bounds[2 * i];
        if (n <= 0) return -1;
        longest = n > longest ? n : longest;
        tasks += (n + CHUNK - 1) / CHUNK;
    }
    tasks *= heads;
    if (!tasks) return 0;
    /* task t: (item, head, first row), an item's heads in turn, each head's row blocks in turn (a
     * thread taking the next block of the same head reuses its packed keys) */
    int64_t *task = malloc(sizeof(int64_t) * 3 * tasks);
    if (!task) return -2;
    int64_t filled = 0;
    for (int i = 0; i < items; i++)
        for (int h = 0; h < heads; h++)
            for (int64_t r = bounds[2 * i]; r < bounds[2 * i + 1]; r += CHUNK, filled++)
                task[3 * filled] = i, task[3 * filled + 1] = h, task[3 * filled + 2] = r;
    const int padded = (int)((longest + 15) / 16 * 16);
    int failed = 0;
#pragma omp parallel
    {
        float *kt = aligned_alloc(64, sizeof(float) * ((size_t)head_dim * padded + (size_t)ROWS * padded));
        if (!kt) {
#pragma omp atomic write
            failed = 1;
        }
        float *scores = kt ? kt + (size_t)head_dim * padded : 0;
        int64_t packed = -1; /* item * heads + head whose keys kt holds */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!kt) continue;
            const int item = (int)task[3 * t], h = (int)task[3 * t + 1];
            const int64_t start = bounds[2 * item], end = bounds[2 * item + 1], row0 = task[3 * t + 2];
            const int n = (int)(end - start), width = (n + 15) / 16 * 16;
            const int64_t head = (int64_t)h * head_dim;
            if (packed != (int64_t)item * heads + h) {
                pack_keys(k + start * stride + head, stride, n, head_dim, width, kt);
                packed = (int64_t)item * heads + h;
            }
            const int64_t row_end = row0 + CHUNK < end ? row0 + CHUNK : end;
            for (int64_t r0 = row0; r0 < row_end; r0 += ROWS) {
                const int rows = (int)(row_end - r0 < ROWS ? row_end - r0 : ROWS);
                score_rows(q + r0 * stride + head, stride, rows, scale, kt, head_dim, width, scores);
                float inv[ROWS];
                exp_rows(scores, rows, n, width, inv);
                value_rows(scores, inv, v + start * stride + head, stride, n, rows, head_dim, width,
                           out + r0 * out_stride + head, out_stride);
            }
        }
        free(kt);
    }
    free(task);
    return failed ? -2 : 0;
}

#else

int varlen_attention_f32(const float *q, const float *k, const float *v, int64_t stride, const int64_t *bounds,
                         int items, int heads, int head_dim, float scale, float *out, int64_t out_stride) {
    return -3;
}

#endif

/* 1 when varlen_attention_f32 was built into this library (it needs AVX-512). */
int varlen_attention_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
