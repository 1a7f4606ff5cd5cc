"""What a model needs in memory, from its config.json alone: pure functions, no torch, no weights.

Formulas (bytes):
- weights = parameters × bytes per element of the dtype (a GGUF in the dtype it is served in);
- KV cache per token = 2 (K and V) × layers × KV heads × head dim × bytes per element. With
  grouped-query attention KV heads < attention heads; the textbook 2 × layers × hidden × bytes is
  the special case KV heads × head dim = hidden;
- activations: the hidden states of one step's tokens through the widest layer, plus fp32 logits;
- runtime: a fixed allowance (CUDA context and allocator slack on a GPU; tokenizer and Python
  objects on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inferd.errors import ModelLoadError

DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "int8": 1,
    "int4": 0.5,
}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp8": "float8"}

# Fixed allowance per model: a CUDA context, cuBLAS workspaces and allocator slack on a GPU; the
# tokenizer, Python objects and torch's own buffers on the CPU. Measured on the CPU: loading the
# bundled SmolLM2 in fp32 (513 MiB of weights) grows the process by 708 MiB.
RUNTIME_BYTES = {"cpu": 256 * 2**20, "cuda": 512 * 2**20}

# Decoders whose MLP has three matrices (gate, up, down) even when hidden_act does not say so.
_GATED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
     "olmo2", "granite", "cohere", "stablelm", "internlm2", "deepseek_v2", "deepseek_v3", "smollm3"}
)  # fmt: skip


def normalize_dtype(name: str) -> str:
    """``fp16`` → ``float16``; raises ModelLoadError for a dtype with no known size."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower()).removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ModelLoadError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}")
    return key


def dtype_bytes(name: str) -> float:
    return DTYPE_BYTES[normalize_dtype(name)]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of config.json that memory depends on."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    is_causal: bool
    tie_word_embeddings: bool
    is_gated_mlp: bool
    has_qkv_bias: bool
    type_vocab_size: int = 0
    torch_dtype: str | None = None


def shape_from_config(config: dict) -> ModelShape:
    """Read a ModelShape from config.json's dict; ModelLoadError names a missing or bad key."""
    if not isinstance(config, dict):
        raise ModelLoadError("config.json does not hold a JSON object")
    text = {**config, **(config.get("text_config") or {})}
    try:
        return _shape(text, config)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"config.json has a malformed value: {exc}") from None


