"""Engine-level sampling behaviour that the API relies on."""

import asyncio
import time

import pytest

from inferd.config.engine import LLMConfig
from inferd.errors import EngineError
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams


async def generate(client, ids, params):
    tokens, text, finish = [], "", None
    async for out in client.generate(ids, params):
        tokens.extend(out.new_token_ids)
        text += out.new_text
        finish = out.finish_reason
    return tokens, text, finish


async def test_seeded_sampling_ignores_batch_companions(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:
        seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
        prompt = [8, 9, 10, 11]
        alone = await generate(client, prompt, seeded)
        noise = SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)
        companions = [generate(client, [12 + i, 13, 14], noise) for i in range(5)]
        together = await asyncio.gather(*companions[:3], generate(client, prompt, seeded), *companions[3:])
        assert together[3] == alone
        other_seed = await generate(
            client,
            prompt,
            SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True),
        )
        assert other_seed[0] != alone[0]
    finally:
        client.close()


async def test_stop_strings_and_limits(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        tokens, text, finish = await generate(client, [8, 9, 10], greedy)
        assert finish == "length" and len(tokens) == 12
        words = text.split()
        stop = words[3]
        cut = await generate(
            client, [8, 9, 10], SamplingParams(temperature=0.0, max_tokens=12, stop=(stop,), ignore_eos=True)
        )
        assert cut[2] == "stop"
        assert stop not in cut[1] and text.startswith(cut[1])
        stop_id = await generate(
            client,
            [8, 9, 10],
            SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(tokens[2],), ignore_eos=True),
        )
        assert stop_id[0] == tokens[:3] and stop_id[2] == "stop"
    finally:
        client.close()


async def test_a_failing_request_does_not_stop_the_engine(tiny_llama, monkeypatch):
    import inferd.llm.engine as engine_module

    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        good = client.generate([8, 9, 10], params)
        first = await good.__anext__()  # admitted, with a working detokenizer

        class Broken(engine_module.IncrementalDetokenizer):
            def push(self, token_id):
                raise RuntimeError("boom")

        with monkeypatch.context() as patch:
            patch.setattr(engine_module, "IncrementalDetokenizer", Broken)
            with pytest.raises(EngineError, match="boom"):
                await generate(client, [11, 12], params)
        rest = [out async for out in good]
        assert rest[-1].finish_reason == "length"
        assert len(first.new_token_ids) + sum(len(o.new_token_ids) for o in rest) == 6
        assert (await generate(client, [8, 9, 10], params))[2] == "length"
    finally:
        client.close()


async def test_concurrent_identical_prompts_share_their_blocks(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:
        prompt = [(i * 5) % 150 + 8 for i in range(40)]  # two full blocks of 16, then 8 more
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        results = await asyncio.gather(*[generate(client, prompt, params) for _ in range(4)])
        assert all(r == results[0] for r in results)
        # The first request computes the two full blocks; the other three reuse them.
        assert client.engine.kv_cache.num_prefix_hits == 3 * 32
    finally:
        client.close()


async def test_stats_report_the_prefix_hit_rate(tiny_llama):
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    try:
        prompt = list(range(10, 50))
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        await generate(client, prompt, params)
        await generate(client, prompt, params)
        line = client.engine.stats_line()
        assert "prefix cache hit rate 40.0% (32/80 tokens)" in line
    finally:
        client.close()


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_submitted_request_runs_before_it_is_read_and_dropping_it_aborts(tiny_llama):
    """submit() hands the request over at once (its prefill overlaps the response's start); a stream
    dropped unread, like a response abandoned before streaming, is aborted and frees its blocks."""
    client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    aborted_live = []
    engine_abort = client.engine.abort

    def abort(request_id):  # record the aborts that found the request still generating
        aborted_live.append(request_id in client.engine._live)
        engine_abort(request_id)

    client.engine.abort = abort
    engine_step = client.engine.step

    def slow_step():  # the request must outlive the polls below however fast the machine is
        time.sleep(0.002)
        return engine_step()

    client.engine.step = slow_step
    try:
        params = SamplingParams(temperature=0.0, ignore_eos=True)  # up to the 256-token context
        stream = client.submit([8, 9, 10, 11], params)
        await wait_for(lambda: client.stats().num_running == 1)  # running, though nobody has read it
        assert client.engine.kv_cache.usage > 0
        del stream
        await wait_for(lambda: client.stats().num_running == 0 and client.engine.kv_cache.usage == 0)
        assert aborted_live == [True]
        short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        outputs = [out async for out in client.submit([8, 9, 10], short)]
        assert outputs[-1].finish_reason == "length" and not client._collectors
    finally:
        client.close()
