"""int8 weights and KV cache by default where the model runs them faithfully (llm/precision.py):
the server's auto choices, what the load does with those the model cannot run, the probe that
decides, and its fallback."""

import logging
import math
from dataclasses import replace

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


def auto_config(tmp_path, **overrides) -> LLMConfig:
    """The server's own int8 choices, with verdicts kept under ``tmp_path``."""
    return LLMConfig(
        **SMALL,
        quantization="int8",
        kv_cache_dtype="int8",
        auto_precision=("quantization", "kv_cache_dtype"),
        cache_dir=str(tmp_path),
        **overrides,
    )


def kept_verdicts(tmp_path) -> list:
    return sorted((tmp_path / "precision").glob("*.json")) if (tmp_path / "precision").is_dir() else []


@needs_int8
def test_the_probe_serves_int8_where_it_holds_and_leaves_no_trace(wide_llama, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="inferd.llm.precision")
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "int8")
    assert engine.facts.kv_int8 and engine.runner.kv_int8
    assert "serving int8 weights and an int8 KV cache (perplexity of the probe text" in caplog.text
    # nothing of the probe is left to hit or to count
    kv = engine.kv_cache
    assert kv.num_prefix_queries == kv.num_prefix_hits == 0 and kv.usage == 0
    assert not engine.has_work
    ids = engine.tokenizer(precision.PROBE_TEXT)["input_ids"]
    assert kv.find_cached_prefix(ids).num_tokens == 0


@needs_int8
def test_a_kept_verdict_spares_the_probe_until_what_it_depends_on_changes(
    wide_llama, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="inferd.llm.precision")
    precision.load_engine(wide_llama, auto_config(tmp_path))
    assert len(kept_verdicts(tmp_path)) == 1
    probes = []
    real = precision.probe_logprobs
    monkeypatch.setattr(precision, "probe_logprobs", lambda engine: probes.append(engine) or real(engine))
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))
    assert probes == [] and "(checked before: perplexity of the probe text" in caplog.text
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "int8")
    # another gate is another question
    monkeypatch.setattr(precision, "PERPLEXITY_GATE", 0.02)
    precision.load_engine(wide_llama, auto_config(tmp_path))
    assert len(probes) == 2 and len(kept_verdicts(tmp_path)) == 2


@needs_int8
def test_a_model_that_fails_the_probe_is_served_without_int8(wide_llama, tmp_path, caplog, monkeypatch):
    """A gate no int8 model can meet (perplexity must fall by half): the server loads the model again
    without its own int8 choices, keeps the ones asked for by name, says why, and remembers."""
    monkeypatch.setattr(precision, "PERPLEXITY_GATE", -0.5)
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("none", "model")
    assert not engine.facts.kv_int8
    assert "not serving int8 weights and an int8 KV cache (perplexity" in caplog.text
    assert "over the gate of +-50 %" in caplog.text
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))  # the kept verdict: no probe
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("none", "model")
    assert "not serving int8 weights and an int8 KV cache (checked before" in caplog.text
    named = replace(auto_config(tmp_path), auto_precision=("kv_cache_dtype",))
    engine = precision.load_engine(wide_llama, named)
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "model")


@needs_int8
@pytest.mark.parametrize("where", ["without int8", "with int8"])
def test_a_probe_that_cannot_run_keeps_the_models_precision_and_is_not_kept(
    wide_llama, tmp_path, caplog, monkeypatch, where
):
    """An error in the probe is no reason to fail the model: it serves without int8, and the next
    load tries again."""
    real = precision.probe_logprobs

    def failing(engine):
        int8 = engine.config.quantization == "int8" or engine.facts.kv_int8
        if int8 == (where == "with int8"):
            raise RuntimeError("probe broke")
        return real(engine)

    monkeypatch.setattr(precision, "probe_logprobs", failing)
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("none", "model")
    assert "probe broke" in caplog.text and kept_verdicts(tmp_path) == []


@needs_int8
def test_where_both_int8_choices_fail_together_the_int8_weights_alone_are_tried(
    wide_llama, tmp_path, monkeypatch, caplog
):
    """An int8 cache that costs this model too much (here: every token's log-probability one lower
    with it) takes only itself back: the int8 weights alone pass and serve, both verdicts are kept,
    and the next load goes straight to the weights alone."""
    real = precision.probe_logprobs
    probes = []

    def cache_hurts(engine):
        probes.append((engine.config.quantization, engine.config.kv_cache_dtype))
        logprobs = real(engine)
        return [lp - 1.0 for lp in logprobs] if engine.facts.kv_int8 else logprobs

    monkeypatch.setattr(precision, "probe_logprobs", cache_hurts)
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "model")
    assert probes == [("none", "model"), ("int8", "int8"), ("int8", "model")]  # the reference scored once
    assert "not serving int8 weights and an int8 KV cache (perplexity" in caplog.text
    assert len(kept_verdicts(tmp_path)) == 2
    engine = precision.load_engine(wide_llama, auto_config(tmp_path))
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("int8", "model")
    assert len(probes) == 3  # nothing probed again


@needs_int8
def test_a_context_too_short_to_tell_keeps_the_models_precision(wide_llama, tmp_path):
    engine = precision.load_engine(
        wide_llama, auto_config(tmp_path, max_model_len=precision.MIN_PROBE_TOKENS)
    )
    assert (engine.config.quantization, engine.config.kv_cache_dtype) == ("none", "model")
    assert kept_verdicts(tmp_path) == []


@needs_int8
def test_what_the_config_rules_out_is_reverted_before_any_probe(
    model_root, tiny_llama, tmp_path, monkeypatch
):
    """tiny_llama's 16-wide heads and Qwen3's per-head q/k norms rule out the int8 cache from the
    model's config alone: with only that choice left to the server, nothing is probed."""
    from tests.unit.llm.test_architectures import build

    monkeypatch.setattr(precision, "_reference", lambda *args: pytest.fail("probed"))
    qwen3 = build(model_root, "qwen3", tiny_llama, head_dim=32)[0]
    for path in (tiny_llama, qwen3):
        config = replace(auto_config(tmp_path), auto_precision=("kv_cache_dtype",))
        engine = precision.load_engine(path, config)
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
