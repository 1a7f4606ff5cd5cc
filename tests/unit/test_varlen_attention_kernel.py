"""The encoder's native attention over a packed batch (encoder_attention.c) against per-item float32
attention in torch, for every build this CPU runs: the AVX-512 builds compute it, the others refuse
it and the packed BERT keeps torch's matrix products."""

import pytest
import torch
import torch.nn.functional as F

from inferd.llm.runner import kernels
from inferd.llm.runner.kernels import variants

AVX512_BUILDS = ("amx", "avx512bf16", "avx512")


@pytest.fixture(scope="module", params=[v.name for v in variants.runnable()])
def ops(request):
    (variant,) = [v for v in variants.runnable() if v.name == request.param]
    return kernels.load_variant(variant)


@pytest.fixture(scope="module")
def fast_ops():
    """A build with the kernel, where this CPU runs one."""
    runnable = [v for v in variants.runnable() if v.name in AVX512_BUILDS]
    if not runnable:
        pytest.skip("this CPU runs no AVX-512 build: the encoder attention kernel is not used here")
    return kernels.load_variant(runnable[0])


def spans_of(lengths):
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds


def reference(qkv, heads, head_dim, bounds, scale):
    """Each item's rows attend to the item's rows: SDPA per item, in float64."""
    tokens = qkv.shape[0]
    q, k, v = qkv.double().view(tokens, 3, heads, head_dim).permute(1, 2, 0, 3)
    out = torch.empty(heads, tokens, head_dim, dtype=torch.float64)
    for start, end in bounds:
        out[:, start:end] = F.scaled_dot_product_attention(
            q[None, :, start:end], k[None, :, start:end], v[None, :, start:end], scale=scale
        )[0]
    return out.transpose(0, 1).reshape(tokens, heads * head_dim)


@pytest.mark.parametrize(
    ("heads", "head_dim", "lengths"),
    [
        (12, 32, [5, 3, 32]),
        # every edge of the 16-key blocks and of the 64-row tasks
        (12, 32, [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130]),
        (4, 64, [100, 7, 300]),
        (2, 16, [9, 40]),
        (3, 48, [20, 1]),  # head_dim 48: one block of 32 and one of 16 in p . v
        (2, 128, [70]),
    ],
)
def test_kernel_matches_attention_within_each_item(fast_ops, heads, head_dim, lengths):
    torch.manual_seed(sum(lengths) + head_dim)
    bounds = spans_of(lengths)
    qkv = torch.randn(bounds[-1][1], 3 * heads * head_dim) * 2
    scale = head_dim**-0.5
    got = fast_ops.varlen_attention(qkv, heads, head_dim, torch.tensor(bounds), scale)
    torch.testing.assert_close(
        got.double(), reference(qkv, heads, head_dim, bounds, scale), atol=2e-5, rtol=1e-4
    )


def test_an_items_rows_are_bitwise_the_same_alone_or_in_any_batch(fast_ops):
    """A row's result depends on its item only: not on the batch around it or where it starts."""
    torch.manual_seed(0)
    heads, head_dim, lengths = 6, 32, [70, 3, 129, 16]
    alone = {}
    for n in lengths:
        qkv = torch.randn(n, 3 * heads * head_dim)
        alone[n] = (qkv, fast_ops.varlen_attention(qkv, heads, head_dim, torch.tensor([(0, n)]), 0.2))
    for order in (lengths, lengths[::-1]):
        qkv = torch.cat([alone[n][0] for n in order])
        bounds = spans_of(order)
        got = fast_ops.varlen_attention(qkv, heads, head_dim, torch.tensor(bounds), 0.2)
        for n, (start, end) in zip(order, bounds, strict=True):
            assert torch.equal(got[start:end], alone[n][1]), n


def test_the_kernel_reads_rows_of_a_wider_buffer(fast_ops):
    """qkv as a view with a row stride past its width (a slice of a larger output)."""
    torch.manual_seed(1)
    heads, head_dim, bounds = 4, 32, [(0, 20), (20, 23)]
    wide = torch.randn(23, 3 * heads * head_dim + 64)
    qkv = wide[:, : 3 * heads * head_dim]
    got = fast_ops.varlen_attention(qkv, heads, head_dim, torch.tensor(bounds), 0.1)
    torch.testing.assert_close(
        got.double(), reference(qkv, heads, head_dim, bounds, 0.1), atol=2e-5, rtol=1e-4
    )