def _shape(text: dict, config: dict) -> ModelShape:
    architectures = config.get("architectures") or text.get("architectures") or []
    architecture = architectures[0] if architectures else text.get("model_type", "unknown")
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model", "dim"))
    heads = int(_first(text, "num_attention_heads", "n_head", "num_heads"))
    kv_heads = 1 if text.get("multi_query") else text.get("num_key_value_heads") or text.get("n_head_kv")
    model_type = str(text.get("model_type", "unknown"))
    is_causal = any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in architectures)
    return ModelShape(
        architecture=architecture,
        model_type=model_type,
        num_layers=int(_first(text, "num_hidden_layers", "n_layer", "num_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(kv_heads or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate_size=int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
        vocab_size=int(_first(text, "vocab_size")),
        max_position_embeddings=int(
            text.get("max_position_embeddings") or text.get("n_positions") or text.get("seq_length") or 2048
        ),
        is_causal=is_causal,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", not is_causal)),
        is_gated_mlp=model_type in _GATED_MODEL_TYPES or text.get("hidden_act") in ("silu", "swiglu"),
        has_qkv_bias=bool(text.get("attention_bias")) or model_type == "qwen2" or not is_causal,
        type_vocab_size=int(text.get("type_vocab_size") or 0),
        torch_dtype=text.get("torch_dtype") or text.get("dtype"),
    )


def _first(config: dict, *keys: str):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise ModelLoadError(f"config.json has no {keys[0]!r}")


def count_parameters(shape: ModelShape) -> int:
    """Parameters of a standard transformer of this shape (exact for Llama-family and BERT)."""
    h, kv_width = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    q_width = shape.num_heads * shape.head_dim
    attention = h * q_width + 2 * h * kv_width + q_width * h
    mlp = (3 if shape.is_gated_mlp else 2) * h * shape.intermediate_size
    if shape.is_causal:  # RMSNorm: one weight vector per norm
        bias = q_width + 2 * kv_width if shape.has_qkv_bias else 0
        per_layer = attention + bias + mlp + 2 * h
        head = 0 if shape.tie_word_embeddings else shape.vocab_size * h
        return shape.num_layers * per_layer + shape.vocab_size * h + head + h
    # Encoder (BERT family): biases everywhere, LayerNorm weight + bias, learned positions.
    per_layer = attention + (q_width + 2 * kv_width + h) + mlp + (shape.intermediate_size + h) + 4 * h
    embeddings = (shape.vocab_size + shape.max_position_embeddings + shape.type_vocab_size) * h + 2 * h
    pooler = h * h + h if shape.model_type in ("bert", "xlm-roberta", "roberta") else 0
    return shape.num_layers * per_layer + embeddings + pooler


def weight_bytes(num_params: int, dtype: str) -> int:
    return math.ceil(num_params * dtype_bytes(dtype))


def encoder_weight_bytes(shape: ModelShape, num_params: int, dtype: str, packed_bert: bool) -> int:
    """An encoder's weights in ``dtype``. inferd's own BERT (``packed_bert``: a BERT sentence
    embedder that runs packed, hub.inspect.packs_unpadded) takes a reduced dtype in its matrix
    products only: its embedding tables stay float32 (its norms too, and the biases where the
    native linear kernel takes them: a rounding error). Other
    encoders are cast whole; so is a BERT embedder that falls back to transformers' class (another
    tensor layout), planned high by the tables' two bytes a value, never low."""
    if not packed_bert or dtype_bytes(dtype) >= 4:
        return weight_bytes(num_params, dtype)
    tables = (shape.vocab_size + shape.max_position_embeddings + shape.type_vocab_size) * shape.hidden_size
    return math.ceil(tables * 4 + (num_params - tables) * dtype_bytes(dtype))


def int8_weight_bytes(shape: ModelShape, num_params: int, dtype: str) -> int:
    """Weights under ``--quantization int8``: a byte a parameter, but the embedding table stays in
    ``dtype`` (a tied LM head gets an int8 copy of it); float32 scales are a rounding error."""
    embedding = shape.vocab_size * shape.hidden_size
    head_copy = embedding if shape.tie_word_embeddings else 0
    return math.ceil(num_params - embedding + embedding * dtype_bytes(dtype) + head_copy)


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """2 × layers × KV heads × head dim × bytes: what one token of context costs in the KV cache;
    an int8 cache also keeps a float32 scale per key and value vector (as inferd stores it)."""
    return cache_bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, kv_dtype)


def cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """``kv_bytes_per_token`` from the three numbers (the engine's ModelFacts has no ModelShape)."""
    scale = 4 if normalize_dtype(kv_dtype) == "int8" else 0
    return int(2 * num_layers * num_kv_heads * (head_dim * dtype_bytes(kv_dtype) + scale))


def naive_kv_bytes(shape: ModelShape, num_tokens: int, kv_dtype: str) -> int:
    """The textbook 2 × tokens × layers × hidden × bytes, which ignores grouped-query attention."""
    return int(2 * num_tokens * shape.num_layers * shape.hidden_size * dtype_bytes(kv_dtype))


def llm_activation_bytes(shape: ModelShape, num_batched_tokens: int, num_seqs: int, dtype: str) -> int:
    """One engine step: every scheduled token through the widest layer, plus fp32 logits (and the
    sampler's two working copies) for the rows that need a next token."""
    width = 4 * shape.hidden_size + 3 * shape.intermediate_size
    logits = 3 * min(num_seqs, num_batched_tokens) * shape.vocab_size * 4
    return int(num_batched_tokens * width * dtype_bytes(dtype)) + logits


def encoder_activation_bytes(shape: ModelShape, batch_tokens: int, max_len: int, dtype: str) -> int:
    """One padded batch of ``batch_tokens``: the widest layer, plus attention scores when the
    attention materialises them (heads × tokens × sequence length)."""
    width = 4 * shape.hidden_size + 2 * shape.intermediate_size
    scores = shape.num_heads * batch_tokens * min(max_len, shape.max_position_embeddings)
    return int((batch_tokens * width + scores) * dtype_bytes(dtype))


@dataclass(frozen=True, slots=True)
class Estimate:
    """Bytes one model needs for ``context`` tokens × ``batch`` sequences."""

    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int
    context: int
    batch: int
    activation_bytes: int
    runtime_bytes: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context * self.batch

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.runtime_bytes

    def max_tokens(self, free_bytes: int) -> int:
        """Most tokens of KV cache (context × batch) that fit in ``free_bytes`` beside the rest."""
        room = free_bytes - self.weight_bytes - self.activation_bytes - self.runtime_bytes
        if room <= 0 or self.kv_bytes_per_token == 0:
            return 0
        return room // self.kv_bytes_per_token


def estimate(
    shape: ModelShape,
    *,
    num_params: int,
    dtype: str,
    kv_dtype: str | None = None,
    context: int | None = None,
    batch: int = 1,
    device: str = "cpu",
    num_batched_tokens: int = 2048,
) -> Estimate:
    """Weights (parameters × dtype: a GGUF too, which serve dequantises), KV cache, activations
    and runtime of one model."""
    context = context or shape.max_position_embeddings
    weights = weight_bytes(num_params, dtype)
    if shape.is_causal:
        kv = kv_bytes_per_token(shape, kv_dtype or dtype)
        activations = llm_activation_bytes(shape, min(context * batch, num_batched_tokens), batch, dtype)
    else:  # encoders keep no cache; their batch is context × batch tokens
        kv = 0
        activations = encoder_activation_bytes(shape, context * batch, context, dtype)
    return Estimate(
        num_params=num_params,
        weight_bytes=weights,
        kv_bytes_per_token=kv,
        context=context,
        batch=batch,
        activation_bytes=activations,
        runtime_bytes=RUNTIME_BYTES["cuda" if device.startswith("cuda") else "cpu"],
    )
