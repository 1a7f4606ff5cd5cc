"""Read a Llama-family checkpoint's safetensors straight into inferd's decoder.

Going through ``AutoModelForCausalLM.from_pretrained`` first builds transformers' model and then
takes its weights apart: it imports transformers' modeling stack (about a second and a hundred MB
of modules: torch.distributed, dynamo, the kernel hub) and holds the whole checkpoint in memory
twice while converting it. Here each tensor is read, cast and fused one at a time, and only the
configuration and tokenizer come from transformers. Checkpoints this reader does not know (not
safetensors, quantised, tensor names it does not expect, a rope that changes with the sequence
length) return None and take transformers' loader, so nothing is served differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from inferd.llm.models.decoder import Decoder, DecoderShape, can_build

# Rope variants whose frequencies depend on the sequence length at run time: transformers' rotary
# classes recompute them per forward, so those models keep transformers' loader and rotary module.
_DYNAMIC_ROPE = frozenset({"dynamic", "longrope"})
_LAYER_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.("
    r"input_layernorm\.weight|post_attention_layernorm\.weight"
    r"|self_attn\.[qkvo]_proj\.(weight|bias)|self_attn\.[qk]_norm\.weight"
    r"|mlp\.(gate|up|down)_proj\.weight"
    r")"
)
_TOP_TENSORS = frozenset({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})


class StaticRotary(nn.Module):
    """Rotary cos/sin tables for a rope whose frequencies are fixed at load time (default, linear,
    llama3, yarn, ...), computed as transformers' Llama rotary module computes them."""

    def __init__(self, config) -> None:
        super().__init__()
        rope = rope_parameters(config)
        if rope.get("rope_type", "default") == "default":
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rope_parameters(config) -> dict:
    """The rope settings as one dict: ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + ``rope_theta`` pair."""
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


def load_decoder(path: Path, config, dtype: torch.dtype, device: str) -> Decoder | None:
    """inferd's decoder read from ``path``'s safetensors for the text ``config``, or None when the
    checkpoint needs transformers' loader (see the module docstring)."""
    if not can_build(config) or getattr(config, "quantization_config", None):
        return None
    if rope_parameters(config).get("rope_type", "default") in _DYNAMIC_ROPE:
        return None
    files = safetensors_files(path)
    if files is None:
        return None
    from safetensors import safe_open

    where = {}  # tensor name -> its file
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    shape = DecoderShape.of(config)
    if not is_plain_layout(where, shape.num_layers):
        return None
    if not shape.tie_word_embeddings and "lm_head.weight" not in where:
        return None  # transformers would start such a head from random weights; let it say so

    def weights(name: str) -> torch.Tensor | None:
        if name not in where:
            return None
        # A handle maps its whole file, and every page read stays in the process's resident set
        # while the map lives: one handle per tensor keeps the load's peak at the cast weights plus
        # one tensor (SmolLM2's fp32 file read into bf16: 0.5 GB less at the peak).
        with safe_open(str(where[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name).to(device=device, dtype=dtype)

    return Decoder(weights, shape, StaticRotary(config).to(device)).eval()


def safetensors_files(path: Path) -> list[Path] | None:
    """The checkpoint's safetensors files: one file, or the shards its index names; None if neither."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return None
        files = [path / name for name in sorted(set(weight_map.values()))]
        return files if all(f.is_file() for f in files) else None
    single = path / "model.safetensors"
    return [single] if single.is_file() else None


def is_plain_layout(names, num_layers: int) -> bool:
    """True when every tensor is one the decoder reads and every layer has its required ones."""
    layers: dict[int, set[str]] = {}
    for name in names:
        if name in _TOP_TENSORS or name.endswith("rotary_emb.inv_freq"):
            continue
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None:
            return False
        layers.setdefault(int(match.group(1)), set()).add(match.group(2))
    required = {
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    }  # fmt: skip
    return (
        "model.embed_tokens.weight" in names
        and "model.norm.weight" in names
        and sorted(layers) == list(range(num_layers))
        and all(required <= present for present in layers.values())
    )
