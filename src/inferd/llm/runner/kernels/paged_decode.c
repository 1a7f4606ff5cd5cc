/* Paged decode attention for the CPU: one query token per sequence, attending over that
 * sequence's cached keys and values read in place from the paged cache (no gather copy).
 *
 * Cache layout: (num_slots, num_kv_heads, head_dim), slot = block * block_size + offset; or for
 * the keys, where packed_keys_take says so, packed by block (see there); in bf16, fp32, or int8
 * with a scale per slot and kv head (--kv-cache-dtype int8, see packed_keys_take).
 * Query heads are grouped over kv heads as transformers' repeat_kv does: kv head j serves query
 * heads j * group .. (j + 1) * group - 1. Work is split over (sequence, kv head) pairs with
 * OpenMP; torch ships libgomp.so.1, so this library shares torch's thread pool.
 *
 * Built with the package, one library per instruction-set level (setup.py, kernels/variants.py).
 * q may be fp32 or bf16 and strided (rows of a fused qkv output); out fp32 or bf16.
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

/* The first position a row of context length len attends: len - window with a window shorter than
 * the context, else 0. */
static inline int window_start(int len, int window) { return window > 0 && len > window ? len - window : 0; }

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

/* The bf16-cache path (AVX512-BF16; sizes the driver needs on every CPU). */
#define RUN_SPLIT 4    /* fewest rows of a run's chunk when a run is split across threads */
#define RUN_VECTORS 12 /* query vectors scored together */
#define RUN_PV 6       /* query vectors accumulating p . v together */
#define PV_CHUNKS 4    /* 16-dim chunks of those vectors accumulated together */
#ifndef PACKED_AHEAD
#define PACKED_AHEAD 2 /* 16-position blocks between a packed key block copied and one prefetched */
#endif
#ifndef PACKED_AHEAD_INT8
#define PACKED_AHEAD_INT8 3 /* the same for int8 caches (half the bytes a block: 3 and 4 measured 0.94-0.97x the time of 2 at 200-600 positions, 1.03x at 50) */
#endif

/* Scratch floats of a run's packed keys (16-position blocks of head_dim / 2 dword pairs each) and
 * value-row pointers over at most ctx_len positions from a multiple of 16, rounded to 16 floats. */
static size_t run_keys_floats(int ctx_len, int head_dim) { return (size_t)((ctx_len + 15) / 16) * 8 * head_dim; }
static size_t run_rows_floats(int ctx_len) { return ((size_t)2 * ctx_len + 15) / 16 * 16; }
/* ... and, for an int8 cache, each position's key scale (times the softmax scale), value scale and
 * its reciprocal (three arrays of a third each); and a run's value pairs (pack_values). */
static size_t run_scale_floats(int ctx_len) { return (size_t)3 * ((ctx_len + 15) / 16 + 1) * 16; }
static size_t run_values_floats(int ctx_len, int head_dim) { return ((size_t)(ctx_len + 1) / 2 * head_dim + 15) / 16 * 16; }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PATH 1
#define MAX_HEADS 64
#define MAX_CHUNKS 16 /* head_dim up to 256 */

/* Every row of a bf16 or int8 cache — a decode, a prefill chunk's rows, a row alone or among hundreds —
 * goes through attend_run_bf16 below, with the same arithmetic per query vector: a row's output
 * depends only on its query and its context, never on which other rows shared its call, how a
 * prompt was chunked or whether part of it came from the prefix cache (batch invariance; the
 * linear kernels keep the same property). Consecutive rows of one sequence (a prefill chunk: row
 * i attends positions ..len_0 + i - 1) share one packing of their kv head's context; a decode row
 * is a run of one.
 *
 * The keys are packed in blocks of 16 positions, aligned to absolute positions (so the packing,
 * and with it every sum, is the same whichever row a run starts at), as dword pairs (kt: for each
 * pair of dims, the 16 positions' pairs side by side; transposed from plain key rows, copied from
 * packed ones): a query vector scores 16 positions with head_dim / 2 dot-pair instructions
 * (vdpbf16ps) and no horizontal sums, each score summed over the dims in order. p . v runs on the
 * same instruction: the softmax weights rounded to bf16 (as flash attention does on GPUs), two
 * positions a step, the pairs aligned to absolute positions and added in order; the total they
 * are divided by is the sum of those rounded weights (for an int8 cache, each rounded weight
 * with its value scale divided out again), so rounding leaves no systematic scale on the output
 * (perplexity of the bundled model as with fp32 weights, within the gate's noise; prefill runs
 * ~0.8x the time). A run of several rows pairs its values once (pack_values), a decode as it
 * reads them. */

