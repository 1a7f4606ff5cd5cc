"""The CPU bf16 path: prepacked oneDNN linears and the native kernel over a bf16 cache stay close
to the fp32 reference."""

import pytest
import torch
import torch.nn.functional as F

from inferd.config.engine import LLMConfig
from inferd.config.settings import cpu_has_native_bf16
from inferd.llm.models.decoder import PackedLinear
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.runner.model_runner import ModelRunner, ScheduledChunk

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")


@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_packed_linear_matches_linear(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    got = PackedLinear(linear)(x).float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=0.03, rtol=0.02)


def logits_of(path, dtype, prompts):
    config = LLMConfig(dtype=dtype, kv_cache_memory=2**20, block_size=4)
    loaded = load_causal_lm(path, config)
    runner = ModelRunner(loaded, config, num_blocks=64)
    assert runner.decoder is not None and runner.decode_kernel is not None
    chunks, tables = [], []
    for index, ids in enumerate(prompts):
        tables.append(list(range(index * 8, index * 8 + 8)))
        chunks.append(ScheduledChunk(ids, 0, tables[-1], 1))
    first = runner.execute(chunks)  # prefill
    # One decode step per prompt through the native kernel over the bf16 (or fp32) cache.
    decodes = [ScheduledChunk([int(first[i].argmax())], len(p), tables[i], 1) for i, p in enumerate(prompts)]
    return first, runner.execute(decodes), runner


def test_bf16_engine_logits_follow_fp32(tiny_llama):
    prompts = [[5, 17, 33, 9, 60, 71, 12], [8, 9, 10], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    ref_prefill, ref_decode, _ = logits_of(tiny_llama, "float32", prompts)
    prefill, decode, runner = logits_of(tiny_llama, "bfloat16", prompts)
    assert isinstance(runner.decoder.layers[0].qkv, PackedLinear)
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    for got, ref in ((prefill, ref_prefill), (decode, ref_decode)):
        cosine = F.cosine_similarity(got, ref, dim=-1)
        assert cosine.min() > 0.999, cosine
