"""BERT's encoder over a packed batch, read straight from safetensors.

transformers' ``BertModel`` computes the same thing, but loading it imports transformers' modeling
stack (about a second of the default server's start and ~100 MB of modules) and builds the model
before its weights are read. Here the checkpoint's tensors go straight into a post-LayerNorm encoder
with q/k/v fused into one matrix, attending within each item's span of the packed row as
``encoder.attention.varlen_attention`` does for transformers' model. A checkpoint it does not know
(other tensor names, relative positions, another activation) returns None and the caller keeps
transformers' class.

In bfloat16 (or float16) the matrix products take the reduced dtype, and so does the GELU on the
up-projection's output, which feeds the next product: the residual stream, the LayerNorms,
attention's scores and softmax stay float32. Through torch each product's bias is added in the
reduced dtype and a result added back to the residual stream is widened from it. On an
AVX512-BF16 EPYC this runs as fast as casting the whole encoder to bfloat16 and stays closer to
float32: all-MiniLM-L6-v2's cosine to float32 sentence-transformers was at worst 0.99997 over 96
passages, against 0.99993 for the whole model in bfloat16 (2026-12-04, session 12).
Where the CPU has inferd's own bf16 linear kernel (AVX512-BF16 or AMX, the one the chat models use)
and an input width is a multiple of 32, a bf16 product runs through it instead: float32 sums and
bias, its result in float32 where it is added back (bf16 for the GELU). On MiniLM's shapes its
AVX512-BF16 form takes 0.44-0.57x torch's time at 16-84 rows (one short passage: the latency of a
RAG query's embedding) and 0.9x at a batch of 32 passages (AMD EPYC Zen 5, 2026-12-05, session 19;
the AMX form is unmeasured here).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # F.gelu's approximate=
_LAYER_TENSOR = re.compile(
    r"encoder\.layer\.(\d+)\.("
    r"attention\.self\.(query|key|value)|attention\.output\.dense|attention\.output\.LayerNorm"
    r"|intermediate\.dense|output\.dense|output\.LayerNorm"
    r")\.(weight|bias)"
)
_EMBEDDINGS = frozenset(
    f"embeddings.{name}"
    for name in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias",
    )
)  # fmt: skip
_IGNORED = ("embeddings.position_ids", "pooler.")  # a buffer, and the pooler sentence embedders skip


class PackedBert(nn.Module):
    """(1, T) packed ids, positions and token types, with each item's (start, end) → (T, hidden)."""

    def __init__(self, weights, config) -> None:
        super().__init__()
        self.matmul_dtype = torch.float32
        self.native = None  # the native kernels, for attention on the CPU (load_packed_bert sets it)
        self.num_heads = config.num_attention_heads
        self.eps = config.layer_norm_eps
        self.approximate = _ACTIVATIONS[config.hidden_act]
        self.word = weights("embeddings.word_embeddings.weight")
        self.position = weights("embeddings.position_embeddings.weight")
        self.token_type = weights("embeddings.token_type_embeddings.weight")
        self.embed_norm = (weights("embeddings.LayerNorm.weight"), weights("embeddings.LayerNorm.bias"))
        self.layers = [
            self._layer_weights(weights, f"encoder.layer.{i}.") for i in range(config.num_hidden_layers)
        ]

    @staticmethod
    def _layer_weights(weights, prefix: str) -> dict:
        def linear(name: str) -> tuple[torch.Tensor, torch.Tensor]:  # (weight, bias); a norm's too
            return weights(f"{prefix}{name}.weight"), weights(f"{prefix}{name}.bias")

        q, k, v = (linear(f"attention.self.{name}") for name in ("query", "key", "value"))
        return {
            "qkv": (torch.cat([q[0], k[0], v[0]]), torch.cat([q[1], k[1], v[1]])),
            "o": linear("attention.output.dense"),
            "norm1": linear("attention.output.LayerNorm"),
            "up": linear("intermediate.dense"),
            "down": linear("output.dense"),
            "norm2": linear("output.LayerNorm"),
        }

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """Run the linear layers in ``dtype`` from now on (their float32 weights are dropped): in
        bf16 on the CPU each product whose input width is a multiple of 32 goes through the native
        kernel where this build has it (``_NativeLinear``), the others through torch. Once packed
        for the kernel the weights can only stay bf16: asking for another dtype then raises before
        anything changes."""
        ops = _linear_kernel() if dtype == torch.bfloat16 and self.word.device.type == "cpu" else None
        products = [(layer, name) for layer in self.layers for name in ("qkv", "o", "up", "down")]
        if ops is None and any(isinstance(layer[name], _NativeLinear) for layer, name in products):
            raise ValueError(f"the encoder's bf16 weights are packed for the native kernel: not {dtype}")
        for layer, name in products:
            if isinstance(layer[name], _NativeLinear):  # bf16 already
                continue
            weight, bias = layer[name]
            if ops is not None and weight.shape[1] % 32 == 0:
                layer[name] = _NativeLinear(ops, weight, bias)
            else:
                layer[name] = (weight.to(dtype), bias.to(dtype))
        self.matmul_dtype = dtype

    def forward(self, input_ids, position_ids, token_type_ids, bounds) -> torch.Tensor:
        ids, positions = input_ids[0], position_ids[0]
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids[0]
        hidden = F.embedding(ids, self.word) + F.embedding(types, self.token_type)
        hidden = hidden + F.embedding(positions, self.position)
        hidden = F.layer_norm(hidden, hidden.shape[-1:], *self.embed_norm, self.eps)
        spans = torch.tensor(bounds, dtype=torch.int64).view(-1, 2) if self.native is not None else None
        for layer in self.layers:
            hidden = self._layer(hidden, layer, bounds, spans)
        return hidden

    def _layer(self, hidden: torch.Tensor, layer: dict, bounds, spans: torch.Tensor | None) -> torch.Tensor:
        tokens, width = hidden.shape
        head_dim = width // self.num_heads

        def linear(x: torch.Tensor, name: str, fp32_out: bool = True) -> torch.Tensor:
            # float32 out, whatever the weights; else in the matmul dtype
            weights = layer[name]
            if isinstance(weights, _NativeLinear):
                return weights(x, fp32_out)
            out = F.linear(x.to(self.matmul_dtype), *weights)
            return out.float() if fp32_out else out

        qkv = linear(hidden, "qkv")
        if spans is not None:
            attended = self.native.varlen_attention(qkv, self.num_heads, head_dim, spans, head_dim**-0.5)
        else:
            # each (heads, tokens, head_dim)
            q, k, v = qkv.view(tokens, 3, self.num_heads, head_dim).permute(1, 2, 0, 3)
            attended = _attend_within(q, k, v, bounds, head_dim**-0.5)
            attended = attended.transpose(0, 1).reshape(tokens, width)
        hidden = F.layer_norm(linear(attended, "o") + hidden, (width,), *layer["norm1"], self.eps)
        inner = F.gelu(linear(hidden, "up", fp32_out=False), approximate=self.approximate)
        return F.layer_norm(linear(inner, "down") + hidden, (width,), *layer["norm2"], self.eps)