/* An int8 cache's key scales of kv head kv's slots in cache block `block` from slot `at` (its value
 * scales follow block_size floats on): kv_scales is (blocks, kv_heads, 2, block_size). */
static inline const float *slot_scales(const float *kv_scales, int64_t block, int kv, int num_kv_heads, int block_size,
                                       int64_t at) {
    return kv_scales + (block * num_kv_heads + kv) * 2 * block_size + at;
}

/* Prefetch the packed keys and the values of kv head kv at the 16 positions from pos (two 8-slot
 * halves), those below last; values of esz bytes (2: bf16, 1: int8, whose scales come too). */
static inline void prefetch_packed(const char *k_bytes, const char *v_bytes, const float *kv_scales, int esz,
                                   const int64_t *table, int pos, int last, int kv, int num_kv_heads, int head_dim,
                                   int block_size) {
    const int64_t row = (int64_t)block_size * 2 * esz; /* bytes of one dim pair's row in a packed block */
    const int64_t slot_stride = (int64_t)num_kv_heads * head_dim * esz, packed_stride = num_kv_heads * row * (head_dim / 2);
    const int step = row >= 64 ? 1 : (int)(64 / row); /* rows a cache line holds */
    for (int h = 0; h < 2; h++, pos += 8) {
        if (pos >= last) break;
        const int64_t cache_block = table[pos / block_size], at = pos % block_size;
        const char *k_next = k_bytes + cache_block * packed_stride + kv * row * (head_dim / 2) + at * 2 * esz;
        for (int j = 0; j < head_dim / 2; j += step) _mm_prefetch(k_next + j * row, _MM_HINT_T0);
        const char *v_next = v_bytes + (cache_block * block_size + at) * slot_stride + (int64_t)kv * head_dim * esz;
        for (int slot = 0; slot < 8; slot++)
            for (int byte = 0; byte < head_dim * esz; byte += 64) _mm_prefetch(v_next + slot * slot_stride + byte, _MM_HINT_T0);
        if (kv_scales) { /* this half's key scales and value scales (one line when blocks are 8 slots) */
            const float *scales = slot_scales(kv_scales, cache_block, kv, num_kv_heads, block_size, at);
            _mm_prefetch((const char *)scales, _MM_HINT_T0);
            if (block_size > 8) _mm_prefetch((const char *)(scales + block_size), _MM_HINT_T0);
        }
    }
}

/* Keys of positions first..last - 1 of kv head kv (first a multiple of 16) packed into kt, block
 * by block (positions past last in the final block are zeros), and each position's value row
 * in vrow. With k_packed the key cache already holds that layout per cache block (see
 * packed_keys_take): a 16-position block is two 8-slot halves copied side by side; else each
 * position's key row is read and 16 rows are transposed. With kv_scales the caches hold int8
 * (see packed_keys_take; always packed keys): each key pair is widened to bf16 as it is copied (exactly:
 * an int8 is a bf16), each position's key scale times `scale` goes to ks, its value scale to vs and
 * that scale's reciprocal to vinv (zeros past last, so a weight of zero there stays zero; vinv 0
 * for a scale of 0). */
