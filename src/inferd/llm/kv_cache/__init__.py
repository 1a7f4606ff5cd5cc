"""Paged KV cache bookkeeping: block ids, ref counts, per-request block tables and prefix caching.

Nothing here touches tensors; the model runner turns block tables into slot mappings.
"""

from inferd.llm.kv_cache.block_pool import BlockPool
from inferd.llm.kv_cache.manager import CachedPrefix, KVCacheManager
from inferd.llm.kv_cache.prefix_cache import hash_block, hash_full_blocks

__all__ = ["BlockPool", "CachedPrefix", "KVCacheManager", "hash_block", "hash_full_blocks"]