class _NativeLinear:
    """A bf16 matrix product through inferd's own kernel (``NativeOps.linear``: AVX512-BF16 dot
    products or AMX tiles, float32 sums), its weight packed once; its result in float32 (not rounded
    to bf16) or bf16."""

    def __init__(self, ops, weight: torch.Tensor, bias: torch.Tensor) -> None:
        from inferd.llm.runner.kernels import pack_amx_weight

        self.ops = ops
        self.out_features = weight.shape[0]
        self.weight = pack_amx_weight(weight.to(torch.bfloat16))
        self.bias = bias.float().contiguous()

    def __call__(self, x: torch.Tensor, fp32_out: bool) -> torch.Tensor:
        return self.ops.linear(
            x.to(torch.bfloat16).contiguous(), self.weight, self.out_features, self.bias, fp32_out
        )


def _linear_kernel():
    """The native kernels when their build has the bf16 linear kernel for this CPU, else None."""
    from inferd.llm.runner.kernels import native_ops

    ops = native_ops()
    return ops if ops is not None and ops.has_linear else None


def native_attention(head_dim: int):
    """The native kernels when their build has the encoder attention kernel for heads of
    ``head_dim`` (the AVX-512 builds), else None: attention then runs as ``_attend_within``. The
    kernel computes the same float32 attention up to rounding (its exp is a polynomial; NaN and
    infinite inputs give NaN rows, as torch's softmax does) at 2-2.5x the speed of the per-item
    matrix products on BERT-sized heads (32 and 64 wide, 32-256 rows), measured on an
    AVX512-BF16 EPYC."""
    from inferd.llm.runner.kernels import native_ops

    ops = native_ops()
    return ops if ops is not None and ops.varlen_attention_takes(head_dim) else None


def _attend_within(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds, scale: float) -> torch.Tensor:
    """Each item's (heads, n, head_dim) rows attend to the item's own rows only. On the CPU two plain
    matrix products per item: SDPA's CPU kernel cost 1.6x this on BERT-sized heads (32 wide, ~100
    rows), measured on an AVX512-BF16 EPYC. Elsewhere SDPA (its fused GPU kernels)."""
    out = torch.empty_like(q)
    if q.device.type != "cpu":
        for start, end in bounds:
            out[:, start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end], k[None, :, start:end], v[None, :, start:end], scale=scale
            )[0]
        return out
    for start, end in bounds:
        scores = torch.matmul(q[:, start:end], k[:, start:end].transpose(1, 2)).mul_(scale)
        out[:, start:end] = torch.matmul(torch.softmax(scores, dim=-1), v[:, start:end])
    return out


def load_packed_bert(path: Path, config, dtype: torch.dtype, device: str) -> PackedBert | None:
    """The encoder read from ``path/model.safetensors`` for ``config`` with its matrix products in
    ``dtype``, or None when this checkpoint needs transformers' loader (see the module docstring)."""
    file = path / "model.safetensors"
    if (
        config.model_type != "bert"
        or getattr(config, "position_embedding_type", "absolute") != "absolute"
        or config.hidden_act not in _ACTIVATIONS
        or not file.is_file()
    ):
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as handle:
        names = set(handle.keys())
        if not _is_plain_layout(names, config.num_hidden_layers):
            return None
        tensors = {name: handle.get_tensor(name).to(device=device, dtype=torch.float32) for name in names}
    bert = PackedBert(tensors.__getitem__, config)
    if device == "cpu":
        bert.native = native_attention(config.hidden_size // config.num_attention_heads)
    if dtype != torch.float32:
        bert.set_matmul_dtype(dtype)
    return bert


def _is_plain_layout(names: set[str], num_layers: int) -> bool:
    layers: dict[int, int] = {}
    for name in names:
        if name in _EMBEDDINGS or name.startswith(_IGNORED):
            continue
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None:
            return False
        layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + 1
    # 16 tensors a layer: q, k, v, attention output, intermediate, output, two norms; weight and bias
    return names >= _EMBEDDINGS and layers == dict.fromkeys(range(num_layers), 16)