static void pack_run(const void *k_cache, const void *v_cache, const float *kv_scales, int k_packed,
                     const int64_t *table, int first, int last, int kv, int num_kv_heads, int head_dim, int block_size,
                     float scale, uint32_t *kt, const char **vrow, float *ks, float *vs, float *vinv) {
    const int half = head_dim / 2, blocks = (last - first + 15) / 16, esz = kv_scales ? 1 : 2;
    const int64_t slot_stride = (int64_t)num_kv_heads * head_dim;
    /* a packed block's keys of this kv head: half rows of block_size pairs */
    const int64_t row = (int64_t)block_size * 2 * esz, packed_stride = num_kv_heads * row * half;
    const int64_t packed_head = kv * row * half;
    const char *k_bytes = (const char *)k_cache, *v_bytes = (const char *)v_cache;
    /* each position's row in the caches, walking the block table a block at a time; the same row
     * of the next block is prefetched a block ahead (the jump between blocks is what the hardware
     * prefetcher cannot guess) */
    const int64_t head = (int64_t)kv * head_dim;
    const int last_blk = (last - 1) / block_size;
    int blk = first / block_size, in_block = first % block_size;
    int64_t offset = (table[blk] * block_size + in_block) * slot_stride + head;
    int64_t ahead = blk < last_blk ? table[blk + 1] : -1;
    for (int b = 0; b < blocks; b++) {
        const uint16_t *krow[16];
        for (int lane = 0; lane < 16; lane++) {
            const int pos = first + 16 * b + lane;
            if (pos >= last) {
                krow[lane] = 0;
                continue;
            }
            /* (plain key rows only: packed keys are read per block below) */
            krow[lane] = k_packed ? 0 : (const uint16_t *)k_cache + offset, vrow[pos - first] = v_bytes + offset * esz;
            if (ahead >= 0) {
                const int64_t at = (ahead * block_size + in_block) * slot_stride + head;
                /* packed keys: this position's share of the next block's keys */
                const char *k_ahead = k_packed ? k_bytes + ahead * packed_stride + packed_head + (int64_t)in_block * head_dim * esz
                                               : (const char *)((const uint16_t *)k_cache + at);
                for (int byte = 0; byte < head_dim * esz; byte += 64) {
                    _mm_prefetch(k_ahead + byte, _MM_HINT_T0);
                    _mm_prefetch(v_bytes + at * esz + byte, _MM_HINT_T0);
                }
            }
            if (++in_block == block_size) {
                in_block = 0, blk++;
                offset = blk <= last_blk ? table[blk] * block_size * slot_stride + head : 0;
                ahead = blk < last_blk ? table[blk + 1] : -1;
            } else {
                offset += slot_stride;
            }
        }
        uint32_t *kb = kt + (size_t)b * 16 * half;
        if (k_packed) {
            const char *src[2];
            __mmask8 valid[2];
            for (int h = 0; h < 2; h++) {
                const int pos = first + 16 * b + 8 * h, n = last - pos < 8 ? last - pos : 8;
                valid[h] = n > 0 ? (__mmask8)((1u << n) - 1) : 0;
                src[h] = n > 0 ? k_bytes + table[pos / block_size] * packed_stride + packed_head + pos % block_size * 2 * esz
                               : k_bytes;
                if (kv_scales) { /* the 8 slots' scales of this half: (block, kv head, [k | v], slot) */
                    const float *at = n > 0 ? slot_scales(kv_scales, table[pos / block_size], kv, num_kv_heads, block_size,
                                                          pos % block_size)
                                            : kv_scales;
                    _mm256_storeu_ps(ks + 16 * b + 8 * h, _mm256_mul_ps(_mm256_maskz_loadu_ps(valid[h], at), _mm256_set1_ps(scale)));
                    const __m256 v_scales = _mm256_maskz_loadu_ps(valid[h], at + block_size);
                    _mm256_storeu_ps(vs + 16 * b + 8 * h, v_scales);
                    const __mmask8 nonzero = _mm256_cmp_ps_mask(v_scales, _mm256_setzero_ps(), _CMP_NEQ_OQ);
                    _mm256_storeu_ps(vinv + 16 * b + 8 * h, _mm256_maskz_div_ps(nonzero, _mm256_set1_ps(1.f), v_scales));
                }
            }
            /* the keys and values of the 16 positions PACKED_AHEAD blocks on, from memory while
             * these are copied (a slot block's keys are one contiguous run here); the first
             * blocks' before the first copy */
            const int ahead_blocks = kv_scales ? PACKED_AHEAD_INT8 : PACKED_AHEAD;
            if (b == 0)
                for (int a = 0; a < ahead_blocks; a++)
                    prefetch_packed(k_bytes, v_bytes, kv_scales, esz, table, first + 16 * a, last, kv, num_kv_heads,
                                    head_dim, block_size);
            prefetch_packed(k_bytes, v_bytes, kv_scales, esz, table, first + 16 * (b + ahead_blocks), last, kv,
                            num_kv_heads, head_dim, block_size);
            if (kv_scales) {
                /* byte masks: each valid slot's pair of int8 values (valid slots come first) */
                const __mmask16 lo_valid = (__mmask16)(((1u << (2 * __builtin_popcount(valid[0]))) - 1) & 0xffff);
                const __mmask16 hi_valid = (__mmask16)(((1u << (2 * __builtin_popcount(valid[1]))) - 1) & 0xffff);
                for (int j = 0; j < half; j++) {
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lo_valid, src[0] + j * row)));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(hi_valid, src[1] + j * row)));
                    _mm512_storeu_si512(kb + (size_t)j * 16, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                }
                continue;
            }
            for (int j = 0; j < half; j++) {
                const __m256i lo = _mm256_maskz_loadu_epi32(valid[0], src[0] + j * row);
                const __m256i hi = _mm256_maskz_loadu_epi32(valid[1], src[1] + j * row);
                _mm512_storeu_si512(kb + (size_t)j * 16, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
            }
            continue;
        }
        for (int c = 0; c < half / 16; c++) { /* dword pairs 16c..16c + 15 of the 16 positions */
            __m512i r[16];
            for (int lane = 0; lane < 16; lane++)
                r[lane] = krow[lane] ? _mm512_loadu_si512(krow[lane] + 32 * c) : _mm512_setzero_si512();
            transpose16(r);
            for (int j = 0; j < 16; j++) _mm512_storeu_si512(kb + (size_t)(16 * c + j) * 16, r[j]);
        }
    }
}

