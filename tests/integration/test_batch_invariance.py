"""Greedy decoding on the default bf16 path is batch-invariant: the same request at temperature 0
gives the same tokens, with bitwise the same logprobs, whether it runs alone, again after a partial
prefix-cache hit, with its prompt chunked 13 tokens at a time, or inside a batch of 31 others —
on the bundled SmolLM2-135M-Instruct, through the engine as serve runs it; and so does
--quantization int8 (its activations are quantised per row, its sums exact in int32), and the
default (int8 weights and an int8 KV cache where this CPU runs them and the load's probe holds).

On CPUs without AMX the runner already sends every chunk up to 2048 tokens through the row kernel
for speed, so a short prompt alone would not show a switch; the test applies the AMX machines'
threshold (~220 tokens) on every CPU, which is where a long prompt alone (one chunk over the
threshold) and the same prompt chunked or after a hit (short chunks under it) took different
attention paths and answered with different logprobs (by 0.05 on the long prompt here)."""

from __future__ import annotations

import asyncio

import pytest

import inferd.llm.runner.model_runner as model_runner
from inferd.config.settings import load_settings
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams
from inferd.llm.runner.kernels import native_ops

pytestmark = pytest.mark.slow

SHORT = "List the days of the week, one per line."
# About 800 tokens: a context to quote from, then a question about it.
LONG = (
    " ".join(
        f"Item {i}: the {animal} sat near the {place} for {i * 7 % 13} minutes."
        for i, (animal, place) in enumerate(
            zip(["cat", "dog", "bird", "fish"] * 12, ["door", "tree", "lake", "wall", "road"] * 10)
        )
    )
    + "\nWhich item mentions the lake first, and how long did its animal stay there?"
)
OTHERS = [
    f"Write a short poem about the number {i} and a {w}." for i, w in enumerate(["cat", "river"] * 15 + ["x"])
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, logprobs=0)


async def answer(client: LLMClient, ids: list[int]) -> tuple[list[int], list[float], int]:
    """The greedy tokens, their logprobs, and how many prompt tokens came from the prefix cache."""
    tokens, logprobs, cached = [], [], 0
    async for out in client.generate(ids, GREEDY):
        tokens.extend(out.new_token_ids)
        logprobs.extend(entry.logprob for entry in out.logprobs or [])
        cached = out.num_cached_tokens
    return tokens, logprobs, cached


def run(gguf, situations, precision, **overrides) -> dict[str, dict]:
    """Start the engine as serve would in bf16 with ``precision`` (--quantization, --kv-cache-dtype)
    and ``overrides``, then play each situation in order: ``name -> async fn(client, ids) ->
    answer``; returns {situation: {prompt: answer}}, and what served under "served"."""
    quantization, kv_cache_dtype = precision
    config = load_settings(
        {
            "device": "cpu",
            "dtype": "bfloat16",
            "quantization": quantization,
            "kv_cache_dtype": kv_cache_dtype,
            "kv_cache_memory": 256 * 2**20,
            **overrides,
        }
    )
    loop = asyncio.new_event_loop()
    client = LLMClient.start(gguf, config.llm_config(), loop)
    try:
        results = {"served": client.engine.config}
        for name, play in situations.items():
            results[name] = {
                label: loop.run_until_complete(
                    play(client, client.render_chat([{"role": "user", "content": q}]))
                )
                for label, q in (("short", SHORT), ("long", LONG))
            }
        return results
    finally:
        client.close()
        loop.close()


async def alone(client, ids):
    return await answer(client, ids)


async def twice(client, ids):
    await answer(client, ids)  # leaves its full blocks in the prefix cache
    return await answer(client, ids)


async def in_a_batch(client, ids):
    others = [answer(client, client.render_chat([{"role": "user", "content": q}])) for q in OTHERS]
    return (await asyncio.gather(answer(client, ids), *others))[0]


@pytest.fixture(
    scope="module",
    params=[("none", "model"), ("int8", "model"), ("auto", "auto")],
    ids=["bf16", "int8", "default"],
)
def answers(request, smollm2_bf16):
    precision = request.param
    if precision[0] == "int8" and not (native_ops() and native_ops().has_int8_linear):
        pytest.skip("no int8 linear kernel for this CPU")
    # Without prefix caching nothing a situation plays can reach the next one's prompts (the two
    # prompts share the chat template's system prompt).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_runner, "NATIVE_ROW_PAIRS_ONE_CALL", model_runner.NATIVE_ROW_PAIRS_ONE_CALL_AMX)
        cold = run(
            smollm2_bf16, {"alone": alone, "in a batch of 32": in_a_batch}, precision,
            enable_prefix_caching=False,
        )  # fmt: skip
        cached = run(smollm2_bf16, {"after a prefix hit": twice}, precision)
        chunked = run(
            smollm2_bf16, {"chunked by 13": alone}, precision, max_num_batched_tokens=13,
            enable_prefix_caching=False,
        )  # fmt: skip
        # the switch batch_invariant turns off: the long prompt alone over the AMX threshold takes SDPA
        switching = run(
            smollm2_bf16, {"alone": alone}, precision, enable_prefix_caching=False, batch_invariant=False
        )
    return {
        **cold,
        **cached,
        **chunked,
        "alone, switching to SDPA": switching["alone"],
        "served": switching["served"],
        "asked": precision,
    }


@pytest.mark.parametrize("situation", ["after a prefix hit", "chunked by 13", "in a batch of 32"])
@pytest.mark.parametrize("prompt", ["short", "long"])
def test_greedy_tokens_and_logprobs_are_the_same_as_alone(answers, situation, prompt):
    tokens, logprobs, cached = answers[situation][prompt]
    alone_tokens, alone_logprobs, alone_cached = answers["alone"][prompt]
    assert alone_cached == 0 and len(alone_tokens) > 8
    if situation == "after a prefix hit":
        assert cached > 0  # the full blocks the first run left
    assert tokens == alone_tokens
    assert logprobs == alone_logprobs  # bitwise: the same kernels in the same order per row


def test_without_batch_invariance_the_long_prompt_alone_answers_differently(answers):
    """The control: the AMX machines' switch to SDPA for a long chunk does change the numbers, so
    the test above would see it if the runner took it. Only the row kernel reads an int8 KV cache:
    with one the runner takes no such switch, batch_invariant or not."""
    _, logprobs, _ = answers["alone, switching to SDPA"]["long"]
    served = answers["served"]
    if answers["asked"] == ("auto", "auto") and native_ops().has_int8_linear:  # the probe holds here
        assert (served.quantization, served.kv_cache_dtype) == ("int8", "int8")
    if served.kv_cache_dtype == "int8":
        assert logprobs == answers["chunked by 13"]["long"][1]
    else:
        assert logprobs != answers["chunked by 13"]["long"][1]
