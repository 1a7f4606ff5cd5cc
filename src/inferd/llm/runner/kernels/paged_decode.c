/* Paged decode attention for the CPU: one query token per sequence, attending over that
 * sequence's cached keys and values read in place from the paged cache (no gather copy).
 *
 * Cache layout: (num_slots, num_kv_heads, head_dim), slot = block * block_size + offset.
 * Query heads are grouped over kv heads as transformers' repeat_kv does: kv head j serves query
 * heads j * group .. (j + 1) * group - 1. Work is split over (sequence, kv head) pairs with
 * OpenMP; torch ships libgomp.so.1, so this library shares torch's thread pool.
 *
 * Built on first use by inferd/llm/runner/kernels/__init__.py (gcc -O3 -march=native -fopenmp).
 * q may be fp32 or bf16 and strided (rows of a fused qkv output); out fp32 or bf16.
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

/* Softmax in place over each of `rows` rows of `span` scores. */
static void softmax_rows(float *scores, int rows, int span) {
    for (int h = 0; h < rows; h++) {
        float *s = scores + (int64_t)h * span;
        float peak = -INFINITY, total = 0.f;
#pragma omp simd reduction(max : peak)
        for (int l = 0; l < span; l++) peak = s[l] > peak ? s[l] : peak;
#pragma omp simd reduction(+ : total)
        for (int l = 0; l < span; l++) {
            s[l] = exp_nonpositive(s[l] - peak);
            total += s[l];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int l = 0; l < span; l++) s[l] *= inv;
    }
}

/* One cache row of head_dim values as floats: a plain pointer for fp32 caches, converted into
 * `scratch` for bf16 caches. */
static inline const float *cache_row(const void *cache, int is_bf16, int64_t offset, int head_dim,
                                     float *scratch) {
    if (!is_bf16) return (const float *)cache + offset;
    const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
    for (int d = 0; d < head_dim; d++) scratch[d] = bf16_to_float(src[d]);
    return scratch;
}

