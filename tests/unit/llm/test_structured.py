"""Grammar-constrained decoding in the engine (issue 14): every output follows its grammar.

The model is a tiny random Llama whose byte-level tokenizer can spell any text: left alone it writes
garbage, so every property of a guided output below is the grammar's doing."""

import asyncio
import json
import re
from collections import defaultdict
from dataclasses import dataclass, replace

import jsonschema
import llguidance
import numpy as np
import pytest
import torch
from llguidance import LLMatcher

from inferd.config.engine import LLMConfig
from inferd.errors import InvalidRequestError
from inferd.llm.client import LLMClient
from inferd.llm.engine import LLMEngine
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.params import Guide, SamplingParams
from inferd.llm.sampler import AllowedTokens, Sampler, SamplingState
from tests.models import build_byte_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
# Compact JSON: with flexible whitespace a random model may write blanks until max_tokens.
JSON_GUIDE = Guide(LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False}))
# A short one, for the tests about scheduling rather than about JSON.
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}
SMALL_GUIDE = Guide(
    LLMatcher.grammar_from_json_schema(SMALL_SCHEMA, overrides={"whitespace_flexible": False})
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=200)
PROMPT = "Describe a person as JSON."
CONFIG = LLMConfig(kv_cache_memory=4 * 2**20)
EOS_IDS = [257, 258]  # after the 256 bytes and <|im_start|>


@dataclass
class Result:
    token_ids: list
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    num_cached_tokens: int = 0
    logprobs: list | None = None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_byte_llama(
        tmp_path_factory.mktemp("structured"),
        "byte-llama",
        "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
        added=("</think>",),
    )
    # Two EOS ids, as Llama-3 and Qwen models have: the grammar must treat both alike.
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == EOS_IDS
    )
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = EOS_IDS
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="module")
def loaded(model):
    return load_causal_lm(model, CONFIG)


def make_engine(loaded, config=CONFIG) -> LLMEngine:
    return LLMEngine(loaded, config)