/* One vector's 16 scores of block b (acc, before scaling) stored, and its lane-wise peaks updated
 * (reduced across lanes once, after the last block: the same maximum); ks: an int8
 * cache's key scales times the softmax scale per position (pack_run), else NULL. */
static inline __attribute__((always_inline)) void score_finish(__m512 acc, int v, int b, int b0, const int *lo,
                                                               const int *hi, float scale, const float *ks,
                                                               float softcap, float *scores, int span, __m512 *peak) {
    __m512 x = _mm512_mul_ps(acc, ks ? _mm512_loadu_ps(ks + 16 * b) : _mm512_set1_ps(scale));
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
    peak[v] = _mm512_max_ps(peak[v], x);
}

/* Blocks b..b + nb - 1 (nb <= 4) scored side by side. */
static inline __attribute__((always_inline)) void score_group(const int count, const int nb,
                                                              const uint32_t (*qp)[MAX_CHUNKS * 8], const uint32_t *kt,
                                                              int half, int b, int b0, const int *lo, const int *hi,
                                                              float scale, const float *ks, float softcap,
                                                              float *scores, int span, __m512 *peak) {
    __m512 acc[4][RUN_VECTORS];
#pragma GCC unroll 4
    for (int i = 0; i < nb; i++)
#pragma GCC unroll 12
        for (int v = 0; v < count; v++) acc[i][v] = _mm512_setzero_ps();
    for (int j = 0; j < half; j++) {
        __m512bh k[4];
#pragma GCC unroll 4
        for (int i = 0; i < nb; i++) k[i] = (__m512bh)_mm512_loadu_si512(kt + ((size_t)(b + i) * half + j) * 16);
#pragma GCC unroll 12
        for (int v = 0; v < count; v++) {
            const __m512bh q = (__m512bh)_mm512_set1_epi32((int)qp[v][j]);
#pragma GCC unroll 4
            for (int i = 0; i < nb; i++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], q, k[i]);
        }
    }
    for (int i = 0; i < nb; i++)
        for (int v = 0; v < count; v++) score_finish(acc[i][v], v, b + i, b0, lo, hi, scale, ks, softcap, scores, span, peak);
}

/* Scores of `count` query vectors (qp: their dword pairs) over packed blocks b0..b1 - 1 into
 * scores (span floats a vector), -inf outside each vector's positions lo..hi - 1, and each
 * vector's peak into peak. Inlined per constant count, so the accumulators live in registers.
 * Each score is a chain of head_dim / 2 dependent dot-pair steps: with few vectors, `per` blocks
 * are scored side by side so that enough chains run at once (every sum keeps its order). */
static inline __attribute__((always_inline)) void score_blocks(const int count, const uint32_t (*qp)[MAX_CHUNKS * 8],
                                                               const uint32_t *kt, int half, int b0, int b1,
                                                               const int *lo, const int *hi, float scale,
                                                               const float *ks, float softcap, float *scores, int span,
                                                               float *peak) {
    __m512 lanes[RUN_VECTORS];
    const int per = count >= 6 ? 1 : count >= 3 ? 12 / count : 4; /* blocks side by side */
    for (int v = 0; v < count; v++) lanes[v] = _mm512_set1_ps(-INFINITY);
    int b = b0;
    for (; b + per <= b1; b += per)
        score_group(count, per, qp, kt, half, b, b0, lo, hi, scale, ks, softcap, scores, span, lanes);
    for (; b < b1; b++) score_group(count, 1, qp, kt, half, b, b0, lo, hi, scale, ks, softcap, scores, span, lanes);
    for (int v = 0; v < count; v++) peak[v] = _mm512_reduce_max_ps(lanes[v]);
}

#define SCORE_CASE(N)                                                                                       \
    case N:                                                                                                 \
        score_blocks(N, qp, kt, half, b0, b1, lo, hi, scale, ks, softcap, scores, span, peak);                  \
        break;

/* The value pairs of two positions for dims 16 (c + i) .. + 15, as dot-pair operands: dword d holds
 * (a[d], b[d]) in bf16; a, b: value rows (bf16, or int8 widened exactly), b NULL for zeros. */
