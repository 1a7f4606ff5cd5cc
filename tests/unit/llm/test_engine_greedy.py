"""The engine's greedy output is token-identical to transformers' generate (fp32)."""

import asyncio

import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(vocab: int) -> list[list[int]]:
    # Eight prompts of different lengths (3 to 70 tokens), some sharing a long prefix.
    base = [(i * 7) % (vocab - 10) + 8 for i in range(80)]
    return [base[: 3 + 9 * k] if k % 2 else [5, *base[k : k + 4 + 8 * k]] for k in range(8)]


def reference(path, prompt_ids, max_new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    outs = []
    for ids in prompt_ids:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outs.append(out[0, len(ids) :].tolist())
    return outs


async def run_all(client, prompt_ids, params=GREEDY):
    async def one(ids):
        tokens = []
        async for out in client.generate(ids, params):
            tokens.extend(out.new_token_ids)
        return tokens

    return await asyncio.gather(*[one(ids) for ids in prompt_ids])


@pytest.fixture(scope="module")
def expected(tiny_llama):
    ids = prompts(200)
    return ids, reference(tiny_llama, ids, GREEDY.max_tokens)


CONFIGS = {
    "plain": LLMConfig(kv_cache_memory=8 * 2**20),
    "chunked-prefill": LLMConfig(kv_cache_memory=8 * 2**20, max_num_batched_tokens=16),
    # 24 blocks of 4 tokens at 512 bytes a token (2 layers × K,V × 2 heads × 16 dims × fp32):
    # the longest request needs 21 of them, so eight at once must preempt.
    "preemption": LLMConfig(kv_cache_memory=24 * 4 * 512, block_size=4),
    "no-prefix-cache": LLMConfig(kv_cache_memory=8 * 2**20, enable_prefix_caching=False),
    # transformers' own Llama classes with our paged attention, instead of inferd's forward.
    "transformers-impl": LLMConfig(kv_cache_memory=8 * 2**20, model_impl="transformers"),
    # Decode attention through torch's gather + SDPA instead of the native kernel.
    "torch-attention": LLMConfig(kv_cache_memory=8 * 2**20, native_kernels=False),
    # Prompt-lookup drafts verified with each decode (all eight requests draft), alone and while
    # requests are preempted (their drafts dropped with their blocks).
    "speculative": LLMConfig(kv_cache_memory=8 * 2**20, speculative_tokens=4, speculative_max_running=8),
    "speculative-preemption": LLMConfig(
        kv_cache_memory=24 * 4 * 512, block_size=4, speculative_tokens=3, speculative_max_running=8
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
async def test_concurrent_greedy_equals_generate(tiny_llama, expected, name):
    prompt_ids, reference_ids = expected
    client = LLMClient.start(tiny_llama, CONFIGS[name], asyncio.get_running_loop())
    try:
        runner = client.engine.runner
        assert (runner.decoder is None) == (name == "transformers-impl")
        assert (runner.native is None) == (name == "torch-attention")
        got = await run_all(client, prompt_ids)
        assert got == reference_ids
        if name.endswith("preemption"):
            assert client.engine.scheduler.num_preemptions > 0
        if name.startswith("speculative"):  # drafts were verified, and some kept
            assert client.engine.num_accepted_tokens > 0
            assert client.engine.num_draft_tokens > client.engine.num_accepted_tokens
        # Again: the prompts' blocks are now in the prefix cache.
        hits_before = client.engine.kv_cache.num_prefix_hits
        assert await run_all(client, prompt_ids) == reference_ids
        if CONFIGS[name].enable_prefix_caching and not name.endswith("preemption"):
            assert client.engine.kv_cache.num_prefix_hits > hits_before
        client.engine.kv_cache.check_integrity()
    finally:
        client.close()
