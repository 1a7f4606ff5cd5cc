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

/* Runs of prefill rows (the AVX512-BF16 path below; sizes the driver needs on every CPU). */
#define RUN_MIN 4      /* shorter runs take the one-row path */
#define RUN_VECTORS 12 /* query vectors scored together */
#define RUN_PV 6       /* query vectors accumulating p . v together */

/* Floats of one packed copy (keys or values) of span positions, in blocks of 16. */
static size_t run_pack_floats(int span, int head_dim) { return (size_t)((span + 15) / 16) * 16 * head_dim; }

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

/* Consecutive rows of one sequence (a prefill span: row i attends positions start_i..len_i - 1,
 * with len_i = len_0 + i) share their keys and values, so one kv head's context is first packed
 * for the whole run, in blocks of 16 positions: keys transposed into dword pairs (kt: for each
 * pair of dims, the 16 positions' pairs side by side) and values as pairs of positions (vp: for
 * each pair of positions, each dim's two values side by side). A query head then scores 16
 * positions with head_dim / 2 dot-pair instructions and no horizontal sums, and accumulates 16
 * dims of 2 positions per instruction: about 2 instructions a score where the one-row path takes
 * ten. Probabilities enter p . v rounded to bf16, as in torch's bf16 attention. */


static void pack_run(const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table, int first,
                     int last, int kv, int num_kv_heads, int head_dim, int block_size, uint32_t *kt,
                     uint32_t *vp) {
    const int half = head_dim / 2, blocks = (last - first + 15) / 16;
    memset(kt, 0, sizeof(uint32_t) * (size_t)blocks * 16 * half);
    memset(vp, 0, sizeof(uint32_t) * (size_t)blocks * 16 * half);
    for (int pos = first; pos < last; pos++) {
        const int i = pos - first, b = i / 16, lane = i % 16;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const int64_t offset = (slot * num_kv_heads + kv) * head_dim;
        const uint32_t *k = (const uint32_t *)(k_cache + offset);
        const uint16_t *v = v_cache + offset;
        uint32_t *kb = kt + (size_t)b * 16 * half;
        for (int j = 0; j < half; j++) kb[j * 16 + lane] = k[j];
        /* position pair lane / 2 of block b; its dims in chunks of 16, each dim's two positions */
        uint16_t *vb = (uint16_t *)(vp + (size_t)b * 16 * half + (size_t)(lane / 2) * head_dim);
        for (int d = 0; d < head_dim; d++) vb[2 * d + (lane & 1)] = v[d];
    }
}

