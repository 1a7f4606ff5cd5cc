"""Load a causal LM (Hugging Face folder or GGUF file) with inferd's paged attention installed."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from inferd.config.engine import LLMConfig
from inferd.errors import ModelLoadError
from inferd.hub.gguf import converted_gguf
from inferd.llm.models.checkpoint import load_decoder
from inferd.llm.models.decoder import Decoder, DecoderShape, build_decoder, can_build, pack_for_cpu
from inferd.llm.runner.attention import ATTENTION_NAME, register_paged_attention
from inferd.llm.runner.kernels import native_ops
from inferd.memory.estimate import cache_bytes_per_token
from inferd.memory.profile import release_freed_memory

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the engine needs to know about a loaded model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    dtype: torch.dtype
    kv_int8: bool = False  # the KV cache holds int8 (--kv-cache-dtype int8), else ``dtype``

    def kv_bytes_per_token(self) -> int:
        kv_dtype = "int8" if self.kv_int8 else str(self.dtype)
        return cache_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, kv_dtype)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: torch.nn.Module | None  # transformers' model; None when the decoder was read directly
    decoder: Decoder | None  # inferd's own forward over the same weights, when it has one
    tokenizer: object
    facts: ModelFacts
    path: Path
    config: LLMConfig  # the one loaded under: the server's int8 choices the model cannot run reverted


def load_causal_lm(path: Path, config: LLMConfig) -> LoadedModel:
    """Load weights and tokenizer; GGUF files are converted once and the conversion reused.

    A Llama-family safetensors checkpoint is read straight into inferd's decoder; anything else
    (or ``model_impl="transformers"``) loads through transformers' classes with paged attention."""
    from transformers import AutoTokenizer

    path = _weights_folder(path, config)
    dtype = _DTYPES[config.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from None
    text_config = _text_config(path)
    native = native_ops() if config.native_kernels and config.device == "cpu" else None
    config = _settled(config, text_config, native)
    model, decoder = None, None
    if config.model_impl == "auto":
        decoder = load_decoder(path, text_config, dtype, config.device)
    if decoder is None:
        model = _load_transformers_model(path, dtype, config)
        decoder = build_decoder(model) if config.model_impl == "auto" else None
    if config.kv_cache_dtype == "int8" and (decoder is None or not decoder.fusable):
        # per-head q/k norms (Qwen3's, where _QK_NORMS misses them) keep the torch layer, which
        # cannot write an int8 cache
        why = f"its {text_config.model_type!r} layers run on torch ops (per-head q/k norms), {_NO_INT8_CACHE}"
        config = _settle(config, "kv_cache_dtype", why)
    facts = _facts(text_config, _eos_ids(path, text_config, tokenizer), len(tokenizer), config, dtype)
    if decoder is not None and config.device == "cpu" and dtype == torch.bfloat16:
        pack_for_cpu(decoder, native, config.quantization)
    # Before the KV cache is sized from what is free: the load's temporaries are gone by now.
    release_freed_memory()
    return LoadedModel(model, decoder, tokenizer, facts, path, config)


def settled_config(path: Path, config: LLMConfig) -> LLMConfig:
    """``config`` with the server's int8 choices this model cannot run reverted (a choice made by
    name that it cannot run is refused), read from the model's config alone; load_causal_lm does the
    same, and also reverts an int8 cache for layers it finds only in the weights."""
    native = native_ops() if config.native_kernels and config.device == "cpu" else None
    return _settled(config, _text_config(_weights_folder(path, config)), native)


def _weights_folder(path: Path, config: LLMConfig) -> Path:
    if path.is_file() and path.suffix == ".gguf":
        # Straight into the served dtype (int8 too is made from the bf16 weights: see hub.gguf).
        return converted_gguf(path, Path(config.cache_dir) if config.cache_dir else None, config.dtype)
    return path


def _text_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).get_text_config()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from None


def _settled(config: LLMConfig, text_config, native) -> LLMConfig:
    if config.quantization == "int8":
        config = _settle(config, "quantization", _why_not_int8(config, text_config, native))
    if config.kv_cache_dtype == "int8":
        config = _settle(config, "kv_cache_dtype", _why_not_kv_int8(config, text_config, native))
    return config