static inline __attribute__((always_inline)) __m512bh value_pairs(const int int8, const char *a, const char *b, int at) {
    if (int8) {
        const __m128i x = _mm_loadu_si128((const __m128i *)(a + at)), y = b ? _mm_loadu_si128((const __m128i *)(b + at)) : _mm_setzero_si128();
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(x, y)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(x, y)));
        return _mm512_cvtne2ps_pbh(hi, lo);
    }
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                         36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a + at)));
    const __m512i y = b ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)((const uint16_t *)b + at)))
                        : _mm512_setzero_si512();
    return (__m512bh)_mm512_permutex2var_epi16(x, idx, y);
}

/* The value pairs of positions first.. first + count - 1 (vrow, relative to first) for every dim,
 * packed once for a run of several rows, which reads them once per pass of RUN_VECTORS vectors:
 * pair i (positions 2i, 2i + 1; zeros past count) at vt + i * head_dim, as value_pairs gives them. */
static void pack_values(const int int8, const char *const *vrow, int count, int head_dim, uint32_t *vt) {
    for (int l = 0; l < count; l += 2)
        for (int d = 0; d < head_dim; d += 16)
            _mm512_storeu_si512(vt + (size_t)(l / 2) * head_dim + d,
                                (__m512i)value_pairs(int8, vrow[l], l + 1 < count ? vrow[l + 1] : 0, d));
}

/* p . v of n (1..RUN_PV) vectors for 16 x nc dims (chunks c..c + nc - 1): their weights sp (bf16,
 * relative to position first + l0, l0 even) times the value rows of positions l0..l1 - 1 (vrow,
 * relative to first; bf16, or int8 with each position's scale already in its weight), summed in
 * fp32 two positions a dot-pair step, pair by pair in order; out[u] + 16 i = sum * inv[u] for
 * chunk c + i. A weight of zero (a position outside a vector's range, or past l1 in the last pair,
 * whose value is zeros or, from vt, the next position's) adds exactly nothing. The chunks run side by side: each sum is a chain of
 * dependent steps, one per pair. */
static inline __attribute__((always_inline)) void pv_rows(const int n, const int nc, const int int8,
                                                          const uint16_t *const *sp, const char *const *vrow,
                                                          const uint32_t *vt, int head_dim, int c, int l0, int l1,
                                                          const float *inv, float *const *out) {
    __m512 acc[RUN_PV][PV_CHUNKS];
#pragma GCC unroll 6
    for (int u = 0; u < n; u++)
#pragma GCC unroll 4
        for (int i = 0; i < nc; i++) acc[u][i] = _mm512_setzero_ps();
    for (int l = l0; l < l1; l += 2) {
        __m512bh v[PV_CHUNKS];
        const char *second = l + 1 < l1 ? vrow[l + 1] : 0;
#pragma GCC unroll 4
        for (int i = 0; i < nc; i++)
            v[i] = vt ? (__m512bh)_mm512_loadu_si512(vt + (size_t)(l / 2) * head_dim + 16 * (c + i))
                      : value_pairs(int8, vrow[l], second, 16 * (c + i));
#pragma GCC unroll 6
        for (int u = 0; u < n; u++) {
            uint32_t pair;
            memcpy(&pair, sp[u] + (l - l0), sizeof(pair));
            const __m512bh p = (__m512bh)_mm512_set1_epi32((int)pair);
#pragma GCC unroll 4
            for (int i = 0; i < nc; i++) acc[u][i] = _mm512_dpbf16_ps(acc[u][i], p, v[i]);
        }
    }
    for (int u = 0; u < n; u++)
        for (int i = 0; i < nc; i++) _mm512_storeu_ps(out[u] + 16 * i, _mm512_mul_ps(acc[u][i], _mm512_set1_ps(inv[u])));
}

#define PV_CASE(N)                                                                                          \
    case N:                                                                                                 \
        if (nc == PV_CHUNKS && int8)                                                                        \
            pv_rows(N, PV_CHUNKS, 1, sp, vrow, vt, head_dim, c, 16 * b0, l1, inv + v0, o);                                \
        else if (nc == PV_CHUNKS)                                                                           \
            pv_rows(N, PV_CHUNKS, 0, sp, vrow, vt, head_dim, c, 16 * b0, l1, inv + v0, o);                                \
        else if (int8)                                                                                      \
            pv_rows(N, 2, 1, sp, vrow, vt, head_dim, c, 16 * b0, l1, inv + v0, o);                                        \
        else                                                                                                \
            pv_rows(N, 2, 0, sp, vrow, vt, head_dim, c, 16 * b0, l1, inv + v0, o);                                        \
        break;

/* kv_scales: the caches hold int8 (see pack_run), else bf16; ks, vs, vinv: scratch for pack_run's
 * scales; vt: scratch for pack_values. */
