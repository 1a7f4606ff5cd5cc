"""inferd's own forward for the Llama family (llama, mistral, qwen2, qwen3).

transformers' classes run every architecture; for the hottest family inferd has its own layers
with fewer, larger operations: q/k/v in one matrix product, gate/up in another, no
attention-interface or mask plumbing, rotary tables computed once per step and shared by every
layer. A decoder is built from a checkpoint's tensors by name: read straight from safetensors
(``checkpoint.load_decoder``) or taken over from a loaded transformers model (``build_decoder``,
whose fused copies replace the originals, so the model costs no extra memory). ``model_runner``
uses it whenever there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferd.config.settings import cpu_has_native_bf16
from inferd.llm.runner.attention import attend_fused_qkv, attend_paged, current_batch
from inferd.llm.runner.kernels import pack_amx_weight, pack_int8_weight, packed_key_block

FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})


# A checkpoint's tensor by its Hugging Face name ("model.layers.0.self_attn.q_proj.weight"), or None
# when the checkpoint has no such tensor (a bias, Qwen3's q/k norms, an untied head).
Weights = Callable[[str], "torch.Tensor | None"]


@dataclass(frozen=True, slots=True)
class DecoderShape:
    """What the layers need from a Llama-family config, read the way transformers' classes read it."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    windows: tuple[int | None, ...]  # each layer's sliding window; None: full attention
    tie_word_embeddings: bool

    @classmethod
    def of(cls, config) -> DecoderShape:
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            eps=config.rms_norm_eps,
            windows=tuple(_window(config, i) for i in range(config.num_hidden_layers)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


def _window(config, layer: int) -> int | None:
    # Mistral windows every layer; Qwen2/3 only the layers that layer_types marks; Llama none.
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer] == "sliding_attention":
        return getattr(config, "sliding_window", None)
    return None