def test_only_the_avx512_builds_take_it_and_the_others_refuse_it(ops):
    torch.manual_seed(2)
    qkv, spans = torch.randn(40, 3 * 2 * 32), [(0, 8), (8, 40)]
    bounds = torch.tensor(spans)
    if ops.variant in AVX512_BUILDS:
        assert ops.varlen_attention_takes(32) and ops.varlen_attention_takes(64)
        assert not ops.varlen_attention_takes(40) and not ops.varlen_attention_takes(8)
        got = ops.varlen_attention(qkv, 2, 32, bounds, 0.1)
        torch.testing.assert_close(got.double(), reference(qkv, 2, 32, spans, 0.1), atol=2e-5, rtol=1e-4)
    else:
        assert not ops.varlen_attention_takes(32)
        with pytest.raises(kernels.KernelArgumentError, match="cannot take"):
            ops.varlen_attention(qkv, 2, 32, bounds, 0.1)


def test_a_nan_or_an_infinity_comes_out_as_nan_in_its_item_only(fast_ops):
    """As torch's softmax gives it: a fault upstream shows, it is not averaged into a finite row."""
    torch.manual_seed(3)
    heads, head_dim, bounds = 2, 32, [(0, 5), (5, 12), (12, 20)]
    qkv = torch.randn(20, 3 * heads * head_dim)
    width = heads * head_dim
    qkv[1, width + 3] = float("nan")  # a key of item 0, head 0
    qkv[7, 2] = float("inf")  # the query of row 7 (item 1), head 0
    got = fast_ops.varlen_attention(qkv, heads, head_dim, torch.tensor(bounds), 0.1)
    expected = reference(qkv, heads, head_dim, bounds, 0.1)
    assert torch.equal(got.isnan(), expected.isnan())
    assert got[0:5, :head_dim].isnan().all() and got[7, :head_dim].isnan().all()
    assert got[12:20].isfinite().all() and got[0:5, head_dim:].isfinite().all()
    finite = expected.isfinite()
    torch.testing.assert_close(got.double()[finite], expected[finite], atol=2e-5, rtol=1e-4)


def test_the_boundary_refuses_spans_and_tensors_the_kernel_would_misread(fast_ops):
    qkv = torch.randn(10, 3 * 2 * 32)
    cases = [
        (qkv, torch.tensor([(0, 11)])),  # past the last row
        (qkv, torch.tensor([(-1, 10)])),
        (qkv, torch.tensor([(0, 3), (3, 3), (3, 10)])),  # an empty item
        (qkv, torch.tensor([(0, 6), (4, 10)])),  # overlapping: two tasks would write rows 4-5
        (qkv, torch.tensor([(0, 4), (6, 10)])),  # a gap: rows 4-5 never written
        (qkv, torch.tensor([(0, 4)])),  # rows 4.. never written
        (qkv, torch.tensor([(4, 10), (0, 4)])),  # out of order
        (qkv, torch.zeros(0, 2, dtype=torch.int64)),  # no items for 10 rows
        (qkv, torch.tensor([(0, 10)], dtype=torch.int32)),
        (qkv, torch.tensor([0, 4, 4, 10])),  # not (items, 2)
        (qkv[:, :100], torch.tensor([(0, 10)])),  # narrower than 3 * heads * head_dim
        (qkv.double(), torch.tensor([(0, 10)])),
        (qkv.t().contiguous().t(), torch.tensor([(0, 10)])),  # column stride 10
    ]
    for tensor, bounds in cases:
        with pytest.raises(kernels.KernelArgumentError):
            fast_ops.varlen_attention(tensor, 2, 32, bounds, 0.1)
    with pytest.raises(kernels.KernelArgumentError):
        fast_ops.varlen_attention(torch.randn(10, 3 * 2 * 40), 2, 40, torch.tensor([(0, 10)]), 0.1)
    with pytest.raises(kernels.KernelArgumentError):
        fast_ops.varlen_attention(qkv, 0, 32, torch.tensor([(0, 10)]), 0.1)
    assert fast_ops.varlen_attention(qkv, 2, 32, torch.tensor([(0, 4), (4, 10)]), 0.1).isfinite().all()