_QK_NORMS = frozenset({"qwen3"})  # model types whose layers carry per-head q/k norms
_NO_INT8_CACHE = "not the native bf16 path that reads int8 caches"
_OPTIONS = {"quantization": "--quantization int8", "kv_cache_dtype": "--kv-cache-dtype int8"}


def _settle(config: LLMConfig, field: str, why: str | None) -> LLMConfig:
    """``config`` where its int8 ``field`` can run (``why`` is None); else the server's own choice
    reverted, and one asked for by name refused, before any weight is read where that is known."""
    if why is None:
        return config
    if field in config.auto_precision:
        log.info("%s (auto) does not apply: %s", _OPTIONS[field], why)
        return config.reverted(field)
    raise ModelLoadError(f"{_OPTIONS[field]} cannot serve this model: {why}")


def _why_not_int8(config: LLMConfig, text_config, native) -> str | None:
    """Why --quantization int8 cannot run this model, or None where it can."""
    has_kernel = native is not None and native.has_int8_linear
    why = _not_native_bf16(config, text_config, has_kernel, "a CPU with AVX-512 BF16 and VNNI")
    if why is None:
        shape = DecoderShape.of(text_config)
        widths = (text_config.hidden_size, text_config.intermediate_size, shape.num_heads * shape.head_dim)
        if any(width % 32 for width in widths):
            why = f"its kernel needs input widths that are multiples of 32 (this model: {widths})"
    return why


def _why_not_kv_int8(config: LLMConfig, text_config, native) -> str | None:
    """Why --kv-cache-dtype int8 cannot run this model, or None where it can: the native bf16
    attention with packed keys (paged_decode.c) is the one reader of int8 caches."""
    has_kernel = native is not None and native.has_linear
    why = _not_native_bf16(config, text_config, has_kernel, "a CPU with AVX-512 BF16 (or AMX)")
    if why is None and text_config.model_type in _QK_NORMS:
        why = f"its {text_config.model_type!r} layers run on torch ops (per-head q/k norms), {_NO_INT8_CACHE}"
    if why is None:
        shape = DecoderShape.of(text_config)
        if not native.packs_keys(shape.head_dim, config.block_size):
            why = (
                f"its attention kernel takes head_dim a multiple of 32 up to 256 and blocks of a multiple "
                f"of 8 tokens (this model: head_dim {shape.head_dim}, --block-size {config.block_size})"
            )
    return why


def _not_native_bf16(config: LLMConfig, text_config, has_kernel: bool, cpu: str) -> str | None:
    """Why an option that only inferd's own bf16 forward on its native kernels runs cannot serve
    this model (``has_kernel``: the kernel it needs loaded, else it needs ``cpu``); None if it can."""
    if config.device != "cpu" or config.dtype != "bfloat16":
        return f"it runs on the CPU in bfloat16 (this model: {config.device}, {config.dtype})"
    if not has_kernel:
        return f"it needs the native kernels and {cpu}"
    if config.model_impl != "auto" or not can_build(text_config):
        return (
            f"it runs on inferd's own forward (llama, mistral, qwen2, qwen3), not {text_config.model_type!r}"
        )
    return None


def _load_transformers_model(path: Path, dtype: torch.dtype, config: LLMConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    register_paged_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=ATTENTION_NAME
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from None
    return model.to(config.device).eval()


def _facts(hf, eos_ids: set[int], num_tokens: int, config: LLMConfig, dtype: torch.dtype) -> ModelFacts:
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    context = getattr(hf, "max_position_embeddings", None) or 2048
    max_model_len = min(config.max_model_len or context, context)
    return ModelFacts(
        num_layers=hf.num_hidden_layers,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        # Models often pad their embedding table past the tokenizer (never sample ids nobody can
        # decode); a tokenizer with added tokens the model lacks is bounded by the model instead.
        vocab_size=min(num_tokens, hf.vocab_size),
        max_model_len=max_model_len,
        eos_token_ids=frozenset(eos_ids),
        dtype=dtype,
        kv_int8=config.kv_cache_dtype == "int8",
    )


def _eos_ids(path: Path, hf, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json, config.json and the tokenizer, as
    transformers' generation config gathers them."""
    generation = {}
    with contextlib.suppress(OSError, ValueError):
        generation = json.loads((path / "generation_config.json").read_text())
    ids: set[int] = set()
    for source in (generation.get("eos_token_id"), hf.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
