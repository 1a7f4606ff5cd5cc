"""How many KV blocks the LLM engine gets (the full planner across models is a later piece)."""

from __future__ import annotations

import math

import torch

from inferd.config.engine import LLMConfig
from inferd.errors import ModelLoadError
from inferd.llm.models.loader import ModelFacts


def available_memory(device: str) -> int:
    """Bytes free now: the GPU's free memory, or MemAvailable on Linux."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


# On the CPU the cache shares RAM with everything else; without an explicit size it takes at most
# this much (vLLM's CPU build defaults to 4 GiB): enough for 32 streams of ~1,400 tokens of a
# 135M model in fp32, and the pages are committed only as blocks are first used.
CPU_DEFAULT_KV_CACHE_BYTES = 2 * 2**30


def plan_num_blocks(facts: ModelFacts, config: LLMConfig) -> int:
    """Blocks from the memory budget, but never more than every sequence at full length could use."""
    bytes_per_block = facts.kv_bytes_per_token() * config.block_size
    budget = config.kv_cache_memory
    if budget is None:
        budget = int(available_memory(config.device) * config.kv_cache_fraction)
        if not config.device.startswith("cuda"):
            budget = min(budget, CPU_DEFAULT_KV_CACHE_BYTES)
    blocks_per_seq = math.ceil(facts.max_model_len / config.block_size)
    most_useful = blocks_per_seq * config.max_num_seqs
    num_blocks = min(budget // bytes_per_block, most_useful)
    if num_blocks < blocks_per_seq // 8 or num_blocks < 1:
        raise ModelLoadError(
            f"the KV cache budget ({budget / 2**20:.0f} MiB) holds only {num_blocks} blocks of "
            f"{config.block_size} tokens; raise --kv-cache-memory or lower --max-model-len"
        )
    return int(num_blocks)
