"""Sentence embedders: a sentence-transformers folder (modules.json) or a plain Hugging Face encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from inferd.config.engine import EncoderConfig
from inferd.encoder.attention import ATTENTION_NAME, packed_spans, register_varlen_attention
from inferd.encoder.models.base import (
    EncoderInfo,
    PreparedBatch,
    dtype_name,
    max_input_tokens,
    model_inputs,
    read_json,
    torch_dtype,
)
from inferd.encoder.models.bert import load_packed_bert
from inferd.encoder.pooling import pool, pool_packed, pooling_modes
from inferd.encoder.tokenize import InputTokenizer
from inferd.errors import ModelLoadError
from inferd.hub.inspect import packs_unpadded

log = logging.getLogger(__name__)

# modules.json names classes by import path, which moved across sentence-transformers versions;
# the class name alone is stable.
_SUPPORTED_MODULES = {"Transformer", "Pooling", "Dense", "Normalize"}


class SentenceEmbedder:
    """Transformer → Pooling → Dense* → (Normalize), computed on our own padded batches."""

    def __init__(self, path: Path, config: EncoderConfig) -> None:
        self.device = config.device
        self.dtype = config.dtype
        modules = _read_modules(path)
        transformer_dir = path / modules.get("Transformer", "")
        self.is_packed = _can_pack(transformer_dir)
        # A plain BERT checkpoint runs on inferd's own packed encoder, read straight from its file.
        self.bert, self.transformer = None, None
        if self.is_packed:
            hf_config = _read_config(transformer_dir)
            self.bert = load_packed_bert(transformer_dir, hf_config, torch_dtype(config.dtype), config.device)
        if self.bert is None:
            self.transformer = _load_transformer(transformer_dir, config, self.is_packed)
            hf_config = self.transformer.config
        self.uses_token_type_ids = getattr(hf_config, "type_vocab_size", 0) > 1
        pooling_dir = modules.get("Pooling")
        if pooling_dir is None:
            log.info("%s has no Pooling module; using mean pooling", path)
        self.modes = pooling_modes(read_json(path / pooling_dir / "config.json") if pooling_dir else {})
        self.dense = nn.ModuleList(_load_dense(path / d, config) for d in modules.get("Dense", []))
        st_config = read_json(path / "config_sentence_transformers.json")
        bert_config = read_json(transformer_dir / "sentence_bert_config.json")
        limit = max_input_tokens(transformer_dir, hf_config.to_dict())
        self.tokenizer = InputTokenizer(
            transformer_dir, limit, do_lower_case=bool(bert_config.get("do_lower_case"))
        )
        dimensions = (
            self.dense[-1].out_features if len(self.dense) else hf_config.hidden_size * len(self.modes)
        )
        self.info = EncoderInfo(
            max_input_tokens=limit,
            dimensions=dimensions,
            normalizes="Normalize" in modules,
            scoring="cosine",
            prompts=dict(st_config.get("prompts") or {}),
            default_prompt_name=st_config.get("default_prompt_name"),
        )

    def set_dtype(self, dtype: torch.dtype) -> None:
        # The packed BERT keeps its residual stream in float32 (see bert.py); transformers' model
        # is cast whole. Dense layers stay float32: one small product per text.
        if self.bert is not None:
            self.bert.set_matmul_dtype(dtype)
        else:
            self.transformer.to(dtype)
        self.dtype = dtype_name(dtype)

    def forward(self, batch: PreparedBatch) -> torch.Tensor:
        inputs = model_inputs(batch, self.device)
        if self.bert is not None:
            hidden = self.bert(
                inputs["input_ids"], inputs["position_ids"], inputs.get("token_type_ids"), batch.bounds
            )
            vectors = pool_packed(hidden, batch.bounds, self.modes)
        elif self.is_packed:
            with packed_spans(batch.bounds):
                hidden = self.transformer(**inputs).last_hidden_state[0]
            vectors = pool_packed(hidden.float(), batch.bounds, self.modes)
        else:
            hidden = self.transformer(**inputs).last_hidden_state
            vectors = pool(hidden.float(), inputs["attention_mask"], self.modes)
        for layer in self.dense:  # float32 layers on float32 pooled vectors
            vectors = layer(vectors)
        return vectors.cpu()


class _Dense(nn.Module):
    def __init__(self, linear: nn.Linear, activation: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.activation = activation
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


def _read_modules(path: Path) -> dict:
    """modules.json as {class name: folder}; Dense may repeat, so it maps to a list."""
    entries = read_json(path / "modules.json") if (path / "modules.json").is_file() else []
    modules: dict = {"Transformer": ""} if not entries else {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise ModelLoadError(f"{path}/modules.json: every module needs a type and a path")
        name = entry["type"].rsplit(".", 1)[-1]
        if name not in _SUPPORTED_MODULES:
            raise ModelLoadError(f"{path}: sentence-transformers module {entry['type']} is not supported")
        folder = _module_folder(path, entry.get("path"))
        if name == "Dense":
            modules.setdefault("Dense", []).append(folder)
        else:
            modules[name] = folder
    return modules


def _module_folder(path: Path, folder: object) -> str:
    """A module's folder, kept inside the model folder: a downloaded modules.json must not make us
    read weights or configs from anywhere else on the machine ("../../etc", "/root")."""
    if not isinstance(folder, str):
        raise ModelLoadError(f"{path}/modules.json: a module path must be a string, not {folder!r}")
    if not (path / folder).resolve().is_relative_to(path.resolve()):
        raise ModelLoadError(f"{path}/modules.json: module path {folder!r} lies outside the model folder")
    return folder


def _can_pack(path: Path) -> bool:
    return packs_unpadded(read_json(path / "config.json"))


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the encoder config in {path}: {exc}") from None


def _load_transformer(path: Path, config: EncoderConfig, packed: bool) -> nn.Module:
    from transformers import AutoModel

    extra = {}
    if packed:
        register_varlen_attention()
        extra["attn_implementation"] = ATTENTION_NAME
    try:
        model = AutoModel.from_pretrained(str(path), dtype=torch_dtype(config.dtype), **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a transformer from {path}: {exc}") from None
    return model.to(config.device).eval()


def _load_dense(path: Path, config: EncoderConfig) -> _Dense:
    settings = read_json(path / "config.json")
    linear = nn.Linear(settings["in_features"], settings["out_features"], bias=settings.get("bias", True))
    state = _load_state(path)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    layer = _Dense(linear, _activation(settings.get("activation_function")))
    return layer.to(config.device).eval()  # float32 whatever the encoder's dtype (see set_dtype)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{path}: Dense module has no weights file")


# The activations a Dense module may name: torch.nn's element-wise activations that take no
# arguments. sentence-transformers imports any "torch.*" path it finds in the config and calls it,
# which would let a downloaded model run arbitrary torch functions at load time.
_ACTIVATION_NAMES = ("Identity", "Tanh", "ReLU", "ReLU6", "GELU", "Sigmoid", "SiLU", "Mish", "ELU", "CELU",
                     "SELU", "LeakyReLU", "Softplus", "Softsign", "Tanhshrink", "Hardtanh", "Hardsigmoid",
                     "Hardswish", "LogSigmoid")  # fmt: skip
_ACTIVATIONS = {name: getattr(nn, name) for name in _ACTIVATION_NAMES}
# Where sentence-transformers' saved names point (fullname of the module's class), or the short form.
_ACTIVATION_MODULES = {"torch.nn", "torch.nn.modules.activation", "torch.nn.modules.linear"}


def _activation(name: str | None) -> nn.Module:
    if not name:
        return nn.Identity()
    module_name, _, class_name = name.rpartition(".")
    if module_name not in _ACTIVATION_MODULES or class_name not in _ACTIVATIONS:
        allowed = ", ".join(_ACTIVATIONS)
        raise ModelLoadError(f"Dense activation {name!r} is not supported (torch.nn's {allowed})")
    return _ACTIVATIONS[class_name]()
