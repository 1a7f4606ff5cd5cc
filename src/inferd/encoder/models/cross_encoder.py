"""Cross-encoders: a sequence classifier with one label that scores (query, document) pairs."""

from __future__ import annotations

from pathlib import Path

import torch

from inferd.config.engine import EncoderConfig
from inferd.encoder.models.base import (
    EncoderInfo,
    PreparedBatch,
    dtype_name,
    max_input_tokens,
    model_inputs,
    torch_dtype,
)
from inferd.encoder.tokenize import InputTokenizer
from inferd.errors import ModelLoadError


class CrossEncoderModel:
    """Logits of a one-label ``*ForSequenceClassification``; the client applies the sigmoid."""

    def __init__(self, path: Path, config: EncoderConfig) -> None:
        from transformers import AutoModelForSequenceClassification

        self.device = config.device
        self.dtype = config.dtype
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch_dtype(config.dtype)
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a sequence classifier from {path}: {exc}") from None
        if model.config.num_labels != 1:
            raise ModelLoadError(f"{path} has {model.config.num_labels} labels; a reranker needs exactly one")
        self.model = model.to(config.device).eval()
        self.uses_token_type_ids = getattr(model.config, "type_vocab_size", 0) > 1
        self.is_packed = False  # the classification heads read row 0 of each padded sequence
        limit = max_input_tokens(path, model.config.to_dict())
        self.tokenizer = InputTokenizer(path, limit)
        self.info = EncoderInfo(max_input_tokens=limit, scoring="cross-encoder")

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.model.to(dtype)
        self.dtype = dtype_name(dtype)

    def forward(self, batch: PreparedBatch) -> torch.Tensor:
        logits = self.model(**model_inputs(batch, self.device)).logits
        return logits[:, 0].float().cpu()