static void attend_run_bf16(const void *q, int q_bf16, int64_t q_stride, const uint16_t *k_cache,
                            const uint16_t *v_cache, const int64_t *table, const int64_t *ctx_lens, int rows,
                            int window, int kv, int num_kv_heads, int head_dim, int group, int block_size,
                            float scale, float softcap, float *scores, uint32_t *kt, uint32_t *vp, float *out,
                            int64_t out_stride) {
    const int half = head_dim / 2, wide = head_dim / 16;
    const int first_len = (int)ctx_lens[0], last_len = (int)ctx_lens[rows - 1];
    const int first = (window > 0 && first_len > window) ? first_len - window : 0;
    pack_run(k_cache, v_cache, table, first, last_len, kv, num_kv_heads, head_dim, block_size, kt, vp);
    /* RUN_VECTORS query vectors (rows x the kv head's query heads) at a time: each packed key and
     * value vector loaded is used by all of them (register blocking; L2 bandwidth bound otherwise). */
    const int per_pass = group >= RUN_VECTORS ? 1 : RUN_VECTORS / group;
    for (int r0 = 0; r0 < rows; r0 += per_pass) {
        const int nr = rows - r0 < per_pass ? rows - r0 : per_pass;
        const int nv = nr * group < RUN_VECTORS ? nr * group : RUN_VECTORS;
        for (int g0 = 0; g0 < group; g0 += nv) { /* more than RUN_VECTORS query heads per kv head: in turns */
            const int ng = group - g0 < nv ? group - g0 : nv, count = nr == 1 ? ng : nr * group;
            uint32_t qp[RUN_VECTORS][MAX_CHUNKS * 8] = {{0}};
            int lo[RUN_VECTORS], hi[RUN_VECTORS]; /* each vector's positions lo..hi - 1, relative to first */
            for (int v = 0; v < count; v++) {
                const int r = r0 + (nr == 1 ? 0 : v / group), h = kv * group + (nr == 1 ? g0 + v : v % group);
                const int len = (int)ctx_lens[r];
                lo[v] = ((window > 0 && len > window) ? len - window : 0) - first;
                hi[v] = len - first;
                const int64_t at = r * q_stride + (int64_t)h * head_dim;
                if (q_bf16) {
                    memcpy(qp[v], (const uint16_t *)q + at, sizeof(uint16_t) * head_dim);
                } else {
                    const float *qh = (const float *)q + at;
                    for (int j = 0; j < half; j++)
                        qp[v][j] = (uint32_t)float_to_bf16(qh[2 * j]) | (uint32_t)float_to_bf16(qh[2 * j + 1]) << 16;
                }
            }
            const int b0 = lo[0] / 16, b1 = (hi[count - 1] + 15) / 16, span = 16 * (b1 - b0);
            float peak[RUN_VECTORS];
            for (int v = 0; v < RUN_VECTORS; v++) peak[v] = -INFINITY;
            for (int b = b0; b < b1; b++) {
                const uint32_t *kb = kt + (size_t)b * 16 * half;
                __m512 acc[RUN_VECTORS];
                for (int v = 0; v < RUN_VECTORS; v++) acc[v] = _mm512_setzero_ps();
                for (int j = 0; j < half; j++) {
                    const __m512bh k = (__m512bh)_mm512_loadu_si512(kb + j * 16);
                    for (int v = 0; v < RUN_VECTORS; v++)
                        acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_set1_epi32((int)qp[v][j]), k);
                }
                for (int v = 0; v < count; v++) {
                    __m512 x = _mm512_mul_ps(acc[v], _mm512_set1_ps(scale));
                    if (softcap > 0.f) {
                        float lanes[16];
                        _mm512_storeu_ps(lanes, x);
                        for (int i = 0; i < 16; i++) lanes[i] = tanhf(lanes[i] / softcap) * softcap;
                        x = _mm512_loadu_ps(lanes);
                    }
                    /* lanes outside the vector's positions take no weight */
                    const int below = lo[v] - 16 * b, upto = hi[v] - 16 * b;
                    const __mmask16 low = below > 0 ? (__mmask16)((1u << (below > 16 ? 16 : below)) - 1) : 0;
                    const __mmask16 high = upto >= 16 ? 0xffff : (upto <= 0 ? 0 : (__mmask16)((1u << upto) - 1));
                    x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), high & ~low, x);
                    _mm512_storeu_ps(scores + (size_t)v * span + 16 * (b - b0), x);
                    peak[v] = fmaxf(peak[v], _mm512_reduce_max_ps(x));
                }
            }
            float inv[RUN_VECTORS];
            for (int v = 0; v < count; v++) {
                float total = 0.f, *sv = scores + (size_t)v * span;
                const float top = peak[v];
#pragma omp simd reduction(+ : total)
                for (int l = 0; l < span; l++) {
                    sv[l] = sv[l] == -INFINITY ? 0.f : exp_nonpositive(sv[l] - top);
                    total += sv[l];
                }
                inv[v] = 1.f / total;
            }
            /* p . v for RUN_PV vectors and 16 dims at a time, even and odd position pairs in
             * separate sums: a fixed set of accumulators the compiler keeps in registers */
            for (int v0 = 0; v0 < count; v0 += RUN_PV) {
                const float *sv[RUN_PV];
                for (int u = 0; u < RUN_PV; u++) sv[u] = scores + (size_t)(v0 + u < count ? v0 + u : v0) * span;
                for (int c = 0; c < wide; c++) {
                    __m512 even[RUN_PV], odd[RUN_PV];
                    for (int u = 0; u < RUN_PV; u++) even[u] = odd[u] = _mm512_setzero_ps();
                    for (int b = b0; b < b1; b++) {
                        const uint32_t *vb = vp + (size_t)b * 16 * half + 16 * c;
                        uint32_t pairs[RUN_PV][8];
                        for (int u = 0; u < RUN_PV; u++)
                            _mm256_storeu_si256((__m256i *)pairs[u],
                                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sv[u] + 16 * (b - b0))));
                        for (int t = 0; t < 8; t += 2) {
                            const __m512bh x = (__m512bh)_mm512_loadu_si512(vb + (size_t)t * head_dim);
                            const __m512bh y = (__m512bh)_mm512_loadu_si512(vb + (size_t)(t + 1) * head_dim);
                            for (int u = 0; u < RUN_PV; u++) {
                                even[u] = _mm512_dpbf16_ps(even[u], (__m512bh)_mm512_set1_epi32((int)pairs[u][t]), x);
                                odd[u] = _mm512_dpbf16_ps(odd[u], (__m512bh)_mm512_set1_epi32((int)pairs[u][t + 1]), y);
                            }
                        }
                    }
                    for (int u = 0; u < RUN_PV && v0 + u < count; u++) {
                        const int v = v0 + u;
                        const int r = r0 + (nr == 1 ? 0 : v / group), h = kv * group + (nr == 1 ? g0 + v : v % group);
                        float *o = out + (int64_t)r * out_stride + (int64_t)h * head_dim + 16 * c;
                        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_add_ps(even[u], odd[u]), _mm512_set1_ps(inv[v])));
                    }
                }
            }
            if (nr > 1) break; /* whole rows: every head of the group done */
        }
    }
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
#ifdef HAVE_BF16_PATH
    const int fast = is_bf16 && head_dim % 32 == 0 && head_dim <= 16 * MAX_CHUNKS && heads_per_task <= MAX_HEADS;
#else
    const int fast = 0;
