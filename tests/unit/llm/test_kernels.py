"""The native decode kernel: built into the cache directory once, and absent without a usable one."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from inferd.llm.runner import kernels

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def test_kernel_matches_sdpa_over_a_paged_cache(tmp_path):
    kernels.paged_decode_kernel.cache_clear()
    kernel = kernels.paged_decode_kernel(str(tmp_path))
    assert kernel is not None and list((tmp_path / "kernels").glob("paged_decode-*.so"))
    torch.manual_seed(0)
    num_seqs, heads, kv_heads, head_dim, block = 3, 6, 2, 32, 4
    k_cache, v_cache = torch.randn(2, 64 * block, kv_heads, head_dim).unbind(0)
    tables = torch.stack([torch.randperm(64)[:8] for _ in range(num_seqs)])
    lens = torch.tensor([5, 17, 32])
    q = torch.randn(num_seqs, heads, head_dim)
    out = torch.empty_like(q)
    status = kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), 0, tables.data_ptr(), 8,
                    lens.data_ptr(), num_seqs, heads, kv_heads, head_dim, block, 0.2, 0, 0.0, out.data_ptr())
    assert status == 0
    for row in range(num_seqs):
        slots = (tables[row, :, None] * block + torch.arange(block)).flatten()[: lens[row]]
        k, v = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)  # (KVH, L, D)
        expected = F.scaled_dot_product_attention(q[row][:, None], k, v, scale=0.2, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[row], expected, atol=2e-5, rtol=1e-4)


def test_unwritable_cache_directory_means_no_kernel(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    kernels.paged_decode_kernel.cache_clear()
    try:
        assert kernels.paged_decode_kernel(str(blocker)) is None
    finally:
        kernels.paged_decode_kernel.cache_clear()
