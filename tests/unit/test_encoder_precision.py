"""encoder.precision: a reduced dtype chosen by the server is served only where the model stays
faithful to its float32 self on the probe inputs; otherwise float32, as if asked for by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from inferd.config import load_settings
from inferd.config.engine import EncoderConfig
from inferd.config.model_spec import ModelKind
from inferd.encoder import precision
from inferd.encoder.models.base import prepare_batch
from inferd.encoder.models.bert import _NativeLinear
from inferd.encoder.models.registry import load_encoder_model
from inferd.encoder.request import Item

GATED = EncoderConfig(dtype="bfloat16", dtype_gate=True)


def embed(model, texts):
    encoded = model.tokenizer.encode_texts(texts, truncate=True, side="right")
    items = [Item(None, i, e.input_ids, e.token_type_ids) for i, e in enumerate(encoded)]
    batch = prepare_batch(items, model.tokenizer.pad_token_id, model.uses_token_type_ids, model.is_packed)
    with torch.inference_mode():
        return model.forward(batch).numpy()


TEXTS = ["the cat sat", "a dog barked at the moon all night long", "x"]


def test_a_faithful_model_is_served_in_the_reduced_dtype(tiny_embedder, caplog):
    caplog.set_level(logging.INFO, "inferd.encoder.models.registry")
    model = load_encoder_model(tiny_embedder, ModelKind.EMBEDDING, GATED)
    assert model.dtype == "bfloat16"
    assert model.bert is not None and model.bert.matmul_dtype == torch.bfloat16
    # only the products are bf16: the norms, embeddings and the residual stream stay float32
    layer = model.bert.layers[0]
    qkv = layer["qkv"]  # (weight, bias), or packed for the native bf16 kernel where the CPU has it
    weight = qkv.weight if isinstance(qkv, _NativeLinear) else qkv[0]
    assert weight.dtype == torch.bfloat16 and layer["norm1"][0].dtype == torch.float32
    assert model.bert.word.dtype == torch.float32
    assert "serving bfloat16 (cosine to float32 at worst" in caplog.text
    float32 = load_encoder_model(tiny_embedder, ModelKind.EMBEDDING, EncoderConfig())
    ours, theirs = embed(model, TEXTS), embed(float32, TEXTS)
    assert ours.dtype == np.float32
    assert not np.array_equal(ours, theirs)  # it really runs in bfloat16
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= precision.COSINE_GATE


def test_an_unfaithful_model_is_served_in_float32(tiny_embedder, caplog, monkeypatch):
    monkeypatch.setattr(precision, "COSINE_GATE", 1.5)  # no cosine passes
    model = load_encoder_model(tiny_embedder, ModelKind.EMBEDDING, GATED)
    assert model.dtype == "float32" and model.bert.matmul_dtype == torch.float32
    assert "serving float32, not bfloat16, which is not faithful enough to it: cosine" in caplog.text
    float32 = load_encoder_model(tiny_embedder, ModelKind.EMBEDDING, EncoderConfig())
    np.testing.assert_array_equal(embed(model, TEXTS), embed(float32, TEXTS))


def test_a_dtype_asked_for_by_name_is_not_checked(tiny_embedder, monkeypatch):
    def refuse(*args):
        raise AssertionError("checked a dtype asked for by name")

    monkeypatch.setattr(precision, "switch_if_faithful", refuse)
    model = load_encoder_model(tiny_embedder, ModelKind.EMBEDDING, EncoderConfig(dtype="bfloat16"))
    assert model.dtype == "bfloat16" and model.bert.matmul_dtype == torch.bfloat16


def test_a_cross_encoder_that_cannot_tell_documents_apart_stays_float32(tiny_cross_encoder, caplog):
    # The tiny random cross-encoder scores every probe document within ~1e-4 of the others: bf16
    # reorders them, so it keeps float32.
    model = load_encoder_model(tiny_cross_encoder, ModelKind.RERANK, GATED)
    assert model.dtype == "float32"
    assert next(model.model.parameters()).dtype == torch.float32
    assert "probe queries ranked their documents differently from float32" in caplog.text


def test_a_cross_encoder_that_keeps_its_rankings_is_served_in_bfloat16(tiny_cross_encoder, monkeypatch):
    monkeypatch.setattr(precision, "_same_rankings", lambda *args: precision.Verdict(True, "same"))
    model = load_encoder_model(tiny_cross_encoder, ModelKind.RERANK, GATED)
    assert model.dtype == "bfloat16"
    assert next(model.model.parameters()).dtype == torch.bfloat16


def groups(*scores):
    """Scores for the probe groups: the given ones for the first group, well-spread ones after."""
    sizes = [len(docs) for _, docs in precision.PROBE_GROUPS]
    rest = [np.arange(n, dtype=np.float32) for n in sizes[1:]]
    return np.concatenate([np.array(scores, dtype=np.float32), *rest])


BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7


def test_rankings_fail_on_a_real_swap_and_allow_near_ties():
    reference = groups(5.0, 1.0, -3.0, -3.000001, 0.0)
    assert precision._same_rankings(reference, reference, BF16_EPS).passed
    swapped = groups(1.0, 5.0, -3.0, -3.000001, 0.0)
    verdict = precision._same_rankings(reference, swapped, BF16_EPS)
    assert not verdict.passed and verdict.detail.startswith("1 of 3 probe queries")
    tie_swapped = groups(5.0, 1.0, -3.000001, -3.0, 0.0)  # within 1e-3 of the range (8): a tie
    assert precision._same_rankings(reference, tie_swapped, BF16_EPS).passed
    assert not precision._same_rankings(reference, groups(5.0, 1.0, 0.0, -3.0, -3.0), BF16_EPS).passed


def test_scores_one_bf16_step_apart_are_ties():
    """Near 10 bf16 logits are 0.0625 apart: two documents 0.03 apart in float32 may come out equal,
    or swapped by one step, without the model ranking anything differently."""
    reference = groups(10.03, 10.0, -5.0, 2.0, 0.0)
    collapsed = groups(10.0, 10.0625, -5.0, 2.0, 0.0)
    assert precision._same_rankings(reference, collapsed, BF16_EPS).passed
    assert not precision._same_rankings(reference, collapsed, torch.finfo(torch.float32).eps).passed
    all_ties = groups(10.03, 10.0, 10.01, 10.02, 10.04)  # nothing this dtype can order: lost
    assert not precision._same_rankings(all_ties, all_ties, BF16_EPS).passed


def test_non_finite_outputs_fail(tiny_embedder, monkeypatch):
    model = load_encoder_model(tiny_embedder, ModelKind.EMBEDDING, EncoderConfig())
    forward = model.forward
    calls = []

    def nan_after_switch(batch):
        calls.append(model.dtype)
        out = forward(batch)
        return out * float("nan") if model.dtype != "float32" else out

    monkeypatch.setattr(model, "forward", nan_after_switch)
    verdict = precision.switch_if_faithful(model, torch.bfloat16)
    assert calls == ["float32", "bfloat16"] and not verdict.passed and "non-finite" in verdict.detail


def test_a_float32_reference_that_is_not_finite_fails(tiny_cross_encoder, monkeypatch):
    model = load_encoder_model(tiny_cross_encoder, ModelKind.RERANK, EncoderConfig())
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda batch: forward(batch) * float("nan"))
    verdict = precision.switch_if_faithful(model, torch.bfloat16)
    assert not verdict.passed and "non-finite" in verdict.detail


def test_a_numbered_cuda_device_gets_the_cuda_default():
    from inferd.config import ModelSpec

    config = load_settings({}).encoder_config(ModelSpec.model_validate("m,device=cuda:0"))
    assert (config.dtype, config.dtype_gate) == ("float16", False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_a_checked_bfloat16_only_where_the_cpu_has_bf16(monkeypatch, native):
    from inferd.config import settings as settings_module

    monkeypatch.setattr(settings_module, "cpu_has_native_bf16", lambda: native)
    config = load_settings({"device": "cpu"}).encoder_config()
    assert (config.dtype, config.dtype_gate) == (("bfloat16", True) if native else ("float32", False))
    named = load_settings({"device": "cpu", "dtype": "bfloat16"}).encoder_config()
    assert (named.dtype, named.dtype_gate) == ("bfloat16", False)
    assert load_settings({"device": "cpu", "dtype": "float32"}).encoder_config().dtype == "float32"


def test_the_memory_plan_counts_a_checked_dtype_as_float32(tiny_embedder, monkeypatch):
    """The check holds the float32 model, and serves it when the check fails."""
    from inferd.config import ModelSpec
    from inferd.config import settings as settings_module
    from inferd.memory.server import model_need

    monkeypatch.setattr(settings_module, "cpu_has_native_bf16", lambda: True)
    spec = ModelSpec.model_validate(f"{tiny_embedder}=e")
    checked = model_need(spec, load_settings({"device": "cpu"}), tiny_embedder)
    named = model_need(spec, load_settings({"device": "cpu", "dtype": "bfloat16"}), tiny_embedder)
    float32 = model_need(spec, load_settings({"device": "cpu", "dtype": "float32"}), tiny_embedder)
    assert checked.dtype == "bfloat16" and checked.weight_bytes == float32.weight_bytes
    assert float32.weight_bytes / 2 < named.weight_bytes < float32.weight_bytes


def test_a_bert_cross_encoder_is_planned_cast_whole(tiny_cross_encoder):
    """Cross-encoders load through transformers' class, every tensor in the named dtype."""
    from inferd.config import ModelSpec
    from inferd.memory.server import model_need

    spec = ModelSpec.model_validate(f"{tiny_cross_encoder}=r,kind=rerank")
    named = model_need(spec, load_settings({"device": "cpu", "dtype": "bfloat16"}), tiny_cross_encoder)
    float32 = model_need(spec, load_settings({"device": "cpu", "dtype": "float32"}), tiny_cross_encoder)
    assert named.weight_bytes * 2 == float32.weight_bytes


