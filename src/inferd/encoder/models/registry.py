"""Which class loads a model of each kind: a lazy table, imported on first use."""

from __future__ import annotations

import importlib
import logging
from dataclasses import replace
from pathlib import Path

from inferd.config.engine import EncoderConfig
from inferd.config.model_spec import ModelKind
from inferd.encoder.models.base import EncoderModel, torch_dtype
from inferd.errors import ModelLoadError
from inferd.memory.profile import release_freed_memory

log = logging.getLogger(__name__)

_LOADERS: dict[ModelKind, tuple[str, str]] = {
    ModelKind.EMBEDDING: ("inferd.encoder.models.embedder", "SentenceEmbedder"),
    ModelKind.RERANK: ("inferd.encoder.models.cross_encoder", "CrossEncoderModel"),
}


def load_encoder_model(path: Path, files_kind: ModelKind, config: EncoderConfig) -> EncoderModel:
    """Load the model whose files are of ``files_kind`` (what the weights are, not how they are served)."""
    if files_kind not in _LOADERS:
        raise ModelLoadError(f"{path} holds a {files_kind.value} model, which the encoder engine cannot run")
    module_name, class_name = _LOADERS[files_kind]
    load = getattr(importlib.import_module(module_name), class_name)
    if config.dtype_gate and config.dtype != "float32":
        model = _faithful(load, path, config)
    else:
        model = load(path, config)
    release_freed_memory()  # the load's temporaries (see release_freed_memory)
    return model


def _faithful(load, path: Path, config: EncoderConfig) -> EncoderModel:
    """The model in ``config.dtype`` where it passes encoder.precision's check, else in float32."""
    from inferd.encoder.precision import switch_if_faithful

    float32 = replace(config, dtype="float32")
    model = load(path, float32)
    verdict = switch_if_faithful(model, torch_dtype(config.dtype))
    if verdict.passed:
        log.info("%s: serving %s (%s)", path, config.dtype, verdict.detail)
        return model
    log.warning(
        "%s: serving float32, not %s, which is not faithful enough to it: %s",
        path,
        config.dtype,
        verdict.detail,
    )
    del model
    return load(path, float32)