/* Query heads [h0, h1) of one sequence (whole kv-head groups); scores: (h1 - h0) x span. */
static void attend_heads(const float *q, const void *k_cache, const void *v_cache, int is_bf16,
                         const int64_t *table, int ctx_len, int start, int h0, int h1,
                         int num_kv_heads, int head_dim, int group, int block_size, float scale,
                         float softcap, float *scores, float *row, float *out) {
    const int span = ctx_len - start, kv0 = h0 / group, kv1 = h1 / group;
    const int row_width = (kv1 - kv0) * head_dim;
    for (int l = 0; l < span; l++) {
        const int pos = start + l;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const int64_t offset = (slot * num_kv_heads + kv0) * head_dim;
        const float *k = cache_row(k_cache, is_bf16, offset, row_width, row);
        for (int h = h0; h < h1; h++) {
            const float *qh = q + (int64_t)h * head_dim, *kh = k + (h / group - kv0) * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
            dot *= scale;
            if (softcap > 0.f) dot = tanhf(dot / softcap) * softcap;
            scores[(int64_t)(h - h0) * span + l] = dot;
        }
    }
    softmax_rows(scores, h1 - h0, span);
    memset(out + (int64_t)h0 * head_dim, 0, sizeof(float) * head_dim * (h1 - h0));
    for (int l = 0; l < span; l++) {
        const int pos = start + l;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const int64_t offset = (slot * num_kv_heads + kv0) * head_dim;
        const float *v = cache_row(v_cache, is_bf16, offset, row_width, row);
        for (int h = h0; h < h1; h++) {
            const float p = scores[(int64_t)(h - h0) * span + l];
            const float *vh = v + (h / group - kv0) * head_dim;
            float *o = out + (int64_t)h * head_dim;
#pragma omp simd
            for (int d = 0; d < head_dim; d++) o[d] += p * vh[d];
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PATH 1
#define MAX_HEADS 64
#define MAX_CHUNKS 16 /* head_dim up to 256 */

/* The bf16-cache path with AVX512-BF16: q . k as bf16 pair dot products accumulated in fp32
 * (vdpbf16ps, 32 products per instruction, read straight from the cache), and p . v with each
 * value row widened to fp32 once and added into every query head of its group. The cache is
 * walked one slot at a time over all the task's kv heads, so each block is read as one contiguous
 * run, and the same slot of the next block is prefetched a block ahead (the jump between blocks is
 * what the hardware prefetcher cannot guess). head_dim must be a multiple of 32 and a task at most
 * MAX_HEADS query heads; the portable path takes the rest. */
static inline void prefetch_row(const uint16_t *row, int bytes) {
    for (int b = 0; b < bytes; b += 64) _mm_prefetch((const char *)row + b, _MM_HINT_T0);
}

/* The positions from `pos` that lie in one block (at most `left`): their count, the cache row of
 * the first one (from element `offset` of its slot), and the same row of the next block when the
 * context goes on there (else NULL), to prefetch. */
static inline int block_run(const uint16_t *cache, const int64_t *table, int pos, int left, int ctx_len,
                            int block_size, int64_t slot_stride, int64_t offset, const uint16_t **base,
                            const uint16_t **next) {
    const int in_block = pos % block_size, blk = pos / block_size;
    *base = cache + (table[blk] * block_size + in_block) * slot_stride + offset;
    *next = (int64_t)(blk + 1) * block_size < ctx_len
                ? cache + (table[blk + 1] * block_size + in_block) * slot_stride + offset
                : 0;
    return block_size - in_block < left ? block_size - in_block : left;
}

static void attend_heads_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                              const int64_t *table, int ctx_len, int start, int h0, int h1,
                              int num_kv_heads, int head_dim, int group, int block_size,
                              float scale, float softcap, float *scores, float *out) {
    const int span = ctx_len - start, pairs = head_dim / 32, wide = head_dim / 16;
    const int heads = h1 - h0, kv0 = h0 / group, kv_count = heads / group;
    const int64_t slot_stride = (int64_t)num_kv_heads * head_dim;
    const int row_bytes = kv_count * head_dim * 2;
    __m512bh qv[MAX_HEADS * MAX_CHUNKS / 2];
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < pairs; c++) {
            const float *qh = q + (int64_t)(h0 + h) * head_dim + 32 * c;
            qv[h * pairs + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qh + 16), _mm512_loadu_ps(qh));
        }
    for (int l = 0; l < span;) {
        const uint16_t *base, *next;
        const int run = block_run(k_cache, table, start + l, span - l, ctx_len, block_size, slot_stride,
                                  (int64_t)kv0 * head_dim, &base, &next);
        for (int i = 0; i < run; i++) {
            const uint16_t *row = base + i * slot_stride;
            if (next) prefetch_row(next + i * slot_stride, row_bytes);
            for (int h = 0; h < heads; h++) {
                const uint16_t *k = row + (h / group) * head_dim;
                __m512 acc = _mm512_setzero_ps();
                for (int c = 0; c < pairs; c++)
                    acc = _mm512_dpbf16_ps(acc, qv[h * pairs + c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
                float dot = _mm512_reduce_add_ps(acc) * scale;
                if (softcap > 0.f) dot = tanhf(dot / softcap) * softcap;
                scores[(int64_t)h * span + l + i] = dot;
            }
        }
        l += run;
    }
    softmax_rows(scores, heads, span);
    __m512 acc[MAX_HEADS * MAX_CHUNKS];
    for (int i = 0; i < heads * wide; i++) acc[i] = _mm512_setzero_ps();
    for (int l = 0; l < span;) {
        const uint16_t *base, *next;
        const int run = block_run(v_cache, table, start + l, span - l, ctx_len, block_size, slot_stride,
                                  (int64_t)kv0 * head_dim, &base, &next);
        for (int i = 0; i < run; i++) {
            const uint16_t *row = base + i * slot_stride;
            if (next) prefetch_row(next + i * slot_stride, row_bytes);
            for (int kv = 0; kv < kv_count; kv++) {
                const uint16_t *v = row + kv * head_dim;
                for (int c = 0; c < wide; c++) {
                    const __m512 vc = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + 16 * c))), 16));
                    for (int g = 0; g < group; g++) {
                        const int h = kv * group + g;
                        acc[h * wide + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(int64_t)h * span + l + i]), vc,
                                                            acc[h * wide + c]);
                    }
                }
            }
        }
        l += run;
    }
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < wide; c++)
            _mm512_storeu_ps(out + (int64_t)(h0 + h) * head_dim + 16 * c, acc[h * wide + c]);
}
#endif

