"""One request's bad input, failure or slow client never fails, stalls or informs another (issue 12)."""

import asyncio
import time
from collections import defaultdict
from dataclasses import replace

import pytest

import inferd.llm.engine as engine_module
from inferd.config.engine import LLMConfig
from inferd.errors import EngineError, InvalidRequestError, SlowReaderError
from inferd.llm.client import LLMClient
from inferd.llm.engine import LLMEngine, is_request_error
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = {f"good-{i}": [5, *range(8 + 9 * i, 14 + 12 * i)] for i in range(4)}
BAD_PROMPT = [7, 30, 31, 32, 33]


class FakePanic(BaseException):
    """Stands in for pyo3_runtime.PanicException: a BaseException, not an Exception."""


@pytest.fixture
def engine(tiny_llama):
    config = LLMConfig(kv_cache_memory=4 * 2**20)
    return LLMEngine(load_causal_lm(tiny_llama, config), config)


def run(engine, requests: dict) -> dict:
    """Add every request, step until all finished; each request's outputs by id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs = defaultdict(list)
    for _ in range(1000):  # a bound, so that a broken engine fails the test instead of hanging it
        if not engine.has_work:
            break
        for output in engine.step():
            outputs[output.request_id].append(output)
    engine.kv_cache.check_integrity()
    assert engine.kv_cache.usage == 0
    return outputs


def tokens(outputs) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


def good_requests() -> dict:
    return {request_id: (prompt, GREEDY) for request_id, prompt in PROMPTS.items()}


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("logit_bias", replace(GREEDY, logit_bias={99999999: 1.0})),
        ("logit_bias", replace(GREEDY, logit_bias={3: 1.0, -1: 2.0})),
        ("stop_token_ids", replace(GREEDY, stop_token_ids=(4, 200), min_tokens=2)),
        ("min_tokens", replace(GREEDY, min_tokens=11)),
        ("logprobs", replace(GREEDY, prompt_logprobs=201)),
        ("seed", replace(GREEDY, seed=2**64)),
        ("stop", replace(GREEDY, stop=("",))),
    ],
)
def test_what_the_engine_indexes_with_is_checked_before_admission(engine, field, params):
    with pytest.raises(InvalidRequestError) as caught:
        engine.check_prompt([8, 9, 10], params)
    assert caught.value.param == field
    if field in ("logit_bias", "stop_token_ids"):
        bad = next(t for t in (*params.logit_bias, *params.stop_token_ids) if not 0 <= t < 200)
        assert f"token id {bad}" in caught.value.message and "vocabulary size 200" in caught.value.message
    assert not engine.has_work


async def test_a_bad_logit_bias_is_refused_and_the_other_streams_go_on(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:

        async def generate(prompt):
            return tokens([out async for out in client.generate(prompt, GREEDY)])

        quiet = await asyncio.gather(*[generate(prompt) for prompt in PROMPTS.values()])
        streams = [asyncio.ensure_future(generate(prompt)) for prompt in PROMPTS.values()]
        await asyncio.sleep(0)  # the streams are submitted
        bad = replace(GREEDY, logit_bias={99999999: 1.0})
        with pytest.raises(InvalidRequestError, match="99999999") as caught:
            client.submit(BAD_PROMPT, bad)
        assert caught.value.param == "logit_bias"
        assert await asyncio.gather(*streams) == quiet
    finally:
        client.close()


async def test_decode_refuses_ids_outside_the_vocabulary(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:
        assert client.decode([8, 9]) == client.tokenizer.decode([8, 9])
        for bad in ([-1], [8, 200], [2**70]):
            with pytest.raises(InvalidRequestError, match="outside the vocabulary") as caught:
                client.decode(bad)
            assert caught.value.param == "tokens"
    finally:
        client.close()


def _fail_in_runner(engine, monkeypatch, error):
    execute = engine.runner.execute

    def failing(chunks):
        try:
            bad_table = engine.kv_cache.block_table("bad")
        except KeyError:  # not admitted yet
            return execute(chunks)
        if any(chunk.block_table is bad_table for chunk in chunks):
            raise error("boom")
        return execute(chunks)

    monkeypatch.setattr(engine.runner, "execute", failing)


def _fail_in_sampler(engine, monkeypatch, error, bad_params):
    sample = engine.sampler.sample

    def failing(logits, states, allowed=None):
        if any(state.params is bad_params for state in states):
            raise error("boom")
        return sample(logits, states, allowed)

    monkeypatch.setattr(engine.sampler, "sample", failing)


@pytest.mark.parametrize("error", [RuntimeError, FakePanic])
@pytest.mark.parametrize("where", ["runner", "sampler"])
def test_a_failing_request_fails_alone_and_the_others_go_on_unchanged(engine, monkeypatch, where, error):
    quiet = run(engine, good_requests())
    bad_params = replace(GREEDY)  # its own object: the injected failure recognises it by identity
    if where == "runner":
        _fail_in_runner(engine, monkeypatch, error)
    else:
        _fail_in_sampler(engine, monkeypatch, error, bad_params)
    noisy = run(engine, {**good_requests(), "bad": (BAD_PROMPT, bad_params)})
    for request_id in PROMPTS:
        assert tokens(noisy[request_id]) == tokens(quiet[request_id])
        assert noisy[request_id][-1].finish_reason == "length"
    (failed,) = noisy["bad"]
    assert failed.finish_reason == "error"
    assert isinstance(failed.error, EngineError) and "boom" in failed.error.message


def test_an_unchecked_out_of_vocabulary_bias_fails_only_its_own_request(engine, monkeypatch):
    """Should a bad id get past the checks, the step it breaks (the report: a logit_bias id past
    the vocabulary failed every stream of its step) still fails that request alone."""
    quiet = run(engine, good_requests())
    monkeypatch.setattr(engine, "_check_params", lambda params, max_tokens: None)
    bad = replace(GREEDY, logit_bias={99999999: 1.0})
    noisy = run(engine, {**good_requests(), "bad": (BAD_PROMPT, bad)})
    for request_id in PROMPTS:
        assert tokens(noisy[request_id]) == tokens(quiet[request_id])
    (failed,) = noisy["bad"]
    assert failed.finish_reason == "error"


def test_a_panicking_detokenizer_fails_its_request_only(engine, monkeypatch):
    quiet = run(engine, good_requests())

    class Panicking(engine_module.IncrementalDetokenizer):
        def push(self, token_id):
            raise FakePanic("attempt to subtract with overflow")

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "IncrementalDetokenizer", Panicking)
        engine.add_request("bad", BAD_PROMPT, GREEDY)
    noisy = run(engine, good_requests())
    for request_id in PROMPTS:
        assert tokens(noisy[request_id]) == tokens(quiet[request_id])
    (failed,) = noisy["bad"]
    assert failed.finish_reason == "error" and "subtract with overflow" in failed.error.message


def test_control_flow_is_not_a_request_error():
    assert is_request_error(RuntimeError()) and is_request_error(FakePanic())
    for exc in (KeyboardInterrupt(), SystemExit(), GeneratorExit(), asyncio.CancelledError()):
        assert not is_request_error(exc)


async def test_a_panic_while_adding_fails_that_request_and_the_loop_goes_on(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    add_request = client.engine.add_request

    def add(request_id, prompt, params, **kwargs):
        if prompt == BAD_PROMPT:
            raise FakePanic("panicked while decoding the prompt")
        add_request(request_id, prompt, params, **kwargs)

    client.engine.add_request = add
    try:
        with pytest.raises(EngineError, match="panicked"):
            [out async for out in client.generate(BAD_PROMPT, GREEDY)]
        outputs = [out async for out in client.generate([8, 9, 10], GREEDY)]
        assert outputs[-1].finish_reason == "length" and client.is_running and not client.has_failed
    finally:
        client.close()


async def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_stream_nobody_reads_is_cut_at_its_buffer_bound(tiny_llama):
    config = LLMConfig(kv_cache_memory=4 * 2**20, max_buffered_outputs=8)
    client = LLMClient.start(tiny_llama, config, asyncio.get_running_loop())
    engine = client.engine
    aborted_live = []
    engine_abort, engine_step = engine.abort, engine.step

    def abort(request_id):  # record the aborts that found the request still generating
        aborted_live.append(request_id in engine._live)
        engine_abort(request_id)

    def slow_step():  # the request must outlive the polls below however fast the machine is
        time.sleep(0.002)
        return engine_step()

    engine.abort, engine.step = abort, slow_step
    try:
        unread = client.submit([8, 9, 10, 11], SamplingParams(temperature=0.0, ignore_eos=True))
        reader = asyncio.ensure_future(_read_all(client, [12, 13, 14]))  # a client that reads
        largest = 0

        def cut() -> bool:
            nonlocal largest
            largest = max(largest, unread._collector.qsize())
            return unread.request_id not in client._collectors and unread.request_id not in engine._live

        await wait_for(cut)
        assert largest <= 8 and aborted_live[:1] == [True]
        read = await reader
        assert read[-1].finish_reason == "length" and len(tokens(read)) == GREEDY.max_tokens
        await wait_for(lambda: engine.kv_cache.usage == 0)
        with pytest.raises(SlowReaderError, match="8 generated outputs"):
            await unread.__anext__()  # what it left unread was dropped: the error comes first
    finally:
        client.close()


async def _read_all(client, prompt):
    return [out async for out in client.generate(prompt, GREEDY)]


async def test_the_prefix_cache_is_shared_only_within_a_salt(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    prompt = [(i * 5) % 150 + 8 for i in range(40)]  # two full blocks of 16, then 8 more

    async def generate(salt):
        outputs = [out async for out in client.generate(prompt, GREEDY, cache_salt=salt)]
        return outputs[0].num_cached_tokens, tokens(outputs)

    try:
        first = await generate("tenant-a")
        assert first[0] == 0
        assert await generate("tenant-b") == first  # another tenant's cached prompt stays hidden
        assert await generate(None) == first
        assert await generate("tenant-a") == (32, first[1])
        assert await generate(None) == (32, first[1])
    finally:
        client.close()


def test_a_step_failing_after_its_draws_leaves_seeded_requests_unchanged(engine, monkeypatch):
    """Seeded rows draw from their own generators inside the sampler: a step that fails after the
    draw must not make the retry draw different numbers."""
    seeded = {
        request_id: (prompt, replace(GREEDY, temperature=1.0, seed=7 + i))
        for i, (request_id, prompt) in enumerate(PROMPTS.items())
    }
    quiet = run(engine, seeded)
    bad_params = replace(GREEDY)
    sample = engine.sampler.sample

    def failing_after_the_draw(logits, states, allowed=None):
        result = sample(logits, states, allowed)
        if any(state.params is bad_params for state in states):
            raise RuntimeError("boom after drawing")
        return result

    monkeypatch.setattr(engine.sampler, "sample", failing_after_the_draw)
    noisy = run(engine, {**seeded, "bad": (BAD_PROMPT, bad_params)})
    for request_id in PROMPTS:
        assert tokens(noisy[request_id]) == tokens(quiet[request_id])
    assert noisy["bad"][-1].finish_reason == "error"
