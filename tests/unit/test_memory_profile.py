"""release_freed_memory: freed heap memory goes back to the OS (glibc on Linux)."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from inferd.memory.profile import release_freed_memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_freed_heap_memory_leaves_the_process():
    # 64 KiB pieces sit on the heap (below glibc's mmap threshold), so freeing them alone keeps the
    # pages resident; the last piece stays alive and pins the top of the heap.
    pieces = [np.ones(8192) for _ in range(2400)]  # 150 MiB, every page written
    keep = pieces[-1]
    del pieces
    before = _rss_bytes()
    assert release_freed_memory()
    after = _rss_bytes()
    assert before - after > 100 * 2**20, (before, after)
    assert keep.sum() == 8192
