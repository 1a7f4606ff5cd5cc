import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.errors import ModelLoadError
from inferd.llm.memory import CPU_DEFAULT_KV_CACHE_BYTES, plan_num_blocks
from inferd.llm.models.loader import ModelFacts

# SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 dims, fp32 → 46,080 bytes a token.
FACTS = ModelFacts(
    num_layers=30,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_model_len=8192,
    eos_token_ids=frozenset({2}),
    dtype=torch.float32,
)


def test_kv_bytes_count_grouped_query_attention():
    assert FACTS.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 4 == 46_080


def test_explicit_budget_is_divided_into_blocks():
    config = LLMConfig(kv_cache_memory=100 * 16 * 46_080 + 5, block_size=16)
    assert plan_num_blocks(FACTS, config) == 100


def test_cpu_default_is_capped():
    blocks = plan_num_blocks(FACTS, LLMConfig(kv_cache_fraction=1.0))
    assert blocks * 16 * 46_080 <= CPU_DEFAULT_KV_CACHE_BYTES


def test_never_more_than_every_sequence_at_full_length():
    config = LLMConfig(kv_cache_memory=10 * 2**30, max_num_seqs=2, max_model_len=1024, block_size=16)
    facts = ModelFacts(30, 3, 64, 49152, 1024, frozenset({2}), torch.float32)
    assert plan_num_blocks(facts, config) == 2 * 1024 // 16


def test_a_budget_too_small_to_serve_is_refused():
    with pytest.raises(ModelLoadError, match="raise --kv-cache-memory"):
        plan_num_blocks(FACTS, LLMConfig(kv_cache_memory=16 * 46_080))