#endif
    /* Tasks: (first row, rows, part, is_run). A run of RUN_MIN or more consecutive rows of one
     * sequence (same block table, context growing by one) is split into as few row chunks (of
     * RUN_MIN rows or more) as keep every thread busy — each chunk packs the context again — and
     * is a task per chunk and kv head (part); any other row is a task per head split (part). */
    const int chunks_per_run = (2 * threads + num_kv_heads - 1) / num_kv_heads;
    int (*tasks)[4] = malloc(sizeof(int[4]) * (size_t)num_seqs * (splits > num_kv_heads ? splits : num_kv_heads));
    int num_tasks = 0, longest_chunk = 0;
    for (int b = 0; b < num_seqs;) {
        int run = 1;
        while (fast && b + run < num_seqs && ctx_lens[b + run] == ctx_lens[b + run - 1] + 1 &&
               !memcmp(block_tables + (int64_t)b * table_width, block_tables + (int64_t)(b + run) * table_width,
                       sizeof(int64_t) * table_width))
            run++;
        if (run >= RUN_MIN) {
            const int chunks = run / RUN_MIN < chunks_per_run ? run / RUN_MIN : chunks_per_run;
            const int chunk = (run + chunks - 1) / chunks; /* the last chunk: RUN_MIN rows or more */
            for (int r = b; r < b + run; r += chunk) {
                const int rows = b + run - r < chunk ? b + run - r : chunk;
                longest_chunk = rows > longest_chunk ? rows : longest_chunk;
                for (int kv = 0; kv < num_kv_heads; kv++, num_tasks++)
                    tasks[num_tasks][0] = r, tasks[num_tasks][1] = rows, tasks[num_tasks][2] = kv,
                    tasks[num_tasks][3] = 1;
            }
        } else {
            for (int i = 0; i < run; i++)
                for (int part = 0; part < splits; part++, num_tasks++)
                    tasks[num_tasks][0] = b + i, tasks[num_tasks][1] = 1, tasks[num_tasks][2] = part,
                    tasks[num_tasks][3] = 0;
        }
        b += run;
    }
    /* per thread: scores, one widened cache row, and a task's queries and outputs in fp32; for
     * runs, the packed context (keys and values) and the chunk's outputs */
    const size_t run_floats =
        longest_chunk ? 2 * run_pack_floats((int)longest, head_dim) + (size_t)longest_chunk * width : 0;
    const int score_rows = longest_chunk && heads_per_task < RUN_VECTORS ? RUN_VECTORS : heads_per_task;
    const size_t per_thread =
        (size_t)(score_rows * (longest + 32) + num_kv_heads * head_dim + 2 * width) + run_floats;
    float *scratch = tasks ? malloc(sizeof(float) * per_thread * (size_t)threads) : 0;
    if (!scratch) {
        free(tasks);
        return -1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int task = 0; task < num_tasks; task++) {
        float *scores = scratch + per_thread * (size_t)omp_get_thread_num();
        float *row = scores + score_rows * (longest + 32);
        float *qf = row + num_kv_heads * head_dim, *of = qf + width;
        const int b = tasks[task][0], part = tasks[task][2];
        const int64_t *table = block_tables + (int64_t)b * table_width;
        int first, count;
#ifdef HAVE_BF16_PATH
        if (tasks[task][3]) { /* a run of tasks[task][1] rows */
            const int rows = tasks[task][1];
            uint32_t *kt = (uint32_t *)(of + width), *vp = kt + run_pack_floats((int)longest, head_dim);
            float *run_out = (float *)(vp + run_pack_floats((int)longest, head_dim));
            const void *q0 = q_bf16 ? (const void *)((const uint16_t *)q + b * q_stride)
                                    : (const void *)((const float *)q + b * q_stride);
            attend_run_bf16(q0, q_bf16, q_stride, k_cache, v_cache, table, ctx_lens + b, rows, window, part,
                            num_kv_heads, head_dim, group, block_size, scale, softcap, scores, kt, vp, run_out,
                            width);
            first = part * group * head_dim, count = group * head_dim;
            for (int r = 0; r < rows; r++) {
                const float *src = run_out + (int64_t)r * width;
                if (out_bf16) {
                    uint16_t *dst = (uint16_t *)out + (b + r) * out_stride;
#pragma omp simd
                    for (int i = first; i < first + count; i++) dst[i] = float_to_bf16(src[i]);
                } else {
                    memcpy((float *)out + (b + r) * out_stride + first, src + first, sizeof(float) * count);
                }
            }
            continue;
        }
#endif
        const int h0 = part * heads_per_task;
        first = h0 * head_dim, count = heads_per_task * head_dim;
        if (q_bf16) {
            const uint16_t *src = (const uint16_t *)q + b * q_stride;
#pragma omp simd
            for (int i = first; i < first + count; i++) qf[i] = bf16_to_float(src[i]);
        } else {
            memcpy(qf + first, (const float *)q + b * q_stride + first, sizeof(float) * count);
        }
        const int ctx_len = (int)ctx_lens[b];
        const int start = (window > 0 && ctx_len > window) ? ctx_len - window : 0;
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
    free(tasks);
    free(scratch);
    return 0;
}
