"""Paged attention, registered in transformers' attention interface.

transformers' model classes compute projections, rotary embeddings and MLPs; at each attention call
they hand us the step's packed queries and new keys/values (batch 1, every sequence's new tokens
concatenated, no padding). We write the new keys/values into the paged cache and attend each
sequence over its own cached context. The step's layout comes from an ``AttentionBatch`` the model
runner installs for the duration of a forward.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inferd.llm.runner.kernels import packed_key_block

ATTENTION_NAME = "inferd_attention"
_current = threading.local()


@dataclass(slots=True)
class PrefillSpan:
    """A sequence with several new tokens: ``num_new`` queries at the end of ``num_ctx`` positions."""

    start: int  # first token in the packed batch
    num_new: int
    num_ctx: int
    ctx_slots: torch.Tensor | None  # cache slots of all num_ctx positions; None when all are new


@dataclass(slots=True)
class AttentionBatch:
    """The layout of one forward: where new K/V go and which context each query attends to."""

    # per layer (keys, values): (num_slots, kv_heads, head_dim) each, or the keys packed by block
    # for the native bf16 attention (kernels.packed_key_cache; read and write them with keys_at
    # and store_keys)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor  # (num_tokens,) cache slot of each new token
    block_size: int = 16
    # Query rows attended one by one over the paged cache: every decode token and, with the native
    # kernel, every token of a short prefill too (each row with its own context length, so the causal
    # mask is just that length). Longer prefills go to SDPA as PrefillSpans.
    row_idx: torch.Tensor | None = None  # (num_rows,) packed index of each such query row
    row_ctx_slots: torch.Tensor | None = None  # (num_rows, longest) cache slots, padded (torch path)
    row_ctx_lens: torch.Tensor | None = None  # (num_rows,) positions 0..len-1 are attended
    row_tables: torch.Tensor | None = None  # (num_rows, width) the row's sequence's block table (kernel)
    native: object = None  # the native kernels (NativeOps) when the runner has them
    all_rows: bool = False  # every token of the batch is such a row: no gather, no scatter
    prefills: list[PrefillSpan] = field(default_factory=list)
    # per layer, the scales of int8 caches (kernels.kv_scale_cache): only the native attention reads
    # them, so every token of such a batch is a native query row; None: caches in the model's dtype
    kv_scales: list[torch.Tensor] | None = None
    _masks: dict = field(default_factory=dict)

    def row_mask(self, window: int | None) -> torch.Tensor:
        """(num_rows, 1, 1, longest) True where a row's query may attend."""
        key = ("rows", window)
        if key not in self._masks:
            positions = torch.arange(self.row_ctx_slots.shape[1], device=self.slot_mapping.device)
            lens = self.row_ctx_lens[:, None]
            mask = positions[None, :] < lens
            if window is not None:
                mask &= positions[None, :] >= lens - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, span: PrefillSpan, window: int | None) -> torch.Tensor | None:
        """(num_new, num_ctx) causal mask offset by the cached context; None when plain causal works."""
        if span.ctx_slots is None and window is None:
            return None
        key = (span.start, window)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(span.num_ctx - span.num_new, span.num_ctx, device=device)[:, None]
            k_pos = torch.arange(span.num_ctx, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[key] = mask
        return self._masks[key]


@contextmanager
def attention_batch(batch: AttentionBatch):
    _current.batch = batch
    try:
        yield
    finally:
        _current.batch = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention-interface entry: query (1, H, T, D), key/value (1, KVH, T, D), post-rotary."""
    # Models pass their window and soft cap as arguments (Mistral, Gemma 2) or keep them on the module.
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap", getattr(module.config, "attn_logit_softcapping", None))
    out = attend_paged(
        module.layer_idx,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling,
        window,
        softcap,
    )
    return out.unsqueeze(0), None


def attend_paged(layer_idx, q, k, v, scaling=None, window=None, softcap=None) -> torch.Tensor:
    """Store the step's new keys/values in layer ``layer_idx``'s cache and attend every query to its
    own sequence's context. q (T, H, D), k/v (T, KVH, D) packed; returns (T, H, D)."""
    batch: AttentionBatch = _current.batch
    if batch.kv_scales is not None:
        raise RuntimeError("int8 KV caches are written by the native bf16 path only (attend_fused_qkv)")
    k_cache, v_cache = batch.kv_caches[layer_idx]
    k = k.to(k_cache.dtype)
    v = v.to(v_cache.dtype)
    store_keys(k_cache, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    return _attend_stored(batch, k_cache, v_cache, q, k, v, scaling, window, softcap)


def attend_fused_qkv(
    layer_idx, qkv, num_heads, num_kv_heads, head_dim, cos, sin, scaling, window
) -> torch.Tensor:
    """The native path of a bf16 decoder layer: rotary embedding and the cache store in one pass over
    the fused qkv rows (T, (H + 2 KVH) D), then attention reading q where it lies; returns (T, H, D)."""
    batch: AttentionBatch = _current.batch
    k_cache, v_cache = batch.kv_caches[layer_idx]
    scales = None if batch.kv_scales is None else batch.kv_scales[layer_idx]
    batch.native.rope_and_cache(
        qkv, num_heads, num_kv_heads, head_dim, cos, sin, batch.slot_mapping, k_cache, v_cache, scales
    )
    tokens, q_width, kv_width = qkv.shape[0], num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_width].view(tokens, num_heads, head_dim)
    k = qkv[:, q_width : q_width + kv_width].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_width + kv_width :].view(tokens, num_kv_heads, head_dim)
    return _attend_stored(batch, k_cache, v_cache, q, k, v, scaling, window, None, scales)