static void attend_run_bf16(const void *q, int q_bf16, int64_t q_stride, const void *k_cache, const void *v_cache,
                            const float *kv_scales, int k_packed, const int64_t *table, const int64_t *ctx_lens, int rows,
                            int window, int kv, int num_kv_heads, int head_dim, int group, int block_size,
                            float scale, float softcap, float *scores, uint32_t *kt, const char **vrow, float *ks,
                            float *vs, float *vinv, uint32_t *vt, float *out, int64_t out_stride, const int64_t *next_table,
                            const int64_t *next_lens, int next_rows, int next_kv) {
    const int half = head_dim / 2, wide = head_dim / 16, int8 = kv_scales != 0;
    const int first_len = (int)ctx_lens[0], last_len = (int)ctx_lens[rows - 1];
    const int first = window_start(first_len, window) / 16 * 16;
    pack_run(k_cache, v_cache, kv_scales, k_packed, table, first, last_len, kv, num_kv_heads, head_dim, block_size,
             scale, kt, vrow, ks, vs, vinv);
    if (!int8) ks = 0; /* scores scaled by `scale` alone */
    /* several rows read the values once a pass: paired once here; a decode pairs them as it goes */
    if (rows > 1)
        pack_values(int8, vrow, last_len - first, head_dim, vt);
    else
        vt = 0;
    if (k_packed && next_table) {
        const int next_len = (int)next_lens[0], next_last = (int)next_lens[next_rows - 1];
        const int next_first = window_start(next_len, window) / 16 * 16;
        for (int a = 0; a < (int8 ? PACKED_AHEAD_INT8 : PACKED_AHEAD); a++)
            prefetch_packed((const char *)k_cache, (const char *)v_cache, kv_scales, int8 ? 1 : 2, next_table,
                            next_first + 16 * a, next_last, next_kv, num_kv_heads, head_dim, block_size);
    }
    /* RUN_VECTORS query vectors (rows x the kv head's query heads) at a time: each packed key and
     * value vector loaded is used by all of them (register blocking; L2 bandwidth bound otherwise). */
    const int per_pass = group >= RUN_VECTORS ? 1 : RUN_VECTORS / group;
    for (int r0 = 0; r0 < rows; r0 += per_pass) {
        const int nr = rows - r0 < per_pass ? rows - r0 : per_pass;
        const int nv = nr * group < RUN_VECTORS ? nr * group : RUN_VECTORS;
        for (int g0 = 0; g0 < group; g0 += nv) { /* more than RUN_VECTORS query heads per kv head: in turns */
            const int ng = group - g0 < nv ? group - g0 : nv, count = nr == 1 ? ng : nr * group;
            uint32_t qp[RUN_VECTORS][MAX_CHUNKS * 8];
            int lo[RUN_VECTORS], hi[RUN_VECTORS]; /* each vector's positions lo..hi - 1, relative to first */
            for (int v = 0; v < count; v++) {
                const int r = r0 + (nr == 1 ? 0 : v / group), h = kv * group + (nr == 1 ? g0 + v : v % group);
                const int len = (int)ctx_lens[r];
                lo[v] = window_start(len, window) - first;
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
            switch (count) {
                SCORE_CASE(1) SCORE_CASE(2) SCORE_CASE(3) SCORE_CASE(4) SCORE_CASE(5) SCORE_CASE(6)
                SCORE_CASE(7) SCORE_CASE(8) SCORE_CASE(9) SCORE_CASE(10) SCORE_CASE(11) SCORE_CASE(12)
            }
            /* softmax weights, unnormalised, kept in bf16 (times an int8 cache's value scales) for the
             * dot-pair p . v, over the first half of the vector's scores (written behind what is
             * read); each vector's total summed lane-wise over its 16-position blocks in order, then
             * across lanes (blocks past its positions add zeros) */
            float inv[RUN_VECTORS];
            for (int v = 0; v < count; v++) {
                float *sv = scores + (size_t)v * span;
                const __m512 top = _mm512_set1_ps(peak[v]), none = _mm512_set1_ps(-INFINITY);
                __m512 total = _mm512_setzero_ps();
                for (int l = 0; l < span; l += 16) {
                    const __m512 x = _mm512_loadu_ps(sv + l);
                    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, none, _CMP_NEQ_OQ), exp_nonpositive16(_mm512_sub_ps(x, top)));
                    const __m512 scales = int8 ? _mm512_loadu_ps(vs + 16 * b0 + l) : _mm512_set1_ps(1.f);
                    const __m256bh wb = _mm512_cvtneps_pbh(int8 ? _mm512_mul_ps(e, scales) : e);
                    _mm256_storeu_si256((__m256i *)((uint16_t *)sv + l), (__m256i)wb);
                    /* the total of the weights p . v will use (a value scale divided out again; where
                     * it is 0 the values are zeros and the weight e itself): the rounded weights
                     * then sum to exactly the total, no systematic scale on the output */
                    __m512 used = _mm512_cvtpbh_ps(wb);
                    if (int8)
                        used = _mm512_mask_mul_ps(e, _mm512_cmp_ps_mask(scales, _mm512_setzero_ps(), _CMP_NEQ_OQ), used,
                                                  _mm512_loadu_ps(vinv + 16 * b0 + l));
                    total = _mm512_add_ps(total, used);
                }
                inv[v] = 1.f / _mm512_reduce_add_ps(total);
            }
            /* p . v for up to RUN_PV vectors and 16 x PV_CHUNKS dims at a time, over the positions any of them attends */
            const int l1 = hi[count - 1];
            for (int v0 = 0; v0 < count; v0 += RUN_PV) {
                const int n = count - v0 < RUN_PV ? count - v0 : RUN_PV;
                const uint16_t *sp[RUN_PV];
                for (int u = 0; u < n; u++) sp[u] = (const uint16_t *)(scores + (size_t)(v0 + u) * span);
                for (int c = 0; c < wide; c += PV_CHUNKS) {
                    /* 4 or, at the end, 2: head_dim is a multiple of 32 here, so wide is even (PV_CASE) */
                    const int nc = wide - c < PV_CHUNKS ? wide - c : PV_CHUNKS;
                    float *o[RUN_PV];
                    for (int u = 0; u < n; u++) {
                        const int v = v0 + u;
                        const int r = r0 + (nr == 1 ? 0 : v / group), h = kv * group + (nr == 1 ? g0 + v : v % group);
                        o[u] = out + (int64_t)r * out_stride + (int64_t)h * head_dim + 16 * c;
                    }
                    switch (n) { PV_CASE(1) PV_CASE(2) PV_CASE(3) PV_CASE(4) PV_CASE(5) PV_CASE(6) }
                }
            }
            if (nr > 1) break; /* whole rows: every head of the group done */
        }
    }
}
#endif

