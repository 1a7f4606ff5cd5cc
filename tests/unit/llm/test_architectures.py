"""Greedy equivalence with transformers' generate across decoder families (tiny random models)."""

import asyncio
import shutil

import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams

COMMON = dict(
    vocab_size=200,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "mistral": dict(sliding_window=8),  # shorter than the prompts: the window is exercised
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "phi3": dict(),
}


OWN_FORWARD = {"mistral", "qwen2", "qwen3"}


def build(root, family, tokenizer_dir, **overrides):
    """A tiny random model of ``family`` (``overrides``: config fields, kept in a folder of their own)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    config = AutoConfig.for_model(family, **(COMMON | FAMILIES.get(family, {}) | overrides))
    model = AutoModelForCausalLM.from_config(config)
    out = root / "-".join([f"tiny-{family}", *(f"{k}{v}" for k, v in sorted(overrides.items()))])
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out, model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_greedy_equals_generate(model_root, tiny_llama, family):
    path, model = build(model_root, family, tiny_llama)
    prompts = [[(i * 11 + k) % 180 + 10 for i in range(n)] for k, n in enumerate((5, 23, 40, 12))]
    expected = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(ids) :].tolist())
    config = LLMConfig(kv_cache_memory=2 * 2**20, max_num_batched_tokens=32, block_size=4)
    client = LLMClient.start(path, config, asyncio.get_running_loop())

    async def one(ids):
        tokens = []
        async for output in client.generate(
            ids, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        ):
            tokens.extend(output.new_token_ids)
        return tokens

    try:
        # The Llama family runs on inferd's own forward; the others on transformers' classes.
        assert (client.engine.runner.decoder is not None) == (family in OWN_FORWARD)
        got = await asyncio.gather(*[one(ids) for ids in prompts])
    finally:
        client.close()
    for tokens, reference in zip(got, expected):
        assert tokens[: len(reference)] == reference
