/* Every decoder layer of a step in one native call (bf16, AMX or AVX512-BF16 linears, query rows over the paged
 * cache): the same kernels the Python layer calls one by one, without the Python, ctypes and
 * allocation cost between them (about 0.1 ms a layer, a sixth of a one-stream decode step).
 *
 * Used when every token of the step attends as a query row (decodes and short prefills, see
 * model_runner.NATIVE_ROW_PAIRS); longer prefills go through SDPA and the per-op Python path. */
#include <stdint.h>
#include <stdlib.h>

/* The kernels from the other sources of this library. */
void add_rms_norm_bf16(uint16_t *residual, const uint16_t *delta, const uint16_t *weight, float eps,
                       int rows, int dim, uint16_t *out);
void silu_mul_bf16(const uint16_t *gate_up, int rows, int width, uint16_t *out);
void rope_and_cache_bf16(uint16_t *qkv, int tokens, int qkv_stride, int num_heads, int num_kv_heads,
                         int head_dim, const float *cos, const float *sin, const int64_t *slots,
                         int k_block, void *k_cache, void *v_cache, float *kv_scales);
void linear_bf16(const uint16_t *x, int64_t x_stride, int m, int k, const uint16_t *packed, int n,
                     const float *bias, void *out, int64_t out_stride, int out_fp32);
int linear_int8(const uint16_t *x, int64_t x_stride, int m, int k, const int8_t *packed, const float *scale,
                int n, const float *bias, void *out, int64_t out_stride, int out_fp32);
int linear_gated(const uint16_t *x, int64_t x_stride, int m, int k, const void *packed, const float *scale,
                 int width, void *out, int64_t out_stride);
int paged_decode_attention(const void *q, int q_bf16, int64_t q_stride, const void *k_cache,
                           const void *v_cache, int is_bf16, int k_packed, const int64_t *block_tables,
                           int table_width, const int64_t *ctx_lens, int num_seqs, int num_heads,
                           int num_kv_heads, int head_dim, int block_size, float scale, int window,
                           float softcap, void *out, int out_bf16, int64_t out_stride, const float *kv_scales);

/* One layer's weights (packed for linear_bf16, see bf16_linear.c; biases float32 or NULL) and caches; mirrored
 * by LayerWeights in __init__.py. */
typedef struct {
    const uint16_t *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down; /* bf16, or int8 where the scale below is set */
    const float *qkv_bias, *o_bias;
    void *k_cache, *v_cache; /* bf16, or int8 where kv_scales is set (paged_decode.c, packed_keys_take) */
    int64_t window; /* 0: full attention */
    /* per-column scales when that matrix holds int8 weights (linear_int8), else NULL */
    const float *qkv_scale, *o_scale, *gate_up_scale, *down_scale;
    float *kv_scales;
} layer_weights;

/* One matrix of a layer: bf16 weights through linear_bf16, int8 ones (scale given) through linear_int8.
 * Returns 0, -1 when scratch memory ran out. */
static int layer_linear(const uint16_t *x, int m, int k, const void *w, const float *scale, int n,
                        const float *bias, uint16_t *out) {
    if (scale) return linear_int8(x, k, m, k, w, scale, n, bias, out, n, 0) ? -1 : 0;
    linear_bf16(x, k, m, k, w, n, bias, out, n, 0);
    return 0;
}

/* hidden: (tokens, hidden_size) residual stream, updated in place; delta: (tokens, hidden_size),
 * on entry the previous layer's output or ignored when has_delta is 0, on return the last layer's
 * MLP output (not yet added to hidden). cos, sin: (tokens, head_dim) float32; slots: each token's
 * cache slot; tables (tokens, table_width) and ctx_lens (tokens,): each token's sequence's block
 * table and the positions it attends (0..len-1); k_packed: the key caches are packed
 * (paged_decode.c, packed_keys_take). Returns 0, -1 when scratch memory ran out, -2 when packed keys cannot be read here. */
int decoder_layers_bf16(const layer_weights *layers, int num_layers, uint16_t *hidden, uint16_t *delta,
                        int has_delta, int tokens, int hidden_size, int intermediate, int num_heads,
                        int num_kv_heads, int head_dim, float eps, float scale, const float *cos,
                        const float *sin, const int64_t *slots, const int64_t *tables, int table_width,
                        const int64_t *ctx_lens, int block_size, int k_packed) {
    const int q_width = num_heads * head_dim, qkv_width = q_width + 2 * num_kv_heads * head_dim;
    for (int l = 0; l < num_layers; l++) /* int8 caches are packed: before any cache is written */
        if (layers[l].kv_scales && !k_packed) return -2;
    const int64_t per_token = (int64_t)hidden_size + qkv_width + q_width + 3 * (int64_t)intermediate;
    uint16_t *scratch = malloc(sizeof(uint16_t) * per_token * tokens);
    if (!scratch) return -1;
    uint16_t *x = scratch, *qkv = x + (int64_t)tokens * hidden_size, *attn = qkv + (int64_t)tokens * qkv_width;
    uint16_t *gate_up = attn + (int64_t)tokens * q_width, *act = gate_up + (int64_t)tokens * 2 * intermediate;
    int status = 0;
    for (int l = 0; l < num_layers; l++) {
        const layer_weights *w = layers + l;
        add_rms_norm_bf16(hidden, (l > 0 || has_delta) ? delta : 0, w->input_norm, eps, tokens, hidden_size, x);
        if ((status = layer_linear(x, tokens, hidden_size, w->qkv, w->qkv_scale, qkv_width, w->qkv_bias, qkv))) break;
        rope_and_cache_bf16(qkv, tokens, qkv_width, num_heads, num_kv_heads, head_dim, cos, sin, slots,
                            k_packed ? block_size : 0, w->k_cache, w->v_cache, w->kv_scales);
        status = paged_decode_attention(qkv, 1, qkv_width, w->k_cache, w->v_cache, 1, k_packed, tables, table_width,
                                        ctx_lens, tokens, num_heads, num_kv_heads, head_dim, block_size, scale,
                                        (int)w->window, 0.f, attn, 1, q_width, w->kv_scales);
        if (status) break;
        /* delta was consumed by the first norm: it takes o_proj's output, then the MLP's */
        if ((status = layer_linear(attn, tokens, q_width, w->o, w->o_scale, hidden_size, w->o_bias, delta))) break;
        add_rms_norm_bf16(hidden, delta, w->post_norm, eps, tokens, hidden_size, x);
        /* silu(gate) * up straight from the gate_up layer's registers where the kernel can */
        status = linear_gated(x, hidden_size, tokens, hidden_size, w->gate_up, w->gate_up_scale, intermediate, act,
                              intermediate);
        if (status == -3) {
            status = layer_linear(x, tokens, hidden_size, w->gate_up, w->gate_up_scale, 2 * intermediate, 0, gate_up);
            if (!status) silu_mul_bf16(gate_up, tokens, intermediate, act);
        }
        if (status) break;
        status = layer_linear(act, tokens, intermediate, w->down, w->down_scale, hidden_size, 0, delta);
    }
    free(scratch);
    return status;
}
