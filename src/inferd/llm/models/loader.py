"""Load a causal LM (Hugging Face folder or GGUF file) with inferd's paged attention installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inferd.config.engine import LLMConfig
from inferd.errors import ModelLoadError
from inferd.hub.gguf import converted_gguf
from inferd.llm.models.decoder import Decoder, build_decoder, pack_for_cpu
from inferd.llm.runner.attention import ATTENTION_NAME, register_paged_attention
from inferd.llm.runner.kernels import native_ops
from inferd.memory.profile import release_freed_memory

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

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: torch.nn.Module
    decoder: Decoder | None  # inferd's own forward over the same weights, when it has one
    tokenizer: object
    facts: ModelFacts
    path: Path


def load_causal_lm(path: Path, config: LLMConfig) -> LoadedModel:
    """Load weights and tokenizer; GGUF files are converted once and the conversion reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file() and path.suffix == ".gguf":
        path = converted_gguf(path, Path(config.cache_dir) if config.cache_dir else None)
    register_paged_attention()
    dtype = _DTYPES[config.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=ATTENTION_NAME
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from None
    model = model.to(config.device).eval()
    facts = _facts(model, tokenizer, config, dtype)
    decoder = build_decoder(model) if config.model_impl == "auto" else None
    if decoder is not None and config.device == "cpu" and dtype == torch.bfloat16:
        pack_for_cpu(decoder, native_ops(config.cache_dir) if config.native_kernels else None)
    # Before the KV cache is sized from what is free: the load's temporaries are gone by now.
    release_freed_memory()
    return LoadedModel(model, decoder, tokenizer, facts, path)


def _facts(model, tokenizer, config: LLMConfig, dtype: torch.dtype) -> ModelFacts:
    hf = model.config.get_text_config()
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
        vocab_size=min(len(tokenizer), hf.vocab_size),
        max_model_len=max_model_len,
        eos_token_ids=frozenset(_eos_ids(model, tokenizer)),
        dtype=dtype,
    )


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