/* q: (num_seqs, num_heads * head_dim) rows q_stride elements apart, fp32 or bf16 (q_bf16);
 * out: rows out_stride elements apart, fp32 or bf16 (out_bf16).
 * block_tables: (num_seqs, table_width); ctx_lens: (num_seqs,) positions 0..len-1 are attended.
 * window > 0 limits attention to the last `window` positions; softcap > 0 applies tanh capping.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int paged_decode_attention(const void *q, int q_bf16, int64_t q_stride, const void *k_cache,
                           const void *v_cache, int is_bf16, const int64_t *block_tables,
                           int table_width, const int64_t *ctx_lens, int num_seqs, int num_heads,
                           int num_kv_heads, int head_dim, int block_size, float scale, int window,
                           float softcap, void *out, int out_bf16, int64_t out_stride) {
    const int group = num_heads / num_kv_heads, width = num_heads * head_dim;
    const int threads = omp_get_max_threads();
    /* Whole sequences per task read each cache row once; split by kv head only when there are
     * too few sequences to keep every thread busy. */
    const int splits = num_seqs >= 2 * threads ? 1 : num_kv_heads;
    const int heads_per_task = num_heads / splits;
    int64_t longest = 1;
    for (int b = 0; b < num_seqs; b++) longest = ctx_lens[b] > longest ? ctx_lens[b] : longest;
    /* per thread: scores, one widened cache row, and the task's queries and outputs in fp32 */
    const size_t per_thread = (size_t)(heads_per_task * longest + num_kv_heads * head_dim + 2 * width);
    float *scratch = malloc(sizeof(float) * per_thread * (size_t)threads);
    if (!scratch) return -1;
#ifdef HAVE_BF16_PATH
    const int fast = is_bf16 && head_dim % 32 == 0 && head_dim <= 16 * MAX_CHUNKS && heads_per_task <= MAX_HEADS;
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int task = 0; task < num_seqs * splits; task++) {
        float *scores = scratch + per_thread * (size_t)omp_get_thread_num();
        float *row = scores + heads_per_task * longest;
        float *qf = row + num_kv_heads * head_dim, *of = qf + width;
        const int b = task / splits, h0 = (task % splits) * heads_per_task;
        const int first = h0 * head_dim, count = heads_per_task * head_dim;
        if (q_bf16) {
            const uint16_t *src = (const uint16_t *)q + b * q_stride;
#pragma omp simd
            for (int i = first; i < first + count; i++) qf[i] = bf16_to_float(src[i]);
        } else {
            memcpy(qf + first, (const float *)q + b * q_stride + first, sizeof(float) * count);
        }
        const int ctx_len = (int)ctx_lens[b];
        const int start = (window > 0 && ctx_len > window) ? ctx_len - window : 0;
        const int64_t *table = block_tables + (int64_t)b * table_width;
#ifdef HAVE_BF16_PATH
        if (fast)
            attend_heads_bf16(qf, k_cache, v_cache, table, ctx_len, start, h0, h0 + heads_per_task, num_kv_heads,
                              head_dim, group, block_size, scale, softcap, scores, of);
        else
#endif
            attend_heads(qf, k_cache, v_cache, is_bf16, table, ctx_len, start, h0, h0 + heads_per_task,
                         num_kv_heads, head_dim, group, block_size, scale, softcap, scores, row, of);
        if (out_bf16) {
            uint16_t *dst = (uint16_t *)out + b * out_stride;
#pragma omp simd
            for (int i = first; i < first + count; i++) dst[i] = float_to_bf16(of[i]);
        } else {
            memcpy((float *)out + b * out_stride + first, of + first, sizeof(float) * count);
        }
    }
    free(scratch);
    return 0;
}
