"""The native decode kernel: built into the cache directory once, and absent without a usable one."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from inferd.llm.runner import kernels

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.mark.parametrize(
    "dtype, heads, kv_heads, head_dim, block, lens, window",
    [
        (torch.float32, 6, 2, 32, 4, [5, 17, 32], 0),
        # bf16 caches take the AVX512-BF16 path where the CPU has it (head_dim a multiple of 32).
        (torch.bfloat16, 9, 3, 64, 16, [1, 16, 17, 300], 0),
        (torch.bfloat16, 6, 2, 32, 4, [5, 17, 32, 3, 9], 0),
        (torch.bfloat16, 8, 8, 128, 16, [50, 3], 0),
        (torch.bfloat16, 9, 3, 64, 16, [40, 300], 24),
        # head_dim 48 is not a multiple of 32: the portable path, also over bf16.
        (torch.bfloat16, 4, 2, 48, 8, [7, 33], 0),
    ],
)
def test_kernel_matches_sdpa_over_a_paged_cache(tmp_path, dtype, heads, kv_heads, head_dim, block, lens, window):
    kernels.paged_decode_kernel.cache_clear()
    kernel = kernels.paged_decode_kernel(str(tmp_path))
    assert kernel is not None and list((tmp_path / "kernels").glob("paged_decode-*.so"))
    torch.manual_seed(0)
    num_seqs, width = len(lens), max(lens) // block + 1
    num_blocks = 2 * num_seqs * width
    k_cache, v_cache = torch.randn(2, num_blocks * block, kv_heads, head_dim).to(dtype).unbind(0)
    tables = torch.randperm(num_blocks)[: num_seqs * width].view(num_seqs, width).contiguous()
    ctx_lens = torch.tensor(lens)
    q = torch.randn(num_seqs, heads, head_dim).to(dtype).float()  # bf16 models hand the kernel bf16 values
    out = torch.empty_like(q)
    status = kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(dtype == torch.bfloat16),
                    tables.data_ptr(), width, ctx_lens.data_ptr(), num_seqs, heads, kv_heads, head_dim, block,
                    0.2, window, 0.0, out.data_ptr())
    assert status == 0
    for row in range(num_seqs):
        slots = (tables[row, :, None] * block + torch.arange(block)).flatten()[: lens[row]]
        if window:
            slots = slots[-window:]
        k, v = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)  # (KVH, L, D)
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
