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
    """A batch as padded tensors, built by the batcher thread while the model runs the previous one."""

    items: list[Item]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None

    def select(self, keep: list[int]) -> PreparedBatch:
        index = torch.tensor(keep, dtype=torch.long)
        return PreparedBatch(
            items=[self.items[i] for i in keep],
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            token_type_ids=None if self.token_type_ids is None else self.token_type_ids[index],
        )


class EncoderModel(Protocol):
    """The engine's view of a model. ``forward`` returns float32 on the CPU: (batch, dim)
    embeddings for an embedder, (batch,) logits for a cross-encoder; it raises on failure and the
    engine fails that batch's requests only."""

    info: EncoderInfo
    tokenizer: InputTokenizer
    uses_token_type_ids: bool

    def forward(self, batch: PreparedBatch) -> torch.Tensor: ...


def prepare_batch(items: list[Item], pad_token_id: int, uses_token_type_ids: bool) -> PreparedBatch:
    """Right-pad the items' ids into tensors (no side effects; runs on the batcher thread)."""
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


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


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
    inputs = {
        "input_ids": batch.input_ids.to(device, non_blocking=True),
        "attention_mask": batch.attention_mask.to(device, non_blocking=True),
    }
    if batch.token_type_ids is not None:
        inputs["token_type_ids"] = batch.token_type_ids.to(device, non_blocking=True)
    return inputs
