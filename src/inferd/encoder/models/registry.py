"""Which class loads a model of each kind: a lazy table, imported on first use."""

from __future__ import annotations

import importlib
from pathlib import Path

from inferd.config.engine import EncoderConfig
from inferd.config.model_spec import ModelKind
from inferd.encoder.models.base import EncoderModel
from inferd.errors import ModelLoadError
from inferd.memory.profile import release_freed_memory

_LOADERS: dict[ModelKind, tuple[str, str]] = {
    ModelKind.EMBEDDING: ("inferd.encoder.models.embedder", "SentenceEmbedder"),
    ModelKind.RERANK: ("inferd.encoder.models.cross_encoder", "CrossEncoderModel"),
}


def load_encoder_model(path: Path, files_kind: ModelKind, config: EncoderConfig) -> EncoderModel:
    """Load the model whose files are of ``files_kind`` (what the weights are, not how they are served)."""
    if files_kind not in _LOADERS:
        raise ModelLoadError(f"{path} holds a {files_kind.value} model, which the encoder engine cannot run")
    module_name, class_name = _LOADERS[files_kind]
    model = getattr(importlib.import_module(module_name), class_name)(path, config)
    release_freed_memory()  # the load's temporaries (see release_freed_memory)
    return model