class DecoderLayer(nn.Module):
    def __init__(self, weights: Weights, layer_idx: int, shape: DecoderShape) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}."
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.scaling = shape.head_dim**-0.5
        self.window = shape.windows[layer_idx]
        self.eps = shape.eps
        self.input_norm = _param(weights(prefix + "input_layernorm.weight"))
        self.post_norm = _param(weights(prefix + "post_attention_layernorm.weight"))
        self.qkv = _fused(weights, attn + "q_proj", attn + "k_proj", attn + "v_proj")
        self.o_proj = _fused(weights, attn + "o_proj")
        self.gate_up = _fused(weights, mlp + "gate_proj", mlp + "up_proj")
        self.down = _fused(weights, mlp + "down_proj")
        self.q_norm = _param(weights(attn + "q_norm.weight"))  # Qwen3's per-head norms
        self.k_norm = _param(weights(attn + "k_norm.weight"))
        kv_width = self.num_kv_heads * self.head_dim
        self.split = (self.num_heads * self.head_dim, kv_width, kv_width)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[0]
        x = _rms_norm(hidden, self.input_norm, self.eps)
        qkv = self.qkv(x)
        v = qkv[:, self.split[0] + self.split[1] :].view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k rotate together: one set of element-wise ops for both.
            qk = _rotate(qkv[:, : self.split[0] + self.split[1]].view(tokens, -1, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q, k, _ = qkv.split(self.split, dim=-1)
            q = _rms_norm(q.view(tokens, self.num_heads, self.head_dim), self.q_norm, self.eps)
            k = _rms_norm(k.view(tokens, self.num_kv_heads, self.head_dim), self.k_norm, self.eps)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        attended = attend_paged(self.layer_idx, q, k, v, self.scaling, self.window)
        hidden = hidden + self.o_proj(attended.view(tokens, -1))
        x = _rms_norm(hidden, self.post_norm, self.eps)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return hidden + self.down(F.silu(gate) * up)

    def forward_fused(self, hidden: torch.Tensor, delta, cos, sin, native) -> torch.Tensor:
        """The bf16 CPU layer through the native kernels: ``hidden`` is the residual stream, updated
        in place with the previous layer's output ``delta``; returns this layer's MLP output."""
        x = native.add_rms_norm(hidden, delta, self.input_norm, self.eps)
        attended = attend_fused_qkv(
            self.layer_idx,
            self.qkv(x),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            cos,
            sin,
            self.scaling,
            self.window,
        )
        x = native.add_rms_norm(
            hidden, self.o_proj(attended.view(hidden.shape[0], -1)), self.post_norm, self.eps
        )
        act = self.gate_up.gated(x) if isinstance(self.gate_up, NativeLinear) else None
        return self.down(native.silu_mul(self.gate_up(x)) if act is None else act)


class Decoder(nn.Module):
    """Packed forward: (T,) ids and positions → logits of the rows in ``logits_idx``."""

    def __init__(self, weights: Weights, shape: DecoderShape, rotary: nn.Module) -> None:
        super().__init__()
        embed = weights("model.embed_tokens.weight")
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        # rotary(x, positions[None]) -> (cos, sin), each (1, T, head_dim) in x's dtype
        self.rotary = rotary
        self.norm_weight = _param(weights("model.norm.weight"))
        self.norm_eps = shape.eps
        head = None if shape.tie_word_embeddings else weights("lm_head.weight")
        self.lm_head = _linear(embed if head is None else head, None)
        self.layers = nn.ModuleList(DecoderLayer(weights, i, shape) for i in range(shape.num_layers))
        # The native bf16 path has no per-head q/k norm (Qwen3): such models keep the torch ops.
        self.fusable = all(layer.q_norm is None for layer in self.layers)
        self._layer_table = None  # (kv caches, LayerWeights array) for the one-call native step
        first = self.layers[0]
        # (intermediate, heads, kv heads, head_dim), as decoder_layers takes it
        self._step_shape = (
            first.gate_up.out_features // 2,
            first.num_heads,
            first.num_kv_heads,
            first.head_dim,
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_idx: torch.Tensor):
        hidden = self.embed(input_ids)
        batch = current_batch()
        native = batch.native if batch is not None else None
        if native is not None and hidden.dtype == torch.bfloat16 and self.fusable:
            return self._forward_fused(hidden, positions, logits_idx, batch)
        cos, sin = self.rotary(hidden, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # (T, 1, D): broadcast over heads
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        return self.lm_head(_rms_norm(hidden[logits_idx], self.norm_weight, self.norm_eps))

    def _forward_fused(self, hidden, positions, logits_idx, batch):
        native = batch.native
        # float32 rotary tables: the native rotation computes in float32 and rounds once.
        cos, sin = self.rotary(hidden.new_empty(0, dtype=torch.float32), positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # (T, D)
        table = self._native_layers(native, batch.kv_caches, batch.kv_scales) if batch.all_rows else None
        if table is not None:  # every token a query row: all layers in one native call
            first = self.layers[0]
            delta = native.decoder_layers(
                table, hidden, self._step_shape, first.eps, first.scaling, cos, sin, batch.slot_mapping,
                batch.row_tables, batch.row_ctx_lens, batch.block_size,
                packed_key_block(batch.kv_caches[0][0]) > 0,
            )  # fmt: skip
        else:
            delta = None
            for layer in self.layers:
                delta = layer.forward_fused(hidden, delta, cos, sin, native)
        rows = hidden[logits_idx]
        return self.lm_head(
            native.add_rms_norm(rows, delta[logits_idx], self.norm_weight, self.norm_eps)
        )

    def _native_layers(self, native, kv_caches, kv_scales=None):
        """The LayerWeights array for ``native.decoder_layers``, or None when a layer does not fit
        it (no native linear, a oneDNN-packed linear, an MLP bias, layers that differ in norm or scale).
        ``kv_scales``: the layers' int8 cache scales, None for bf16 caches."""
        if self._layer_table is not None and self._layer_table[0] is kv_caches:
            return self._layer_table[1]
        from inferd.llm.runner.kernels import LayerWeights

        first = self.layers[0]
        plain = native.has_linear and all(
            all(
                isinstance(m, NativeLinear) and not m.fp32_out
                for m in (lay.qkv, lay.o_proj, lay.gate_up, lay.down)
            )
            and lay.gate_up.bias is None
            and lay.down.bias is None
            and (lay.eps, lay.scaling) == (first.eps, first.scaling)
            for lay in self.layers
        )
        table = None
        cache_dtype = torch.bfloat16 if kv_scales is None else torch.int8
        if plain and all(k.dtype == cache_dtype for k, _ in kv_caches):
            table = (LayerWeights * len(self.layers))()
            scales = kv_scales if kv_scales is not None else [None] * len(self.layers)
            for entry, lay, (k_cache, v_cache), kv_scale in zip(table, self.layers, kv_caches, scales, strict=True):
                for name, tensor in (
                    ("input_norm", lay.input_norm), ("post_norm", lay.post_norm), ("qkv", lay.qkv.weight),
                    ("o", lay.o_proj.weight), ("gate_up", lay.gate_up.weight), ("down", lay.down.weight),
                    ("qkv_bias", lay.qkv.bias), ("o_bias", lay.o_proj.bias), ("k_cache", k_cache),
                    ("v_cache", v_cache), ("qkv_scale", lay.qkv.scale), ("o_scale", lay.o_proj.scale),
                    ("gate_up_scale", lay.gate_up.scale), ("down_scale", lay.down.scale), ("kv_scales", kv_scale),
                ):  # fmt: skip
                    setattr(entry, name, None if tensor is None else tensor.data_ptr())
                entry.window = lay.window or 0
        self._layer_table = (kv_caches, table)
        return table


def can_build(config) -> bool:
    """Whether inferd's forward runs this (text) config: a Llama-family model with a plain MLP."""
    return (
        config.model_type in FAMILY
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
    )


def build_decoder(hf_model) -> Decoder | None:
    """inferd's forward over a loaded transformers model's weights when its family is supported and
    plain, else None. The model's layers are dropped: their weights now live fused in the decoder."""
    config = hf_model.config.get_text_config()
    if not can_build(config):
        return None
    state = hf_model.state_dict()
    decoder = Decoder(state.get, DecoderShape.of(config), hf_model.model.rotary_emb)
    hf_model.model.layers = nn.ModuleList()
    return decoder


def _param(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = _param(weight)
    if bias is not None:
        linear.bias = _param(bias)
    return linear


def _fused(weights: Weights, *names: str) -> nn.Linear:
    """One linear layer over the checkpoint's ``names`` (q/k/v, gate/up), outputs concatenated."""
    parts = [weights(name + ".weight") for name in names]
    biases = [weights(name + ".bias") for name in names]
    weight = parts[0] if len(parts) == 1 else torch.cat(parts)
    bias = None
    if biases[0] is not None:
        bias = biases[0] if len(biases) == 1 else torch.cat(biases)
    return _linear(weight, bias)


class PackedLinear(nn.Module):
    """A bf16 linear layer on the CPU with its weight reordered once into oneDNN's blocked layout
    (what torch.compile's freezing does): the AMX/AVX-512 kernels then skip the per-call reorder,
    1.3-3.6x faster than ``F.linear`` on bf16 from 1 to 300 rows on this project's CPUs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class NativeLinear(nn.Module):
    """A linear layer through inferd's own kernels over one weight packed once into tile order: bf16
    through AMX tiles (amx_linear.c) where the CPU has AMX, else AVX512-BF16 dot products
    (bf16_linear.c); or, with ``int8``, int8 weights with per-column scales (``pack_int8_weight``)
    times int8 activations (linear_int8, AVX512-VNNI). Against oneDNN's prepacked matmul on this project's shapes: AMX
    1.3-1.8x faster at 1-32 rows (decode batches) and level on prefill batches; AVX512-BF16 (an AMD
    EPYC without AMX) 1.2-1.5x faster from 1 to 128 rows, a one-row pass over SmolLM2's layers 3.4
    vs 5.1 ms. int8 halves the weight bytes and doubles the arithmetic rate: 0.3-0.7x the bf16
    kernel's time at 1 row, 0.6-0.9x at 8-32, 0.5-0.7x at 128 (AMD EPYC Zen 5)."""

    def __init__(self, linear: nn.Linear, native, fp32_out: bool = False, int8: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.scale = None  # float32 per-column scales of int8 weights
        if int8:
            self.weight, self.scale = pack_int8_weight(weight)
        else:
            self.weight = pack_amx_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.native = native
        self.fp32_out = fp32_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self.native.linear(x, self.weight, self.out_features, self.bias, self.fp32_out, self.scale)

    def gated(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a gated MLP's fused gate_up: silu(gate) * up in one pass (``NativeOps.linear_gated``),
        or None where the kernel has no gated form."""
        if self.bias is not None or self.fp32_out or self.out_features % 2:
            return None
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self.native.linear_gated(x, self.weight, self.out_features // 2, self.scale)


def pack_for_cpu(decoder: Decoder, native=None, quantization: str = "none") -> None:
    """Swap every bf16 linear layer of a CPU decoder for a faster one: inferd's own kernel where the
    native library has one for this CPU (AMX or AVX512-BF16; the input width a multiple of 32),
    else a oneDNN-prepacked one where oneDNN has native bf16. With ``quantization="int8"`` every
    linear layer and the LM head get int8 weights instead (the caller checked the kernel is here)."""
    own = native is not None and native.has_linear
    int8 = quantization == "int8"

    def packed(linear: nn.Linear, fp32_out: bool = False) -> nn.Module:
        if int8:
            return NativeLinear(linear, native, fp32_out, int8=True)
        if own and linear.in_features % 32 == 0:
            return NativeLinear(linear, native, fp32_out)
        return PackedLinear(linear) if _can_pack() else linear

    for layer in decoder.layers:
        for name in ("qkv", "o_proj", "gate_up", "down"):
            setattr(layer, name, packed(getattr(layer, name)))
    # With tied embeddings the lookup keeps the plain table and the head gets a packed copy; the
    # head writes float32 logits, which the sampler wants anyway.
    decoder.lm_head = packed(decoder.lm_head, fp32_out=True)


def _can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and cpu_has_native_bf16()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused op. In float32 it is bit-identical to transformers' Llama RMSNorm; in bf16 torch
    # accumulates in float32 too and differs from transformers' (normalise in float32, round, then
    # scale) only by the rounding of the final product — which saved 10% of a one-stream step.
    return F.rms_norm(x, weight.shape, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
