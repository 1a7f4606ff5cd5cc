"""How many KV blocks the LLM engine gets, sized after loading from the memory measured free then.

The whole-server planner (``inferd.memory``) decides before loading what the KV cache may have
and hands it over as ``kv_cache_memory``; here the same rule runs again on what is really free,
and the smaller of the two wins.
"""

from __future__ import annotations

import logging

from inferd.config.engine import LLMConfig
from inferd.errors import ModelLoadError
from inferd.llm.models.loader import ModelFacts
from inferd.memory.plan import (
    CPU_DEFAULT_KV_CACHE_BYTES,
    KVPolicy,
    ModelNeed,
    kv_cache_budget,
    most_useful_kv_bytes,
)
from inferd.memory.profile import free_memory

log = logging.getLogger(__name__)

__all__ = ["CPU_DEFAULT_KV_CACHE_BYTES", "available_memory", "plan_num_blocks"]


def available_memory(device: str) -> int:
    """Bytes free now: the GPU's free memory, or MemAvailable on Linux."""
    return free_memory(device)


def plan_num_blocks(facts: ModelFacts, config: LLMConfig) -> int:
    """Blocks from the budget, but never more than every sequence at full length could use."""
    bytes_per_token = facts.kv_bytes_per_token()
    bytes_per_block = bytes_per_token * config.block_size
    need = ModelNeed("llm", config.device, config.dtype, 0, 0, 0, bytes_per_token, facts.max_model_len)
    policy = KVPolicy(None, config.kv_cache_fraction, config.block_size, config.max_num_seqs)
    most_useful = most_useful_kv_bytes(need, policy)
    budget = _budget(config, policy, most_useful)
    blocks_per_seq = -(-facts.max_model_len // config.block_size)
    num_blocks = min(budget // bytes_per_block, most_useful // bytes_per_block)
    if num_blocks < blocks_per_seq // 8 or num_blocks < 1:
        raise ModelLoadError(
            f"the KV cache budget ({budget / 2**20:.0f} MiB) holds only {num_blocks} blocks of "
            f"{config.block_size} tokens; raise --kv-cache-memory or lower --max-model-len"
        )
    return int(num_blocks)


def _budget(config: LLMConfig, policy: KVPolicy, most_useful: int) -> int:
    """The planned (or user's) bytes, unless less than that is free now that the weights are in."""
    free = available_memory(config.device)
    from_free = kv_cache_budget(free, policy, config.device, most_useful)
    if config.kv_cache_memory is None:
        return from_free
    if config.kv_cache_memory > free:
        log.warning(
            "only %.0f MiB is free after loading, less than the %.0f MiB planned for the KV cache; "
            "it gets %.0f MiB", free / 2**20, config.kv_cache_memory / 2**20, from_free / 2**20,
        )  # fmt: skip
        return from_free
    return config.kv_cache_memory
