"""int8 weights and KV cache by default where the model runs them faithfully (llm/precision.py):
the server's auto choices, what the load does with those the model cannot run, the probe that
decides, and its fallback."""

import logging
import math

import pytest

from inferd.config.engine import LLMConfig
from inferd.config.settings import cpu_has_native_bf16, load_settings
from inferd.errors import ModelLoadError
from inferd.llm import precision
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.runner.kernels import native_ops

needs_int8 = pytest.mark.skipif(
    native_ops() is None or not native_ops().has_int8_linear, reason="no int8 linear kernel for this CPU"
)
# int8 caches need head_dim a multiple of 32 (tiny_llama's is 16): 2 heads of 32 over one kv head
WIDE_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)
SMALL = dict(dtype="bfloat16", kv_cache_memory=2**20, block_size=8, num_threads=1)


@pytest.fixture(scope="module")
def wide_llama(model_root, tiny_llama):
    from tests.unit.llm.test_architectures import build

    return build(model_root, "llama", tiny_llama, **WIDE_HEADS)[0]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="auto picks int8 only where bf16 is native")
def test_auto_is_int8_on_the_native_bf16_path_and_names_what_the_server_chose():
    config = load_settings({"device": "cpu"}).llm_config()
    assert (config.dtype, config.quantization, config.kv_cache_dtype) == ("bfloat16", "int8", "int8")
    assert config.auto_precision == ("quantization", "kv_cache_dtype")
    plain = config.fallback()
    assert (plain.quantization, plain.kv_cache_dtype, plain.auto_precision) == ("none", "model", ())
    # a choice made by name is the user's, never reverted
    named = load_settings({"device": "cpu", "quantization": "int8"}).llm_config()
    assert named.auto_precision == ("kv_cache_dtype",)
    assert (named.fallback().quantization, named.fallback().kv_cache_dtype) == ("int8", "model")
    off = load_settings({"device": "cpu", "quantization": "none", "kv_cache_dtype": "model"}).llm_config()
    assert (off.quantization, off.kv_cache_dtype, off.auto_precision) == ("none", "model", ())


@pytest.mark.parametrize(
    "overrides", [{"dtype": "float32"}, {"native_kernels": False}, {"model_impl": "transformers"}]
)
def test_auto_is_the_models_precision_off_the_native_bf16_path(overrides):
    config = load_settings({"device": "cpu", **overrides}).llm_config()
    assert (config.quantization, config.kv_cache_dtype, config.auto_precision) == ("none", "model", ())


def test_the_planner_counts_the_fallback_of_the_servers_choices(tiny_llama):
    """Memory is planned for what a failed probe serves: unquantised weights, the model's KV dtype."""
    from inferd.config.model_spec import ModelSpec
    from inferd.memory.server import model_need

    spec = ModelSpec(source=str(tiny_llama), alias="chat")
    auto = model_need(spec, load_settings({"device": "cpu", "dtype": "bfloat16"}), tiny_llama)
    plain = model_need(
        spec,
        load_settings(
            {"device": "cpu", "dtype": "bfloat16", "quantization": "none", "kv_cache_dtype": "model"}
        ),
        tiny_llama,
    )
    assert auto == plain


@needs_int8
def test_an_auto_choice_the_model_cannot_run_is_reverted_and_a_named_one_refused(tiny_llama):
    """tiny_llama's heads are 16 wide, which the int8 cache's kernel does not take: the server's own
    choice quietly becomes the bf16 cache (its int8 weights stay), the same choice by name is refused."""
    auto = LLMConfig(
        **SMALL, quantization="int8", kv_cache_dtype="int8", auto_precision=("quantization", "kv_cache_dtype")
    )
    loaded = load_causal_lm(tiny_llama, auto)
    assert (loaded.config.quantization, loaded.config.kv_cache_dtype) == ("int8", "model")
    assert loaded.config.auto_precision == ("quantization",)
    assert not loaded.facts.kv_int8
    with pytest.raises(ModelLoadError, match=r"--kv-cache-dtype int8 cannot serve this model: .*head_dim 16"):
        load_causal_lm(tiny_llama, LLMConfig(**SMALL, kv_cache_dtype="int8"))


def auto_config(**overrides) -> LLMConfig:
    return LLMConfig(
        **SMALL,
        quantization="int8",
        kv_cache_dtype="int8",
        auto_precision=("quantization", "kv_cache_dtype"),
        **overrides,
    )


@needs_int8
def test_the_probe_serves_int8_where_it_holds_and_leaves_no_trace(wide_llama, caplog):
    caplog.set_level(logging.INFO, logger="inferd.llm.precision")
    engine = precision.load_engine(wide_llama, auto_config())
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "int8")
    assert engine.facts.kv_int8 and engine.runner.kv_int8
    assert "serving int8 weights and an int8 KV cache" in caplog.text
    # nothing of the probe is left to hit or to count
    kv = engine.kv_cache
    assert kv.num_prefix_queries == kv.num_prefix_hits == 0 and kv.usage == 0
    ids = engine.tokenizer(precision.PROBE_TEXT)["input_ids"]
    assert kv.find_cached_prefix(ids).num_tokens == 0


@needs_int8
def test_a_model_that_fails_the_probe_is_served_without_int8(wide_llama, caplog, monkeypatch):
    """A gate no int8 model can meet (perplexity must fall by half): the server loads the model again
    without its own int8 choices, keeps the ones asked for by name, and says why."""
    monkeypatch.setattr(precision, "PERPLEXITY_GATE", -0.5)
    engine = precision.load_engine(wide_llama, auto_config())
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("none", "model")
    assert not engine.facts.kv_int8
    assert "not serving int8 weights and an int8 KV cache" in caplog.text
    named = LLMConfig(**SMALL, quantization="int8", kv_cache_dtype="int8", auto_precision=("kv_cache_dtype",))
    engine = precision.load_engine(wide_llama, named)
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "model")


@needs_int8
def test_the_probe_compares_the_same_text_scored_by_both_models(wide_llama):
    """The probe's log-probabilities are the engine's prompt logprobs of PROBE_TEXT: one per token
    after the first, each a real log-probability, and the same twice over the same model."""
    plain = precision.load_engine(wide_llama, LLMConfig(**SMALL))
    first = precision.probe_logprobs(plain)
    second = precision.probe_logprobs(plain)
    ids = plain.tokenizer(precision.PROBE_TEXT)["input_ids"]
    assert len(first) == min(len(ids), precision.MAX_PROBE_TOKENS) - 1
    assert all(lp <= 0 and math.isfinite(lp) for lp in first)
    assert first == second
    assert precision.compare(first, second).passed


def test_the_gate_is_one_percent_of_perplexity_and_fails_non_finite_scores():
    reference = [-2.0] * 100
    within = [-2.0 - math.log(1.009)] * 100  # perplexity 0.9 % higher
    beyond = [-2.0 - math.log(1.011)] * 100
    assert precision.compare(reference, within).passed
    assert not precision.compare(reference, beyond).passed
    assert precision.compare(reference, [-1.0] * 100).passed  # lower perplexity is no loss
    assert not precision.compare(reference, [-math.inf] * 100).passed
    assert not precision.compare([], []).passed
    assert "+1 %" in precision.compare(reference, beyond).detail