def test_the_memory_plan_counts_what_a_named_reduced_dtype_holds(bundled_minilm):
    """inferd's BERT keeps its embedding tables in float32 under a named bfloat16: the plan counts
    them so (all-MiniLM-L6-v2: ~69 MB held, not the 45 MB of every value in two bytes)."""
    from inferd.config import ModelSpec
    from inferd.encoder.models.embedder import SentenceEmbedder
    from inferd.memory.server import model_need

    spec = ModelSpec.model_validate(f"{bundled_minilm}=e")
    settings = load_settings({"device": "cpu", "dtype": "bfloat16"})
    need = model_need(spec, settings, bundled_minilm)
    model = SentenceEmbedder(bundled_minilm, settings.encoder_config(spec))
    bert = model.bert
    tensors = [bert.word, bert.position, bert.token_type, *bert.embed_norm]
    # a product packed for the native bf16 kernel holds its packed weight and a float32 bias
    pairs = [
        (p.weight, p.bias) if isinstance(p, _NativeLinear) else p
        for layer in bert.layers
        for p in layer.values()
    ]
    tensors += [t for pair in pairs for t in pair]
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert bert.matmul_dtype == torch.bfloat16
    assert abs(need.weight_bytes - held) <= 0.01 * held, (need.weight_bytes, held)