def encode(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run(engine, requests: dict) -> dict[str, Result]:
    """Add every request (id → (prompt ids, params)), step until all finished."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    results: dict[str, Result] = defaultdict(lambda: Result([]))
    for _ in range(2000):  # a bound, so that a broken engine fails the test instead of hanging it
        if not engine.has_work:
            break
        for output in engine.step():
            result = results[output.request_id]
            result.token_ids += output.new_token_ids
            result.text += output.new_text
            result.finish_reason = output.finish_reason
            result.error = output.error
            result.num_cached_tokens = output.num_cached_tokens
            if output.logprobs is not None:
                result.logprobs = (result.logprobs or []) + output.logprobs
    assert not engine.has_work
    engine.kv_cache.check_integrity()
    assert engine.kv_cache.usage == 0
    return dict(results)


def assert_valid_json(result: Result, schema=SCHEMA) -> None:
    assert result.error is None and result.finish_reason == "stop", result
    jsonschema.validate(json.loads(result.text), schema)


def test_json_schema_greedy_n2(loaded):
    engine = make_engine(loaded)
    prompt = encode(engine, PROMPT)
    params = replace(GREEDY, guide=JSON_GUIDE)
    results = run(engine, {"a": (prompt, params), "b": (prompt, params)})  # n = 2: two requests
    for result in results.values():
        assert_valid_json(result)
    assert results["a"].token_ids == results["b"].token_ids  # greedy: the same choice twice
    # Unguided, this model writes no JSON at all: the constraint did the work.
    with pytest.raises(ValueError):
        json.loads(run(engine, {"free": (prompt, replace(GREEDY, max_tokens=40))})["free"].text)


def test_json_schema_sampled_seeds_are_valid_and_batch_independent(loaded):
    engine = make_engine(loaded)
    prompt = encode(engine, PROMPT)
    requests = {
        f"seed-{seed}": (prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=200, guide=JSON_GUIDE))
        for seed in range(4)
    }
    together = run(engine, requests)
    for result in together.values():
        assert_valid_json(result)
    assert len({result.text for result in together.values()}) > 1  # sampling, not one forced text
    alone = run(engine, {"seed-2": requests["seed-2"]})
    assert alone["seed-2"].token_ids == together["seed-2"].token_ids


@pytest.mark.parametrize(
    ("grammar", "pattern"),
    [
        (llguidance.grammar_from("regex", r"[a-z]{3}-[0-9]{2,4}"), r"[a-z]{3}-[0-9]{2,4}"),
        (llguidance.grammar_from("choice", json.dumps(["red", "green", "blue"])), r"red|green|blue"),
        (
            llguidance.grammar_from(
                "lark",
                'start: greeting ", " name "!"\ngreeting: "hi" | "hello"\nname: /[A-Z][a-z]{1,5}/',
            ),
            r"(hi|hello), [A-Z][a-z]{1,5}!",
        ),
    ],
    ids=["regex", "choice", "lark"],
)
def test_grammars_fullmatch_greedy_and_sampled(loaded, grammar, pattern):
    engine = make_engine(loaded)
    prompt = encode(engine, "Answer:")
    requests = {"greedy": (prompt, replace(GREEDY, guide=Guide(grammar)))}
    for seed in range(3):
        requests[f"seed-{seed}"] = (
            prompt,
            SamplingParams(temperature=1.0, seed=seed, max_tokens=50, guide=Guide(grammar)),
        )
    for result in run(engine, requests).values():
        assert result.finish_reason == "stop", result
        assert re.fullmatch(pattern, result.text), result.text


def test_finish_length_when_max_tokens_is_too_small(loaded):
    engine = make_engine(loaded)
    guide = Guide(llguidance.grammar_from("regex", "[a-z]{10}"))
    result = run(
        engine, {"r": (encode(engine, "x"), SamplingParams(temperature=0.0, max_tokens=5, guide=guide))}
    )["r"]
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert re.fullmatch("[a-z]{5}", result.text)


@pytest.mark.parametrize("eos_id", EOS_IDS)
def test_eos_only_where_the_grammar_may_end(loaded, eos_id):
    """A huge bias makes the model want EOS at every step: it gets it exactly when the grammar
    first allows ending — through either of the model's EOS ids."""
    engine = make_engine(loaded)
    guide = Guide(llguidance.grammar_from("regex", "[0-9]{3,6}"))
    params = SamplingParams(temperature=0.0, max_tokens=20, logit_bias={eos_id: 100.0}, guide=guide)
    result = run(engine, {"r": (encode(engine, "n="), params)})["r"]
    assert result.finish_reason == "stop" and re.fullmatch("[0-9]{3}", result.text), result
    assert result.token_ids[-1] == eos_id


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"min_tokens": 5}, "[0-9]{5}"),  # EOS blocked until 5 tokens are out
        ({"min_tokens": 12}, "[0-9]{6}"),  # more than the grammar allows: the grammar wins
        ({"ignore_eos": True}, "[0-9]{6}"),  # no EOS while the grammar allows a digit
    ],
)
def test_min_tokens_and_ignore_eos_yield_to_the_grammar(loaded, extra, pattern):
    engine = make_engine(loaded)
    guide = Guide(llguidance.grammar_from("regex", "[0-9]{3,6}"))
    params = SamplingParams(temperature=0.0, max_tokens=20, logit_bias={257: 100.0}, guide=guide, **extra)
    result = run(engine, {"r": (encode(engine, "n="), params)})["r"]
    assert result.finish_reason == "stop" and re.fullmatch(pattern, result.text), result


def test_logprobs_cover_only_allowed_tokens(loaded):
    engine = make_engine(loaded)
    guide = Guide(llguidance.grammar_from("regex", "[0-9]{8}"))
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=10, guide=guide)
    result = run(engine, {"r": (encode(engine, "n="), params)})["r"]
    assert re.fullmatch("[0-9]{8}", result.text)
    digits = set(encode(engine, "0123456789"))
    for logprob in result.logprobs[:8]:
        # The distribution is the model's, renormalised over the ten digits: they hold all the mass.
        assert {token_id for token_id, _ in logprob.top} == digits
        assert sum(np.exp(value) for _, value in logprob.top) == pytest.approx(1.0, abs=1e-4)
        assert logprob.token_id == logprob.top[0][0] and logprob.logprob == logprob.top[0][1]