/* 1 when a bf16 key cache of heads of head_dim in blocks of block_size slots may be kept packed
 * for this library's bf16 path: per cache block and kv head, head_dim / 2 rows of block_size
 * dwords, row j holding every slot's dims 2j, 2j + 1 — (blocks, kv_heads, head_dim / 2,
 * block_size, 2) in bf16. Attention then copies a slot block's keys instead of transposing them
 * from per-slot rows at every step; rope_and_cache_bf16 writes them so.
 * The same answer says whether it reads int8 caches (paged_decode_attention's kv_scales): keys
 * (blocks, kv_heads, head_dim / 2, block_size, 2) int8, values (slots, kv_heads, head_dim) int8,
 * each quantised per slot and kv head (symmetric: scale = max |x| / 127, values round(x / scale),
 * as rope_and_cache_bf16 writes them), and kv_scales (blocks, kv_heads, 2, block_size) float32:
 * the key scales, then the value scales, of a block's slots. */
int packed_keys_take(int head_dim, int block_size) {
#ifdef HAVE_BF16_PATH
    return head_dim > 0 && head_dim % 32 == 0 && head_dim <= 16 * MAX_CHUNKS && block_size > 0 && block_size % 8 == 0;
#else
    (void)head_dim, (void)block_size;
    return 0;
#endif
}

/* q: (num_seqs, num_heads * head_dim) rows q_stride elements apart, fp32 or bf16 (q_bf16);
 * out: rows out_stride elements apart, fp32 or bf16 (out_bf16).
 * block_tables: (num_seqs, table_width); ctx_lens: (num_seqs,) positions 0..len-1 are attended.
 * window > 0 limits attention to the last `window` positions; softcap > 0 applies tanh capping.
 * k_packed: the key cache is in the packed layout (only where packed_keys_take says so).
 * kv_scales: the caches hold int8 with these scales (packed_keys_take; k_packed, is_bf16 ignored).
 * Returns 0, -1 when scratch memory could not be allocated, -2 when k_packed or kv_scales cannot
 * be read here. */
