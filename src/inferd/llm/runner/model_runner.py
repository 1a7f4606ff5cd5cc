"""ModelRunner: a scheduled batch → flat tensors → one forward → logits of the sampled positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferd.config.engine import LLMConfig
from inferd.llm.models.loader import LoadedModel
from inferd.llm.runner.attention import AttentionBatch, PrefillSpan, attention_batch
from inferd.llm.runner.kernels import kv_scale_cache, native_ops, packed_key_cache

# A short prefill chunk goes through the native paged kernel as query rows (each token a query over
# its own causal context, read in place from the cache; consecutive rows of a chunk share one packing
# of the context) rather than SDPA, whose CPU flash attention costs ~180 us of fixed overhead per call
# and layer. The rows' cost grows with the query-position pairs they walk. Measured against SDPA on
# bf16 SmolLM2 (9 heads, 3 kv heads), in the same process: layer by layer, the two meet near 1800
# pairs (a 60-token prompt); where a step whose tokens are all rows runs every layer in one native
# call (bf16, see decoder_step.c), it depends on the CPU. With AMX (an Intel Xeon) a 40/100/220-token
# prefill step takes 0.71/0.78/0.89x the SDPA step's time and a 300-token one 1.13x, so up to ~220
# tokens. With AVX512-BF16 and no AMX (an AMD EPYC), the rows win at every length measured: 0.74x at
# 220 tokens, 0.69x at 300, 0.57x at 2048 (torch's flash attention is the slow part there), so up to
# a whole 2048-token chunk without cached context; longer spans were not measured and keep SDPA.
#
# Those thresholds are for speed only, and they cost determinism: SDPA and the row kernel round
# differently, so a token's logits would depend on whether its prompt chunk crossed the line — a
# prompt alone (one long chunk, SDPA) and the same prompt after a prefix-cache hit or chunked (short
# chunks, rows) could then greedily answer differently. Every other step of the bf16 native path
# computes each row in an order that does not depend on the other rows (the linear kernels
# accumulate K in a fixed order per row and split only columns across threads; norms, rope and
# attention are per row, the bf16 attention with one arithmetic for a decode and a prefill run
# alike, see paged_decode.c), so with LLMConfig.batch_invariant (the default) such a step sends
# every chunk through the rows: its results are bitwise the same however the batch was made up. (fp32
# runs its linear layers through torch's matmul, whose reduction depends on the row count.)
NATIVE_ROW_PAIRS = 1800
NATIVE_ROW_PAIRS_ONE_CALL_AMX = 24576
NATIVE_ROW_PAIRS_ONE_CALL = 2048 * 2049 // 2


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's share of a step: ``token_ids`` computed at positions from ``num_computed``;
    logits are returned for its last ``num_logits`` positions (1 to sample, all of them for prompt
    logprobs, 0 for a prefill chunk that does not reach the end)."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    num_logits: int


class ModelRunner:
    """Owns the KV cache tensors and runs forwards; knows nothing about requests or scheduling."""

    def __init__(self, loaded: LoadedModel, config: LLMConfig, num_blocks: int) -> None:
        self.model = loaded.model
        self.decoder = loaded.decoder
        # Decodes attend in place over the paged cache when the native kernels load (CPU, fp32/bf16);
        # a bf16 decoder also runs its element-wise steps through them.
        self.native = None
        native = config.native_kernels and config.device == "cpu"
        if native and loaded.facts.dtype in (torch.float32, torch.bfloat16):
            self.native = native_ops()
        self.facts = loaded.facts
        one_call = self.native is not None and self.native.has_linear and self.facts.dtype == torch.bfloat16
        self.row_pairs = NATIVE_ROW_PAIRS
        # Whether a row's logits depend on nothing but its request (see above).
        self.batch_invariant = False
        if one_call:
            self.row_pairs = NATIVE_ROW_PAIRS_ONE_CALL_AMX if self.native.amx else NATIVE_ROW_PAIRS_ONE_CALL
            # Where the row kernel has its vectorised bf16 path (head_dim a multiple of 32, at most
            # 256; its scalar fallback would make long prompts slow) and the forward is inferd's own
            # (transformers' classes run torch's matmuls). Chunks over 2048 tokens
            # (--max-num-batched-tokens above it) take the rows too, unmeasured against SDPA.
            vectorised = self.facts.head_dim % 32 == 0 and self.facts.head_dim <= 256
            if config.batch_invariant and vectorised and self.decoder is not None:
                self.row_pairs = float("inf")
                self.batch_invariant = True
        # int8 caches are read by the native row kernel alone (the loader refused where it cannot run)
        self.kv_int8 = self.facts.kv_int8
        if self.kv_int8:
            if not (one_call and self.decoder is not None):
                raise RuntimeError("int8 KV caches need inferd's bf16 forward on the native kernels")
            self.row_pairs = float("inf")
            self.batch_invariant = True  # every chunk through the rows, as batch_invariant does
        self.block_size = config.block_size
        self.device = config.device
        self.num_blocks = num_blocks
        # One slot past the blocks is kept zeroed: padding positions of a decode batch read it.
        # Masked positions still pass through softmax(weights) @ V, where 0 × NaN is NaN, so they
        # must never read uninitialised memory.
        self.null_slot = num_blocks * config.block_size
        shape = (self.null_slot + 1, self.facts.num_kv_heads, self.facts.head_dim)
        # torch.empty: on Linux the pages are committed as blocks are first written, not up front.
        # Where the native bf16 attention reads them, keys are kept packed by block (see
        # kernels.packed_key_cache): it copies a block's keys at each step instead of transposing
        # them. The null slot opens one more block there.
        # An int8 cache (--kv-cache-dtype int8) keeps its keys packed the same way, in int8, with a
        # float32 scale per cached vector beside (kernels.kv_scale_cache).
        packed_keys = (
            self.native is not None
            and self.facts.dtype == torch.bfloat16
            and self.native.packs_keys(self.facts.head_dim, config.block_size)
        )
        if self.kv_int8 and not packed_keys:
            raise RuntimeError("int8 KV caches need the packed key layout of this build's attention")
        cache_dtype = torch.int8 if self.kv_int8 else self.facts.dtype
        kv_heads, head_dim = self.facts.num_kv_heads, self.facts.head_dim
        self.kv_caches = []
        self.kv_scales = [] if self.kv_int8 else None
        for _ in range(self.facts.num_layers):
            if packed_keys:
                k_cache = packed_key_cache(
                    num_blocks + 1, kv_heads, head_dim, config.block_size, self.device, cache_dtype
                )
                k_cache[num_blocks].zero_()
            else:
                k_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
                k_cache[self.null_slot].zero_()
            v_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
            v_cache[self.null_slot].zero_()
            self.kv_caches.append((k_cache, v_cache))
            if self.kv_scales is not None:
                scales = kv_scale_cache(num_blocks + 1, kv_heads, config.block_size, self.device)
                scales[num_blocks].zero_()
                self.kv_scales.append(scales)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns float32 logits: each chunk's ``num_logits`` rows, in order."""
        input_ids, positions, logits_idx, batch = self.prepare_inputs(chunks)
        with attention_batch(batch):
            if self.decoder is not None:
                return self.decoder(input_ids, positions, logits_idx).float()
            output = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=logits_idx,
            )
        return output.logits[0].float()

    def prepare_inputs(self, chunks: list[ScheduledChunk]):
        """Flat ids, positions, the rows whose logits are needed, and the attention layout."""
        lengths = np.array([len(c.token_ids) for c in chunks])
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=int(lengths.sum()))
        positions = np.concatenate(
            [np.arange(c.num_computed, c.num_computed + len(c.token_ids)) for c in chunks]
        )
        tables = self._padded_tables(chunks)
        owner = np.repeat(np.arange(len(chunks)), lengths)
        slots = tables[owner, positions // self.block_size] * self.block_size + positions % self.block_size
        logits_idx = [
            int(i)
            for s, n, c in zip(starts, lengths, chunks, strict=True)
            for i in range(s + n - c.num_logits, s + n)
        ]
        batch = AttentionBatch(
            kv_caches=self.kv_caches,
            slot_mapping=self._tensor(slots),
            block_size=self.block_size,
            native=self.native,
            kv_scales=self.kv_scales,
        )
        as_rows = self._as_rows(chunks, lengths)
        self._add_rows(batch, chunks, lengths, starts, tables, as_rows)
        self._add_prefills(batch, chunks, lengths, starts, tables, as_rows)
        return self._tensor(ids), self._tensor(positions), self._tensor(np.array(logits_idx)), batch

    def _as_rows(self, chunks, lengths) -> np.ndarray:
        """Which chunks attend as query rows: decodes always; short prefills with the native kernel."""
        if self.native is None:
            return lengths == 1
        num_ctx = np.array([c.num_computed for c in chunks]) + lengths
        pairs = lengths * (num_ctx - (lengths - 1) / 2)  # query-position pairs of the causal span
        return (lengths == 1) | (pairs <= self.row_pairs)

    def _add_rows(self, batch, chunks, lengths, starts, tables, as_rows) -> None:
        seqs = np.flatnonzero(as_rows)
        if not len(seqs):
            return
        counts = lengths[seqs]
        owner = np.repeat(seqs, counts)
        # each row's index within its sequence's new tokens: 0..count-1
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        num_computed = np.array([chunks[s].num_computed for s in seqs])
        ctx_lens = np.repeat(num_computed, counts) + within + 1
        batch.row_idx = self._tensor(starts[owner] + within)
        batch.row_ctx_lens = self._tensor(ctx_lens)
        if self.native is not None:
            batch.all_rows = len(seqs) == len(chunks)
            batch.row_tables = self._tensor(tables[owner])
            return
        slots = self._context_slots(tables[owner], int(ctx_lens.max()))
        slots[np.arange(slots.shape[1])[None, :] >= ctx_lens[:, None]] = self.null_slot
        batch.row_ctx_slots = self._tensor(slots)

    def _add_prefills(self, batch, chunks, lengths, starts, tables, as_rows) -> None:
        for row in np.flatnonzero(~as_rows):
            chunk = chunks[row]
            num_ctx = chunk.num_computed + len(chunk.token_ids)
            ctx_slots = None
            if chunk.num_computed:
                ctx_slots = self._tensor(self._context_slots(tables[row : row + 1], num_ctx)[0])
            batch.prefills.append(PrefillSpan(int(starts[row]), int(lengths[row]), num_ctx, ctx_slots))

    def _padded_tables(self, chunks: list[ScheduledChunk]) -> np.ndarray:
        width = max(len(c.block_table) for c in chunks)
        tables = np.zeros((len(chunks), width), dtype=np.int64)
        for row, chunk in enumerate(chunks):
            tables[row, : len(chunk.block_table)] = chunk.block_table
        return tables

    def _context_slots(self, tables: np.ndarray, num_positions: int) -> np.ndarray:
        """(rows, num_positions) cache slots of positions 0.. for each block table row."""
        offsets = np.arange(self.block_size)
        slots = (tables[:, :, None] * self.block_size + offsets).reshape(len(tables), -1)
        return slots[:, :num_positions]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)