def test_logprobs_list_no_alternative_the_grammar_rules_out(loaded):
    """More alternatives asked for than the grammar allows: the allowed ones, not -inf fillers
    (which reached clients as -9999 entries, and as nulls in the completions' legacy object)."""
    engine = make_engine(loaded)
    guide = Guide(llguidance.grammar_from("choice", json.dumps(["yes", "no"])))
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=5, guide=guide)
    result = run(engine, {"r": (encode(engine, "ok?"), params)})["r"]
    assert result.text in ("yes", "no")
    assert {token_id for token_id, _ in result.logprobs[0].top} == set(encode(engine, "yn"))
    for logprob in result.logprobs[1:]:  # the rest of the word is forced: one alternative, itself
        assert [token_id for token_id, _ in logprob.top] == [logprob.token_id]


@pytest.mark.parametrize(
    ("grammar", "text"),
    [
        (llguidance.grammar_from("regex", r"<\|im_end\|> ok"), "<|im_end|> ok"),
        (llguidance.grammar_from("choice", json.dumps(["</think>"])), "</think>"),
        (LLMatcher.grammar_from_json_schema({"const": "<|im_start|></think>"}), '"<|im_start|></think>"'),
    ],
    ids=["regex-special", "choice-added", "json-both"],
)
def test_text_a_grammar_forces_is_spelled_not_taken_for_an_added_token(loaded, grammar, text):
    """Text a grammar forces that equals an added token's (<|im_end|>, </think>): llguidance's mask
    allowed only that token, which its matcher then refused, so the request failed (a 500 over
    HTTP); the text is spelled in ordinary tokens instead."""
    engine = make_engine(loaded)
    result = run(engine, {"r": (encode(engine, "x"), replace(GREEDY, guide=Guide(grammar)))})["r"]
    assert result.error is None and result.finish_reason == "stop", result
    assert result.text == text
    assert all(token_id < 256 for token_id in result.token_ids if token_id not in EOS_IDS)


@pytest.mark.parametrize(
    "grammar",
    [LLMatcher.grammar_from_json_schema({"$ref": "#"}), llguidance.grammar_from("lark", "start: a\na: a")],
    ids=["schema-only-refers-to-itself", "lark-rule-only-refers-to-itself"],
)
def test_a_grammar_that_allows_no_output_is_refused_by_the_check(loaded, grammar):
    engine = make_engine(loaded)
    with pytest.raises(InvalidRequestError) as caught:
        engine.check_guide(Guide(grammar, param="guided_grammar"))
    assert caught.value.param == "guided_grammar" and "allows no output" in caught.value.message


def test_eos_waits_for_the_start_marker(loaded):
    """A reply that ended before the marker (a reasoning model that stops inside its reasoning)
    would end without the grammar's output: until the marker, EOS is masked."""
    engine = make_engine(loaded)
    prompt = encode(engine, "x")
    (marker,) = encode(engine, "</think>")
    guide = Guide(llguidance.grammar_from("regex", "[a-z]{4}"), start_after=(marker,))
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={257: 100.0, 258: 100.0}, guide=guide)
    never = run(engine, {"r": (prompt, params)})["r"]
    assert never.finish_reason == "length" and not set(never.token_ids) & set(EOS_IDS), never
    closes = run(engine, {"r": (prompt, replace(params, logit_bias={257: 100.0, marker: 50.0}))})["r"]
    assert closes.finish_reason == "stop" and closes.token_ids[0] == marker, closes
    assert re.fullmatch("</think>[a-z]{4}", closes.text), closes.text


def test_start_after_leaves_the_text_before_the_marker_free(loaded):
    engine = make_engine(loaded)
    prompt = encode(engine, "Think first.")
    free = run(engine, {"free": (prompt, replace(GREEDY, max_tokens=40))})["free"].token_ids
    # A marker the unguided greedy text writes: its first two-token pair not seen before position 4.
    k = next(k for k in range(4, 30) if all(free[j : j + 2] != free[k : k + 2] for j in range(k)))
    marker = tuple(free[k : k + 2])
    guide = Guide(llguidance.grammar_from("regex", "[a-z]{4}"), start_after=marker)
    guided = run(engine, {"r": (prompt, replace(GREEDY, max_tokens=40, guide=guide))})["r"]
    assert guided.finish_reason == "stop"
    assert guided.token_ids[: k + 2] == free[: k + 2]  # free text up to and with the marker
    assert re.fullmatch("[a-z]{4}", engine.tokenizer.decode(guided.token_ids[k + 2 :]))
    # A marker the output never writes: the grammar never applies, the text is the free one.
    never = Guide(guide.grammar, start_after=(encode(engine, "</think>")[0],))
    assert "</think>" not in engine.tokenizer.decode(free)
    assert run(engine, {"r": (prompt, replace(GREEDY, max_tokens=40, guide=never))})["r"].token_ids == free