int paged_decode_attention(const void *q, int q_bf16, int64_t q_stride, const void *k_cache,
                           const void *v_cache, int is_bf16, int k_packed, const int64_t *block_tables,
                           int table_width, const int64_t *ctx_lens, int num_seqs, int num_heads,
                           int num_kv_heads, int head_dim, int block_size, float scale, int window,
                           float softcap, void *out, int out_bf16, int64_t out_stride, const float *kv_scales) {
    const int group = num_heads / num_kv_heads, width = num_heads * head_dim;
    const int threads = omp_get_max_threads();
    /* The portable path: whole sequences per task read each cache row once; split by kv head only
     * when there are too few sequences to keep every thread busy. */
    const int splits = num_seqs >= 2 * threads ? 1 : num_kv_heads;
    const int heads_per_task = num_heads / splits;
    int64_t longest = 1;
    for (int b = 0; b < num_seqs; b++) longest = ctx_lens[b] > longest ? ctx_lens[b] : longest;
    if (kv_scales && !(k_packed && packed_keys_take(head_dim, block_size))) return -2;
#ifdef HAVE_BF16_PATH
    const int fast = (is_bf16 || kv_scales) && head_dim % 32 == 0 && head_dim <= 16 * MAX_CHUNKS;
#else
    const int fast = 0;
#endif
    if (k_packed && !(fast && packed_keys_take(head_dim, block_size))) return -2;
    /* Tasks: (first row, rows, part, is_run). On the bf16 path every row is part of a run:
     * consecutive rows of one sequence (same block table, context growing by one; a decode is a
     * run of one), split into as few row chunks (of RUN_SPLIT rows or more) as keep every thread
     * busy — each chunk packs the context again — and a task per chunk and kv head (part). On the
     * portable path each row is a task per head split (part). */
    const int chunks_per_run = (2 * threads + num_kv_heads - 1) / num_kv_heads;
    int (*tasks)[4] = malloc(sizeof(int[4]) * (size_t)num_seqs * (splits > num_kv_heads ? splits : num_kv_heads));
    int num_tasks = 0, longest_chunk = 0;
    for (int b = 0; b < num_seqs && tasks;) {
        int run = 1;
        while (fast && b + run < num_seqs && ctx_lens[b + run] == ctx_lens[b + run - 1] + 1 &&
               !memcmp(block_tables + (int64_t)b * table_width, block_tables + (int64_t)(b + run) * table_width,
                       sizeof(int64_t) * table_width))
            run++;
        if (fast) {
            const int most = run / RUN_SPLIT < 1 ? 1 : run / RUN_SPLIT;
            const int chunks = most < chunks_per_run ? most : chunks_per_run;
            const int chunk = (run + chunks - 1) / chunks; /* the last chunk: RUN_SPLIT rows or more */
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
     * runs, the packed keys, the value-row pointers, an int8 cache's scales, the value pairs and
     * the chunk's outputs (each area a multiple of 16 floats, so every thread's share and the pointers in it
     * stay aligned) */
    const size_t values_floats = longest_chunk > 1 ? run_values_floats((int)longest, head_dim) : 0; /* pack_values */
    const size_t run_floats = longest_chunk ? run_keys_floats((int)longest, head_dim) + run_rows_floats((int)longest) +
                                                  run_scale_floats((int)longest) + values_floats +
                                                  (size_t)longest_chunk * width
                                            : 0;
    const int score_rows = longest_chunk && heads_per_task < RUN_VECTORS ? RUN_VECTORS : heads_per_task;
    const size_t base_floats = ((size_t)(score_rows * (longest + 32) + num_kv_heads * head_dim + 2 * width) + 15) / 16 * 16;
    const size_t per_thread = base_floats + run_floats;
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
            uint32_t *kt = (uint32_t *)(scores + base_floats);
            const char **vrow = (const char **)(kt + run_keys_floats((int)longest, head_dim));
            float *ks = (float *)vrow + run_rows_floats((int)longest), *vs = ks + run_scale_floats((int)longest) / 3;
            float *vinv = vs + run_scale_floats((int)longest) / 3;
            uint32_t *vt = (uint32_t *)(ks + run_scale_floats((int)longest));
            float *run_out = (float *)(vt + values_floats);
            const void *q0 = q_bf16 ? (const void *)((const uint16_t *)q + b * q_stride)
                                    : (const void *)((const float *)q + b * q_stride);
            /* a guess at the task this thread takes next (schedule(dynamic, 1): the threads mostly take
             * turns): its first keys and values are prefetched once this one's are read; a wrong
             * guess only fetches lines another thread reads */
            const int next = task + threads, has_next = next < num_tasks && tasks[next][3];
            const int64_t *next_table = has_next ? block_tables + (int64_t)tasks[next][0] * table_width : 0;
            attend_run_bf16(q0, q_bf16, q_stride, k_cache, v_cache, kv_scales, k_packed, table, ctx_lens + b, rows,
                            window, part, num_kv_heads, head_dim, group, block_size, scale, softcap, scores, kt, vrow,
                            ks, vs, vinv, vt, run_out, width, next_table, has_next ? ctx_lens + tasks[next][0] : 0, has_next ? tasks[next][1] : 0,
                            has_next ? tasks[next][2] : 0);
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
        const int start = window_start(ctx_len, window);
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
