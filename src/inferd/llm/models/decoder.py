"""inferd's own forward for the Llama family (llama, mistral, qwen2, qwen3).

transformers' classes run every architecture; for the hottest family we rebuild the layers from
the loaded model's weights with fewer, larger operations: q/k/v in one matrix product, gate/up in
another, no attention-interface or mask plumbing, rotary tables computed once per step and shared
by every layer. The weights are taken over (fused copies, originals released), so the model costs
no extra memory. ``model_runner`` uses it whenever ``build_decoder`` returns one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.config.settings import cpu_has_native_bf16
from inferd.llm.runner.attention import attend_fused_qkv, attend_paged, current_batch
from inferd.llm.runner.kernels import pack_amx_weight

FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.layer_idx = attn.layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = attn.scaling
        # Qwen keeps each layer's window on its module (None on full-attention layers); Mistral's
        # is in the config.
        if hasattr(attn, "sliding_window"):
            self.window = attn.sliding_window
        else:
            self.window = getattr(attn.config, "sliding_window", None)
        self.eps = hf_layer.input_layernorm.variance_epsilon
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = attn.o_proj
        self.gate_up = _fused(mlp.gate_proj, mlp.up_proj)
        self.down = mlp.down_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.split = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)

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
            q = self.q_norm(q.view(tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(tokens, self.num_kv_heads, self.head_dim))
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
        return self.down(native.silu_mul(self.gate_up(x)))


class Decoder(nn.Module):
    """Packed forward: (T,) ids and positions → logits of the rows in ``logits_idx``."""

    def __init__(self, hf_model) -> None:
        super().__init__()
        text = hf_model.config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.layers = nn.ModuleList(DecoderLayer(layer, heads, kv_heads, head_dim) for layer in inner.layers)
        # The native bf16 path has no per-head q/k norm (Qwen3): such models keep the torch ops.
        self.fusable = all(layer.q_norm is None for layer in self.layers)
        # The transformers layers' q/k/v and gate/up now live fused above; drop the originals.
        inner.layers = nn.ModuleList()
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
        hidden = self.norm(hidden[logits_idx])
        return self.lm_head(hidden)

    def _forward_fused(self, hidden, positions, logits_idx, batch):
        native = batch.native
        # float32 rotary tables: the native rotation computes in float32 and rounds once.
        cos, sin = self.rotary(hidden.new_empty(0, dtype=torch.float32), positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # (T, D)
        table = self._native_layers(native, batch.kv_caches) if batch.all_rows else None
        if table is not None:  # every token a query row: all layers in one native call
            first = self.layers[0]
            delta = native.decoder_layers(
                table, hidden, self._step_shape, first.eps, first.scaling, cos, sin, batch.slot_mapping,
                batch.row_tables, batch.row_ctx_lens, batch.block_size,
            )  # fmt: skip
        else:
            delta = None
            for layer in self.layers:
                delta = layer.forward_fused(hidden, delta, cos, sin, native)
        rows = hidden[logits_idx]
        return self.lm_head(
            native.add_rms_norm(rows, delta[logits_idx], self.norm.weight, self.norm.variance_epsilon)
        )

    def _native_layers(self, native, kv_caches):
        """The LayerWeights array for ``native.decoder_layers``, or None when a layer does not fit
        it (no AMX, a oneDNN-packed linear, an MLP bias, layers that differ in norm or scale)."""
        if self._layer_table is not None and self._layer_table[0] is kv_caches:
            return self._layer_table[1]
        from inferd.llm.runner.kernels import LayerWeights

        first = self.layers[0]
        plain = native.amx and all(
            all(
                isinstance(m, AmxLinear) and not m.fp32_out
                for m in (lay.qkv, lay.o_proj, lay.gate_up, lay.down)
            )
            and lay.gate_up.bias is None
            and lay.down.bias is None
            and (lay.eps, lay.scaling) == (first.eps, first.scaling)
            for lay in self.layers
        )
        table = None
        if plain and all(k.dtype == torch.bfloat16 for k, _ in kv_caches):
            table = (LayerWeights * len(self.layers))()
            for entry, lay, (k_cache, v_cache) in zip(table, self.layers, kv_caches, strict=True):
                for name, tensor in (
                    ("input_norm", lay.input_norm), ("post_norm", lay.post_norm), ("qkv", lay.qkv.weight),
                    ("o", lay.o_proj.weight), ("gate_up", lay.gate_up.weight), ("down", lay.down.weight),
                    ("qkv_bias", lay.qkv.bias), ("o_bias", lay.o_proj.bias), ("k_cache", k_cache),
                    ("v_cache", v_cache),
                ):  # fmt: skip
                    setattr(entry, name, None if tensor is None else tensor.data_ptr())
                entry.window = lay.window or 0
        self._layer_table = (kv_caches, table)
        return table


def build_decoder(hf_model) -> Decoder | None:
    """inferd's forward for ``hf_model`` when its family is supported and plain, else None."""
    config = hf_model.config
    if config.model_type not in FAMILY:
        return None
    if getattr(config, "mlp_bias", False) or getattr(config, "hidden_act", "silu") != "silu":
        return None
    return Decoder(hf_model)


def _fused(*linears: nn.Linear) -> nn.Linear:
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if biases[0] is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


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


class AmxLinear(nn.Module):
    """A bf16 linear layer through inferd's own AMX kernel (amx_linear.c): the weight packed once
    into tile order; at 1-32 rows (decode batches) 1.3-1.8x faster than oneDNN's prepacked AMX
    matmul on this project's matrix shapes, and level with it on prefill batches."""

    def __init__(self, linear: nn.Linear, native, fp32_out: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.weight = pack_amx_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.native = native
        self.fp32_out = fp32_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self.native.linear(x, self.weight, self.out_features, self.bias, self.fp32_out)


def pack_for_cpu(decoder: Decoder, native=None) -> None:
    """Swap every bf16 linear layer of a CPU decoder for a faster one: inferd's AMX kernel where the
    CPU has AMX and the native library built (and the input width is a multiple of 32), else a
    oneDNN-prepacked one where oneDNN has native bf16."""
    amx = native is not None and native.amx

    def packed(linear: nn.Linear, fp32_out: bool = False) -> nn.Module:
        if amx and linear.in_features % 32 == 0:
            return AmxLinear(linear, native, fp32_out)
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