def current_batch() -> AttentionBatch | None:
    return getattr(_current, "batch", None)


def _attend_stored(batch, k_cache, v_cache, q, k, v, scaling, window, softcap, scales=None) -> torch.Tensor:
    """Attention once the step's keys and values are in the cache (and in k, v for prefills)."""
    native = batch.native is not None and batch.row_idx is not None
    if native and batch.all_rows:
        return _rows_native(batch, k_cache, v_cache, q, scaling, window, softcap, scales)
    if scales is not None:
        raise RuntimeError("int8 KV caches are read by the native attention only: every token must be a row")
    out = q.new_empty(q.shape)
    if native:
        out[batch.row_idx] = _rows_native(batch, k_cache, v_cache, q, scaling, window, softcap)
    elif batch.row_idx is not None:
        ctx_k = keys_at(k_cache, batch.row_ctx_slots).transpose(1, 2)  # (B, KVH, L, D)
        ctx_v = v_cache[batch.row_ctx_slots].transpose(1, 2)
        queries = q[batch.row_idx].unsqueeze(2)  # (B, H, 1, D)
        attended = _attend(queries, ctx_k, ctx_v, batch.row_mask(window), scaling, softcap, False)
        out[batch.row_idx] = attended.squeeze(2)
    for span in batch.prefills:
        end = span.start + span.num_new
        if span.ctx_slots is None:
            ctx_k, ctx_v = k[span.start : end], v[span.start : end]
        else:
            ctx_k, ctx_v = keys_at(k_cache, span.ctx_slots), v_cache[span.ctx_slots]
        mask = batch.prefill_mask(span, window)
        attended = _attend(
            q[span.start : end].transpose(0, 1)[None],
            ctx_k.transpose(0, 1)[None],
            ctx_v.transpose(0, 1)[None],
            mask,
            scaling,
            softcap,
            mask is None,
        )
        out[span.start : end] = attended[0].transpose(0, 1)
    return out


def _rows_native(batch, k_cache, v_cache, q, scaling, window, softcap, scales=None) -> torch.Tensor:
    """The query rows attended in place over the paged cache by the native kernel. q may be a
    strided view (rows of a fused qkv output) as long as each row's heads are contiguous."""
    queries = q if batch.all_rows else q[batch.row_idx]  # (B, H, D)
    num_seqs, num_heads, head_dim = queries.shape
    if queries.dtype not in (torch.float32, torch.bfloat16):
        queries = queries.float()
    if queries.stride(2) != 1 or queries.stride(1) != head_dim:
        queries = queries.contiguous()
    out = queries.new_empty(queries.shape)
    tables = batch.row_tables
    bf16 = torch.bfloat16
    status = batch.native.paged_decode(
        queries.data_ptr(),
        int(queries.dtype == bf16),
        queries.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        int(k_cache.dtype == bf16),
        int(packed_key_block(k_cache) > 0),
        tables.data_ptr(),
        tables.shape[1],
        batch.row_ctx_lens.data_ptr(),
        num_seqs,
        num_heads,
        k_cache.shape[1],
        head_dim,
        batch.block_size,
        scaling if scaling is not None else head_dim**-0.5,
        window or 0,
        softcap or 0.0,
        out.data_ptr(),
        int(out.dtype == bf16),
        out.stride(0),
        None if scales is None else scales.data_ptr(),
    )
    if status == -2:
        raise RuntimeError(f"the {batch.native.variant} build cannot read this key cache (packed or int8)")
    if status != 0:
        raise MemoryError("the decode-attention kernel could not allocate its scratch memory")
    return out.to(q.dtype)


def keys_at(k_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The keys (*slots.shape, kv_heads, head_dim) stored at ``slots`` of a key cache in either
    layout."""
    block = packed_key_block(k_cache)
    if not block:
        return k_cache[slots]
    return k_cache.permute(0, 3, 1, 2, 4)[slots // block, slots % block].flatten(-2)


def store_keys(k_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor) -> None:
    """Write k (tokens, kv_heads, head_dim) at ``slots`` of a key cache in either layout."""
    block = packed_key_block(k_cache)
    if not block:
        k_cache.index_copy_(0, slots, k)
    else:
        k_cache.permute(0, 3, 1, 2, 4)[slots // block, slots % block] = k.unflatten(-1, (-1, 2))


def _attend(q, k, v, mask, scale, softcap, is_causal):
    k, v = k.to(q.dtype), v.to(q.dtype)
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    # Logit soft-capping (Gemma 2) has no fused kernel here: the explicit form.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _no_mask(*args, **kwargs):
    # Masks come from the AttentionBatch; transformers must not build a dense one.
    return None


def register_paged_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
