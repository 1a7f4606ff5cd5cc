"""What every encoder model offers the engine: facts about itself, batch preparation and a forward."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from inferd.encoder.request import Item
from inferd.encoder.tokenize import InputTokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """Facts the API reports and validates against."""

    max_input_tokens: int
    dimensions: int | None = None  # embedding size; None for cross-encoders
    normalizes: bool = False
    scoring: Literal["cross-encoder", "cosine"] | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


@dataclass(slots=True)
class PreparedBatch:
    """A batch as tensors, built by the batcher thread while the model runs the previous one.

    Padded: (batch, longest) ids and mask. Packed: one (1, total) row of every item's tokens, with
    ``position_ids`` restarting at each item and ``bounds`` giving each item's (start, end)."""

    items: list[Item]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    token_type_ids: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    bounds: list[tuple[int, int]] | None = None


class EncoderModel(Protocol):
    """The engine's view of a model. ``forward`` returns float32 on the CPU: (batch, dim)
    embeddings for an embedder, (batch,) logits for a cross-encoder; it raises on failure and the
    engine fails that batch's requests only."""

    info: EncoderInfo
    tokenizer: InputTokenizer
    uses_token_type_ids: bool
    is_packed: bool  # takes unpadded batches (prepare_batch(..., packed=True))
    dtype: str  # what the matrix products run in: a key of _DTYPES

    def forward(self, batch: PreparedBatch) -> torch.Tensor: ...

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Compute in ``dtype`` from now on (encoder.precision decides where that is faithful)."""


def prepare_batch(
    items: list[Item], pad_token_id: int, uses_token_type_ids: bool, packed: bool = False
) -> PreparedBatch:
    """Tensors for ``items``: right-padded, or packed into one row (no side effects)."""
    if packed:
        return _packed_batch(items, uses_token_type_ids)
    longest = max(item.num_tokens for item in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    token_type_ids = torch.zeros((len(items), longest), dtype=torch.long) if uses_token_type_ids else None
    for row, item in enumerate(items):
        n = item.num_tokens
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if token_type_ids is not None and item.token_type_ids is not None:
            token_type_ids[row, :n] = torch.tensor(item.token_type_ids, dtype=torch.long)
    return PreparedBatch(items, input_ids, attention_mask, token_type_ids)


def _packed_batch(items: list[Item], uses_token_type_ids: bool) -> PreparedBatch:
    ids, positions, types, bounds, start = [], [], [], [], 0
    for item in items:
        n = item.num_tokens
        ids.extend(item.input_ids)
        positions.extend(range(n))
        types.extend(item.token_type_ids or [0] * n)
        bounds.append((start, start + n))
        start += n
    row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return PreparedBatch(
        items, row(ids), None, row(types) if uses_token_type_ids else None, row(positions), bounds
    )


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def max_input_tokens(path: Path, config: dict) -> int:
    """The model's input limit: sentence-transformers' max_seq_length (before v6), else the smaller of
    the tokenizer's model_max_length (where v6 keeps it) and the position table."""
    st_limit = read_json(path / "sentence_bert_config.json").get("max_seq_length")
    if st_limit:
        return int(st_limit)
    candidates = [int(config["max_position_embeddings"])] if "max_position_embeddings" in config else []
    tokenizer_limit = read_json(path / "tokenizer_config.json").get("model_max_length")
    if tokenizer_limit and tokenizer_limit < 1_000_000:
        candidates.append(int(tokenizer_limit))
    return min(candidates) if candidates else 512


def model_inputs(batch: PreparedBatch, device: str) -> dict[str, torch.Tensor]:
    named = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "token_type_ids": batch.token_type_ids,
        "position_ids": batch.position_ids,
    }
    return {name: t.to(device, non_blocking=True) for name, t in named.items() if t is not None}
