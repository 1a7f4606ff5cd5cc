/* Paged decode attention for the CPU: one query token per sequence, attending over that
 * sequence's cached keys and values read in place from the paged cache (no gather copy).
 *
 * Cache layout: (num_slots, num_kv_heads, head_dim), slot = block * block_size + offset.
 * Query heads are grouped over kv heads as transformers' repeat_kv does: kv head j serves query
 * heads j * group .. (j + 1) * group - 1. Work is split over (sequence, kv head) pairs with
 * OpenMP; torch ships libgomp.so.1, so this library shares torch's thread pool.
 *
 * Built on first use by inferd/llm/runner/kernels/__init__.py (gcc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = ((uint32_t)v) << 16;
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

/* exp(x) for x <= 0 (softmax after subtracting the peak): 2^(x log2 e) split into an integer
 * power built in the exponent bits and a degree-6 polynomial of the fraction; relative error
 * about 2e-7. Plain arithmetic, so loops over it vectorise (libm's expf does not without
 * -ffast-math, which would also flush denormals for the whole process). */
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
    for (int h = h0; h < h1; h++) {
        float *s = scores + (int64_t)(h - h0) * span;
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
        memset(out + (int64_t)h * head_dim, 0, sizeof(float) * head_dim);
    }
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
        const int pos = start + l, in_block = pos % block_size, blk = pos / block_size;
        const int run = block_size - in_block < span - l ? block_size - in_block : span - l;
        const uint16_t *base = k_cache + ((table[blk] * block_size + in_block) * slot_stride + (int64_t)kv0 * head_dim);
        const int has_next = (int64_t)(blk + 1) * block_size < ctx_len;
        const uint16_t *next = has_next ? k_cache + ((table[blk + 1] * block_size + in_block) * slot_stride + (int64_t)kv0 * head_dim) : 0;
        for (int i = 0; i < run; i++) {
            const uint16_t *row = base + i * slot_stride;
            if (has_next) prefetch_row(next + i * slot_stride, row_bytes);
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
    for (int h = 0; h < heads; h++) {
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
    __m512 acc[MAX_HEADS * MAX_CHUNKS];
    for (int i = 0; i < heads * wide; i++) acc[i] = _mm512_setzero_ps();
    for (int l = 0; l < span;) {
        const int pos = start + l, in_block = pos % block_size, blk = pos / block_size;
        const int run = block_size - in_block < span - l ? block_size - in_block : span - l;
        const uint16_t *base = v_cache + ((table[blk] * block_size + in_block) * slot_stride + (int64_t)kv0 * head_dim);
        const int has_next = (int64_t)(blk + 1) * block_size < ctx_len;
        const uint16_t *next = has_next ? v_cache + ((table[blk + 1] * block_size + in_block) * slot_stride + (int64_t)kv0 * head_dim) : 0;
        for (int i = 0; i < run; i++) {
            const uint16_t *row = base + i * slot_stride;
            if (has_next) prefetch_row(next + i * slot_stride, row_bytes);
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

/* q: (num_seqs, num_heads, head_dim) fp32; out: the same shape, fp32.
 * block_tables: (num_seqs, table_width); ctx_lens: (num_seqs,) positions 0..len-1 are attended.
 * window > 0 limits attention to the last `window` positions; softcap > 0 applies tanh capping.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int paged_decode_attention(const float *q, const void *k_cache, const void *v_cache, int is_bf16,
                           const int64_t *block_tables, int table_width, const int64_t *ctx_lens,
                           int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                           int block_size, float scale, int window, float softcap, float *out) {
    const int group = num_heads / num_kv_heads;
    const int threads = omp_get_max_threads();
    /* Whole sequences per task read each cache row once; split by kv head only when there are
     * too few sequences to keep every thread busy. */
    const int splits = num_seqs >= 2 * threads ? 1 : num_kv_heads;
    const int heads_per_task = num_heads / splits;
    int64_t longest = 1;
    for (int b = 0; b < num_seqs; b++) longest = ctx_lens[b] > longest ? ctx_lens[b] : longest;
    const size_t per_thread = (size_t)(heads_per_task * longest + num_kv_heads * head_dim);
    float *scratch = malloc(sizeof(float) * per_thread * (size_t)threads);
#ifdef HAVE_BF16_PATH
    const int fast = is_bf16 && head_dim % 32 == 0 && head_dim <= 16 * MAX_CHUNKS && heads_per_task <= MAX_HEADS;
#endif
    if (!scratch) return -1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int task = 0; task < num_seqs * splits; task++) {
        float *scores = scratch + per_thread * (size_t)omp_get_thread_num();
        float *row = scores + heads_per_task * longest;
        const int b = task / splits, h0 = (task % splits) * heads_per_task;
        const int ctx_len = (int)ctx_lens[b];
        const int start = (window > 0 && ctx_len > window) ? ctx_len - window : 0;
        const int64_t seq = (int64_t)b * num_heads * head_dim;
#ifdef HAVE_BF16_PATH
        if (fast) {
            attend_heads_bf16(q + seq, k_cache, v_cache, block_tables + (int64_t)b * table_width, ctx_len,
                              start, h0, h0 + heads_per_task, num_kv_heads, head_dim, group, block_size,
                              scale, softcap, scores, out + seq);
            continue;
        }
#endif
        attend_heads(q + seq, k_cache, v_cache, is_bf16, block_tables + (int64_t)b * table_width,
                     ctx_len, start, h0, h0 + heads_per_task, num_kv_heads, head_dim, group,
                     block_size, scale, softcap, scores, row, out + seq);
    }
    free(scratch);
    return 0;
}
