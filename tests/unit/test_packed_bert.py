"""inferd's packed BERT read from safetensors: transformers' BertModel outputs item by item, the
checkpoints it does not know left to transformers, and no modeling import for the bundled embedder."""

import json

import pytest
import torch

from inferd.config.engine import EncoderConfig
from inferd.encoder.models.bert import PackedBert, load_packed_bert
from inferd.encoder.models.embedder import SentenceEmbedder
from inferd.llm.runner import kernels
from tests.unit.modeling_imports import heavy_modules_after


def transformer_dir(root):
    """The Transformer module's folder of a sentence-transformers model (modules.json)."""
    modules = json.loads((root / "modules.json").read_text())
    return root / next(m["path"] for m in modules if m["type"].endswith("Transformer"))


ITEMS = [[101, 7, 8, 9, 102], [101, 5, 102], [101, *range(10, 40), 102]]


def packed_and_reference(bert_dir):
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(str(bert_dir))
    packed = load_packed_bert(bert_dir, config, torch.float32, "cpu")
    reference = BertModel.from_pretrained(str(bert_dir)).eval()
    bounds, start = [], 0
    for item in ITEMS:
        bounds.append((start, start + len(item)))
        start += len(item)
    ids = torch.tensor([[t for item in ITEMS for t in item]])
    positions = torch.tensor([[p for item in ITEMS for p in range(len(item))]])
    types = torch.zeros_like(ids)
    with torch.no_grad():
        got = packed(ids, positions, types, bounds)
        expected = [reference(torch.tensor([item])).last_hidden_state[0] for item in ITEMS]
    return got, bounds, expected


@pytest.mark.parametrize("which", ["tiny", "bundled-minilm"])
def test_packed_bert_gives_bertmodel_outputs(tiny_embedder, bundled_minilm, which):
    got, bounds, expected = packed_and_reference(transformer_dir(tiny_embedder if which == "tiny" else bundled_minilm))
    for (start, end), reference in zip(bounds, expected, strict=True):
        torch.testing.assert_close(got[start:end], reference, atol=2e-5, rtol=1e-4)


def test_native_attention_runs_where_the_cpu_has_its_build_and_changes_nothing(bundled_minilm):
    """On an AVX-512 CPU the bundled MiniLM (32-wide heads) attends through the native kernel; its
    outputs match the per-item matrix products'. Elsewhere it keeps those."""
    from inferd.encoder.models.bert import native_attention

    got, bounds, _ = packed_and_reference(transformer_dir(bundled_minilm))
    ops = kernels.native_ops()
    has_kernel = ops is not None and ops.variant in ("amx", "avx512bf16", "avx512")
    assert (native_attention(32) is not None) == has_kernel
    if not has_kernel:
        pytest.skip("no AVX-512 build on this CPU: only the torch path runs here")
    from transformers import AutoConfig

    path = transformer_dir(bundled_minilm)
    packed = load_packed_bert(path, AutoConfig.from_pretrained(str(path)), torch.float32, "cpu")
    assert packed.native is ops
    packed.native = None
    ids = torch.tensor([[t for item in ITEMS for t in item]])
    positions = torch.tensor([[p for item in ITEMS for p in range(len(item))]])
    with torch.no_grad():
        without = packed(ids, positions, torch.zeros_like(ids), bounds)
    torch.testing.assert_close(without, got, atol=1e-5, rtol=1e-4)


def _bf16_forward(path, native_linear: bool, monkeypatch):
    """The packed bundled encoder's outputs on ITEMS with its products in bf16, through the native
    linear kernel or (``native_linear`` False) torch's."""
    from transformers import AutoConfig

    from inferd.encoder.models import bert as bert_module

    with monkeypatch.context() as patch:
        if not native_linear:
            patch.setattr(bert_module, "_linear_kernel", lambda: None)
        packed = load_packed_bert(path, AutoConfig.from_pretrained(str(path)), torch.bfloat16, "cpu")
        packed.set_matmul_dtype(torch.bfloat16)  # again: a no-op (the probe's switch after a load)
    kinds = {type(layer[name]) for layer in packed.layers for name in ("qkv", "o", "up", "down")}
    if native_linear:  # the up-projection feeds GELU in bf16, the others come back in float32
        hidden = torch.randn(3, packed.word.shape[1])
        assert packed.layers[0]["up"](hidden, False).dtype == torch.bfloat16
        assert packed.layers[0]["qkv"](hidden, True).dtype == torch.float32
        with pytest.raises(ValueError, match="packed for the native kernel"):
            packed.set_matmul_dtype(torch.float16)
        assert packed.matmul_dtype == torch.bfloat16 and {type(layer["qkv"]) for layer in packed.layers} == kinds
    ids = torch.tensor([[t for item in ITEMS for t in item]])
    positions = torch.tensor([[p for item in ITEMS for p in range(len(item))]])
    bounds, start = [], 0
    for item in ITEMS:
        bounds.append((start, start + len(item)))
        start += len(item)
    with torch.no_grad():
        return packed(ids, positions, torch.zeros_like(ids), bounds), kinds


def test_bf16_products_run_on_the_native_linear_kernel_where_the_cpu_has_it(bundled_minilm, monkeypatch):
    """In bf16 on a CPU with inferd's bf16 linear kernel (AVX512-BF16 or AMX) every product of the
    packed encoder runs through it, and its outputs stay those of torch's bf16 products up to bf16
    rounding (the kernel's results are float32 where torch's were rounded to bf16 first)."""
    from inferd.encoder.models.bert import _NativeLinear

    path = transformer_dir(bundled_minilm)
    ops = kernels.native_ops()
    if ops is None or not ops.has_linear:
        pytest.skip("no bf16 linear kernel on this CPU: torch's products run here")
    got, kinds = _bf16_forward(path, True, monkeypatch)
    assert kinds == {_NativeLinear}
    reference, torch_kinds = _bf16_forward(path, False, monkeypatch)
    assert torch_kinds == {tuple}
    fp32, _, _ = packed_and_reference(path)
    # both within bf16's reach of float32, and of each other
    for out in (got, reference):
        assert torch.nn.functional.cosine_similarity(out, fp32, dim=-1).min() > 0.9998
    assert torch.nn.functional.cosine_similarity(got, reference, dim=-1).min() > 0.9998
    assert (got - fp32).abs().mean() <= (reference - fp32).abs().mean() * 1.1


def test_the_bundled_embedder_runs_on_it(bundled_minilm):
    model = SentenceEmbedder(bundled_minilm, EncoderConfig())
    assert isinstance(model.bert, PackedBert) and model.transformer is None


def test_a_checkpoint_it_does_not_know_keeps_transformers(tmp_path, tiny_embedder):
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path / "embedder"
    shutil.copytree(tiny_embedder, root)
    weights = transformer_dir(root) / "model.safetensors"
    state = load_file(str(weights))
    state["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
    save_file(state, str(weights), metadata={"format": "pt"})
    model = SentenceEmbedder(root, EncoderConfig())
    assert model.bert is None and model.transformer is not None


def test_the_bundled_embedder_loads_without_transformers_modeling(bundled_minilm):
    code = (
        "from pathlib import Path\n"
        "from inferd.config.engine import EncoderConfig\n"
        "from inferd.encoder.models.embedder import SentenceEmbedder\n"
        f"model = SentenceEmbedder(Path({str(bundled_minilm)!r}), EncoderConfig())\n"
        "assert model.bert is not None\n"
    )
    assert heavy_modules_after(code) == []
