"""Prompt-lookup speculative decoding on the bundled SmolLM2-135M-Instruct, bf16 as serve runs it:
answers that quote their context come out token for token, logprob for logprob, as without drafts
(batch invariance makes each verification row compute what plain decoding computes), with stop
strings and max_tokens cutting inside a step's accepted drafts, alone and four at once; and most
of the drafts are accepted."""

from __future__ import annotations

import asyncio

import pytest

from inferd.config.settings import load_settings
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams

pytestmark = pytest.mark.slow

CONTEXT = (
    "The ferry left the harbour a few minutes after seven, while the fish market was still washing "
    "down its stones. Most of the passengers were people who made the crossing every morning: a "
    "nurse going to the island clinic, two carpenters with a box of tools between them, and a "
    "teacher marking exercise books on her knee. The captain, a quiet man called Tomas, had worked "
    "the route for nineteen years and could tell the weather from the colour of the water near the "
    "breakwater."
)
QUESTIONS = [
    "Quote the sentence about the captain word for word.",
    "Copy the first sentence of the text exactly.",
    "Who were the passengers? Answer with the words of the text.",
    "Repeat the text.",
]
CASES = {  # what each request asks besides greedy decoding
    "plain": SamplingParams(temperature=0.0, max_tokens=80, logprobs=2),
    "stop string": SamplingParams(temperature=0.0, max_tokens=80, logprobs=0, stop=("years",)),
    "max_tokens": SamplingParams(temperature=0.0, max_tokens=13, logprobs=0),
}


async def answer(client: LLMClient, ids: list[int], params: SamplingParams):
    tokens, text, logprobs, finish = [], "", [], None
    async for out in client.generate(ids, params):
        tokens.extend(out.new_token_ids)
        text += out.new_text
        logprobs.extend((entry.logprob, entry.top) for entry in out.logprobs or [])
        finish = out.finish_reason
    return tokens, text, logprobs, finish


def answers(gguf, speculative_tokens: int | None) -> tuple[dict, tuple[int, int]]:
    """Every case's answers, and the engine's (draft, accepted) counts; speculative_tokens None:
    the server's default."""
    overrides = {"speculative_tokens": speculative_tokens} if speculative_tokens is not None else {}
    settings = load_settings(
        {"device": "cpu", "dtype": "bfloat16", "kv_cache_memory": 256 * 2**20, **overrides}
    )
    loop = asyncio.new_event_loop()
    client = LLMClient.start(gguf, settings.llm_config(), loop)
    try:
        prompts = [client.render_chat([{"role": "user", "content": f"{CONTEXT}\n\n{q}"}]) for q in QUESTIONS]

        async def play():
            got = {}
            for case, params in CASES.items():
                got[case, "alone"] = [await answer(client, ids, params) for ids in prompts]
                got[case, "four at once"] = await asyncio.gather(
                    *(answer(client, ids, params) for ids in prompts)
                )
            return got

        got = loop.run_until_complete(play())
        return got, (client.engine.num_draft_tokens, client.engine.num_accepted_tokens)
    finally:
        client.close()
        loop.close()


@pytest.fixture(scope="module")
def runs(smollm2_bf16):
    return answers(smollm2_bf16, 0), answers(smollm2_bf16, None)  # off, and the default: on here


def test_drafts_change_nothing_in_the_output(runs):
    (plain, (drafted, _)), (speculative, _) = runs
    assert drafted == 0
    assert speculative.keys() == plain.keys()
    for key, expected in plain.items():
        assert speculative[key] == expected, key
    assert {finish for _, _, _, finish in plain["stop string", "alone"]} >= {"stop"}
    assert {finish for _, _, _, finish in plain["max_tokens", "alone"]} == {"length"}


def test_answers_that_quote_their_context_accept_most_drafts(runs):
    _, (_, (drafted, accepted)) = runs
    assert drafted > 100
    assert accepted / drafted > 0.5


def test_by_default_no_drafts_where_the_forward_is_not_batch_invariant(smollm2_bf16):
    """transformers' classes run torch's bf16 matmuls, whose rounding depends on the row count:
    drafts there could change greedy output, so the default leaves them off."""
    settings = load_settings(
        {"device": "cpu", "dtype": "bfloat16", "kv_cache_memory": 64 * 2**20, "model_impl": "transformers"}
    )
    loop = asyncio.new_event_loop()
    client = LLMClient.start(smollm2_bf16, settings.llm_config(), loop)
    try:
        assert client.engine.runner.decoder is None
        assert not client.engine.runner.batch_invariant and client.engine.drafter is None
    finally:
        client.close()
        loop.close()
