"""Chained block hashes: the identity of a full KV block for automatic prefix caching.

A block's KV depends on every token before it, so a block's hash covers its parent's hash as well as
its own tokens: equal hashes mean equal prefixes, and a lookup can walk a prompt block by block.

We use a 128-bit BLAKE2b digest rather than ``hash()`` of a tuple. A collision would make one
request silently attend over another request's KV, and a prompt is user input: the built-in tuple
hash is cheap to collide on purpose, a 128-bit cryptographic digest is not. It costs a few
microseconds per block, and each block is hashed once (see ``KVCacheManager.commit``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_DIGEST_SIZE = 16
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: object = None) -> int:
    """Hash of one block given the hash of the block before it (None for the first block).

    ``extra`` salts the hash for anything else the KV depends on (a LoRA id, an image hash); it
    must have a stable ``repr`` (ints, strings, tuples of them). Deterministic within a process.
    """
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    if parent_hash is None:
        digest.update(_NO_PARENT)
    else:
        digest.update(_HAS_PARENT + parent_hash.to_bytes(_DIGEST_SIZE, "little"))
    # The token count goes in first so that tokens and `extra` can never be confused.
    digest.update(len(token_ids).to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    if extra is not None:
        digest.update(repr(extra).encode())
    return int.from_bytes(digest.digest(), "little")


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    start_block: int = 0,
    parent_hash: int | None = None,
    extra: object = None,
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` from block index ``start_block`` on.

    ``parent_hash`` is the hash of block ``start_block - 1`` (None when starting at block 0). A
    trailing partial block is not hashed: its KV is still being written.
    """
    assert block_size > 0, block_size
    assert (start_block == 0) == (parent_hash is None), "parent_hash is required past block 0"
    num_full_blocks = len(token_ids) // block_size
    block_hashes: list[int] = []
    for index in range(start_block, num_full_blocks):
        start = index * block_size
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size], extra)
        block_hashes.append(parent_hash)
    return block_hashes
