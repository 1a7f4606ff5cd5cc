"""The LLM engine and an encoder share the one compute thread: an encoder batch queued during a
long generation runs between two of its steps, not after the generation."""

import asyncio
import time

from inferd.config.engine import LLMConfig
from inferd.encoder.params import EmbedParams
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams
from tests.unit.encoder_helpers import started


async def test_an_embedding_runs_between_the_steps_of_a_long_generation(tiny_llama, tiny_embedder):
    llm = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=4 * 2**20), asyncio.get_running_loop())
    engine_step = llm.engine.step

    def slow_step():  # a generation that lasts well over a second however fast the machine is
        time.sleep(0.005)
        return engine_step()

    llm.engine.step = slow_step
    params = SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True)
    try:
        with started(tiny_embedder) as encoder:

            async def generate():
                tokens = 0
                async for out in llm.generate([8, 9, 10, 11], params):
                    tokens += len(out.new_token_ids)
                return tokens, time.monotonic()

            generation = asyncio.ensure_future(generate())
            await asyncio.sleep(0.2)  # the generation is under way
            embedded = await encoder.embed(["while the model generates"], EmbedParams())
            embedded_at = time.monotonic()
            tokens, finished_at = await generation
    finally:
        llm.close()
    assert embedded.embeddings.shape[0] == 1
    assert tokens == 240
    assert embedded_at < finished_at - 0.5  # it did not wait for the generation's end