def test_guided_and_unguided_in_one_batch_do_not_mix(loaded):
    engine = make_engine(loaded)
    prompt = encode(engine, "Say something.")
    alone = run(engine, {"free": (prompt, replace(GREEDY, max_tokens=30))})["free"]
    batch = run(
        engine,
        {
            "g1": (encode(engine, PROMPT), replace(GREEDY, guide=SMALL_GUIDE)),
            "free": (prompt, replace(GREEDY, max_tokens=30)),
            "g2": (
                encode(engine, "Another one"),
                SamplingParams(temperature=1.0, seed=7, max_tokens=200, guide=JSON_GUIDE),
            ),
        },
    )
    assert batch["free"].token_ids == alone.token_ids
    assert_valid_json(batch["g1"], SMALL_SCHEMA)
    assert_valid_json(batch["g2"])


def test_prefix_cache_hit_keeps_output_valid(loaded):
    engine = make_engine(loaded)
    prompt = encode(engine, PROMPT * 3)
    first = run(engine, {"a": (prompt, replace(GREEDY, guide=SMALL_GUIDE))})["a"]
    second = run(engine, {"b": (prompt, replace(GREEDY, guide=SMALL_GUIDE))})["b"]
    assert second.num_cached_tokens > 0
    assert_valid_json(second, SMALL_SCHEMA)
    assert second.token_ids == first.token_ids


def test_chunked_prefill_and_preemption_keep_output_valid(loaded):
    prompts = {f"r{i}": loaded.tokenizer.encode(f"{i}: " + PROMPT * 2) for i in range(4)}
    params = replace(GREEDY, max_tokens=50, guide=SMALL_GUIDE)
    expected = run(make_engine(loaded), {rid: (prompt, params) for rid, prompt in prompts.items()})
    for result in expected.values():
        assert_valid_json(result, SMALL_SCHEMA)
    configs = {
        "chunked-prefill": LLMConfig(kv_cache_memory=4 * 2**20, max_num_batched_tokens=16),
        # 32 blocks of 4 tokens at 512 bytes a token: four requests of ~70 tokens cannot all fit.
        "preemption": LLMConfig(kv_cache_memory=32 * 4 * 512, block_size=4),
    }
    for name, config in configs.items():
        engine = make_engine(loaded, config)
        got = run(engine, {rid: (prompt, params) for rid, prompt in prompts.items()})
        for rid, result in got.items():
            assert result.token_ids == expected[rid].token_ids, name
        if name == "preemption":
            assert engine.scheduler.num_preemptions > 0


def test_a_matcher_in_error_fails_its_request_alone(loaded):
    engine = make_engine(loaded)
    prompt = encode(engine, PROMPT)
    engine.add_request("bad", prompt, replace(GREEDY, guide=JSON_GUIDE))
    engine.step()  # the first token, "{"
    engine._live["bad"].guide.matcher.consume_token(encode(engine, "x")[0])  # refused: error state
    results = run(engine, {"good": (prompt, replace(GREEDY, guide=JSON_GUIDE))})
    error = results["bad"].error
    assert isinstance(error, InvalidRequestError) and results["bad"].finish_reason == "error"
    assert error.param == "response_format" and "cannot follow the grammar" in error.message
    assert_valid_json(results["good"])


def test_mask_time_is_kept_per_step(loaded):
    engine = make_engine(loaded)
    engine.add_request("r", encode(engine, PROMPT), replace(GREEDY, guide=JSON_GUIDE))
    engine.add_request("free", encode(engine, PROMPT), GREEDY)
    engine.step()
    assert engine.num_mask_rows == 1 and engine.mask_seconds > 0
    engine.abort("r")
    engine.step()
    assert engine.num_mask_rows == 0 and engine.mask_seconds == 0


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (llguidance.grammar_from("regex", "a("), "unclosed group"),
        (llguidance.grammar_from("json_schema", '{"type": "foo"}'), "Invalid type: foo"),
        (llguidance.grammar_from("lark", "start: foo"), 'unknown name: "foo"'),
        ("not a grammar at all {", "invalid grammar"),
    ],
)
def test_check_guide_rejects_invalid_grammars(loaded, grammar, message):
    engine = make_engine(loaded)
    with pytest.raises(InvalidRequestError) as caught:
        engine.check_guide(Guide(grammar))
    assert caught.value.param == "response_format"
    assert message in caught.value.message and "\n" not in caught.value.message
    assert "|" not in caught.value.message  # no excerpt of the generated grammar
    engine.check_guide(JSON_GUIDE)  # a valid one passes


def test_a_checked_grammar_is_not_compiled_again_on_the_engine_thread(loaded, monkeypatch):
    """check_guide (the API's worker thread) compiles; add_request (the engine thread) only copies,
    for each of a request's choices, and the copies are independent matchers."""
    engine = make_engine(loaded)
    engine.check_guide(SMALL_GUIDE)
    compiled = []
    original = engine.guides._compile
    monkeypatch.setattr(
        engine.guides, "_compile", lambda guide: compiled.append(guide.grammar) or original(guide)
    )
    prompt = encode(engine, PROMPT)
    results = run(engine, {f"r{i}": (prompt, replace(GREEDY, guide=SMALL_GUIDE)) for i in range(2)})
    assert compiled == []
    for result in results.values():
        jsonschema.validate(json.loads(result.text), SMALL_SCHEMA)
    unchecked = Guide(llguidance.grammar_from("regex", "[a-z]{3}"))
    (result,) = run(engine, {"u": (prompt, replace(GREEDY, guide=unchecked))}).values()
    assert compiled == [unchecked.grammar] and re.fullmatch("[a-z]{3}", result.text)


class Observer:
    def __init__(self) -> None:
        self.masks: list[tuple[float, int]] = []

    def on_output(self, output, elapsed_s, gap_s) -> None:
        pass

    def on_abort(self, elapsed_s) -> None:
        pass

    def on_step(self, num_tokens) -> None:
        pass

    def on_mask(self, seconds, num_rows) -> None:
        self.masks.append((seconds, num_rows))


async def test_a_grammar_that_fails_to_compile_fails_its_request_alone(model):
    client = LLMClient.start(model, CONFIG, asyncio.get_running_loop())
    observer = Observer()
    client.set_observer(observer)
    try:
        bad = replace(GREEDY, guide=Guide(llguidance.grammar_from("regex", "a(")))
        with pytest.raises(InvalidRequestError):
            await asyncio.to_thread(client.check_guide, bad.guide)
        prompt = client.encode(PROMPT, add_special_tokens=False)

        async def text(params):
            return "".join([out.new_text async for out in client.generate(prompt, params)])

        failed, good = await asyncio.gather(
            text(bad), text(replace(GREEDY, guide=JSON_GUIDE)), return_exceptions=True
        )
        assert isinstance(failed, InvalidRequestError) and failed.param == "response_format"
        jsonschema.validate(json.loads(good), SCHEMA)
        assert observer.masks and all(seconds > 0 and rows == 1 for seconds, rows in observer.masks)
    finally:
        client.close()


def test_mask_histogram_is_exported():
    from inferd.api.metrics import Metrics, _GenerationObserver

    metrics = Metrics()
    _GenerationObserver(metrics, "m").on_mask(0.0003, 2)
    body = metrics.render().decode()
    assert 'inferd:structured_mask_seconds_count{model="m"} 1.0' in body
    assert 'inferd:structured_mask_seconds_bucket{le="0.0005",model="m"} 1.0' in body


@pytest.mark.parametrize("rows", [[0, 1, 2], [1], [0, 2]])
def test_sampler_mask_equals_llguidance_reference(rows):
    """The sampler's vectorised mask against llguidance's own numpy implementation."""
    from llguidance.numpy import apply_token_bitmask_inplace

    vocab = 100
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator)
    bitmask = np.random.default_rng(1).integers(-(2**31), 2**31, size=(len(rows), 4), dtype=np.int32)
    states = [SamplingState.create(SamplingParams(), [1]) for _ in range(3)]
    got = Sampler(vocab, set()).process_logits(logits, states, AllowedTokens(rows, bitmask))
    expected = logits.numpy().copy()
    reference = expected[rows]
    apply_token_bitmask_inplace(reference, bitmask)
    expected[rows] = reference
    np.testing.assert_array_equal(got.numpy(), expected)
