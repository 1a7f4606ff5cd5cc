"""The native kernels' numerics against torch, for every build of the package this CPU can execute
(the portable one always); and what runs when no build loads."""

import logging
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from inferd.llm.runner import kernels
from inferd.llm.runner.attention import keys_at
from inferd.llm.runner.kernels import quantise_vectors, variants
from tests.unit.llm.kernel_helpers import LINEAR_KERNELS, linear_kernel_selected


@pytest.fixture(scope="module", params=[v.name for v in variants.runnable()])
def ops(request):
    (variant,) = [v for v in variants.runnable() if v.name == request.param]
    built = kernels.load_variant(variant)
    assert built.variant == request.param
    return built


@pytest.fixture
def fresh_native_ops():
    """native_ops as a server's first call sees it (it is cached per process)."""
    kernels.native_ops.cache_clear()
    yield kernels.native_ops
    kernels.native_ops.cache_clear()


def test_every_build_this_cpu_can_run_was_built_and_the_best_is_loaded(fresh_native_ops):
    """The package's build made each level (the compiler here targets all of them), and the
    server loads the best one this CPU executes, never one it cannot."""
    for variant in variants.variants():
        assert kernels.prebuilt_library(variant) is not None, variant.name
    runnable = variants.runnable()
    assert runnable[-1].name in ("portable",) and all(v.needs <= variants.cpu_flags() for v in runnable)
    assert fresh_native_ops().variant == runnable[0].name


def test_a_variant_needs_exactly_its_levels_cpu_flags():
    avx2_cpu = frozenset(
        ["fpu", "sse", "sse2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"]
    )
    assert [v.name for v in variants.runnable(avx2_cpu, "x86_64")] == ["avx2", "portable"]
    assert [v.name for v in variants.runnable(avx2_cpu - {"movbe"}, "x86_64")] == ["portable"]
    bf16_cpu = avx2_cpu | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16"}
    assert [v.name for v in variants.runnable(bf16_cpu, "x86_64")] == [
        "avx512bf16",
        "avx512",
        "avx2",
        "portable",
    ]
    assert [v.name for v in variants.runnable(frozenset(), "aarch64")] == ["portable"]


def attention_reference(q, k, v, scale, softcap=0.0, value_scales=None):
    """One row's attention in float64 from q (heads, dim) over k, v (kv_heads, positions, dim):
    softmax(q k^T scale) v, the query heads grouped over the kv heads (each value row times its
    ``value_scales`` (kv_heads, positions) entry: an int8 cache's); and the output its weights'
    and values' magnitudes would give, sum |w| |v| / sum w, which bounds what rounding does."""
    group = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    scores = (q.double()[:, None] @ k.transpose(1, 2))[:, 0] * scale  # (heads, positions)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    total = weights.sum(-1, keepdim=True)
    if value_scales is not None:
        weights = weights * value_scales.double().repeat_interleave(group, 0)
    exact = (weights[:, None] @ v)[:, 0] / total
    magnitude = (weights.abs()[:, None] @ v.abs())[:, 0] / total
    return exact.float(), magnitude.float()


def assert_attends(ops, dtype, head_dim, got, reference):
    """``got`` within fp32 rounding of ``reference`` (attention_reference: sums of up to a few
    thousand terms, 1e-4 of their magnitude), plus on this build's bf16 path (bf16_path) what
    rounding each weight to bf16 for p . v may add: each weight moves by at most 2^-8 of itself
    (bf16's unit roundoff), and the path divides by the total of the rounded weights, so the
    output by at most 2^-8 (magnitude + |output|) <= 2^-7 magnitude."""
    exact, magnitude = reference
    slack = 2e-5 + 1e-4 * magnitude + (2**-7 * magnitude if bf16_path(ops, dtype, head_dim) else 0)
    worst = ((got - exact).abs() - slack).max()
    assert worst <= 0, f"off the reference by {worst:.3g} past the allowed rounding"


def bf16_path(ops, dtype, head_dim) -> bool:
    """Whether this build attends over a cache of ``dtype`` on its AVX512-BF16 path (bf16 weights)."""
    return dtype != torch.float32 and ops.packs_keys(head_dim, 8)


@pytest.mark.parametrize(
    "dtype, heads, kv_heads, head_dim, block, lens, window",
    [
        (torch.float32, 6, 2, 32, 4, [5, 17, 32], 0),
        # bf16 caches take the AVX512-BF16 path where the CPU has it (head_dim a multiple of 32).
        (torch.bfloat16, 9, 3, 64, 16, [1, 16, 17, 300], 0),
        (torch.bfloat16, 6, 2, 32, 4, [5, 17, 32, 3, 9], 0),
        (torch.bfloat16, 8, 8, 128, 16, [50, 3], 0),
        (torch.bfloat16, 9, 3, 64, 16, [40, 300], 24),
        (torch.bfloat16, 9, 3, 64, 32, [31, 33, 100], 0),  # blocks of 32 slots
        # 4 and 5 query heads a kv head: 3 and 2 key blocks scored side by side; head_dim 96: p . v
        # over 4 chunks of 16 dims, then 2
        (torch.bfloat16, 8, 2, 64, 16, [1, 40, 300], 0),
        (torch.bfloat16, 10, 2, 64, 8, [2, 100], 0),
        (torch.bfloat16, 6, 2, 96, 16, [5, 70], 0),
        # head_dim 48 is not a multiple of 32: the portable path, also over bf16.
        (torch.bfloat16, 4, 2, 48, 8, [7, 33], 0),
    ],
)
def test_kernel_matches_sdpa_over_a_paged_cache(ops, dtype, heads, kv_heads, head_dim, block, lens, window):
    torch.manual_seed(0)
    num_seqs, width = len(lens), max(lens) // block + 1
    num_blocks = 2 * num_seqs * width
    k_cache, v_cache = torch.randn(2, num_blocks * block, kv_heads, head_dim).to(dtype).unbind(0)
    tables = torch.randperm(num_blocks)[: num_seqs * width].view(num_seqs, width).contiguous()
    ctx_lens = torch.tensor(lens)
    q = torch.randn(num_seqs, heads, head_dim).to(dtype).float()  # bf16 models hand the kernel bf16 values
    out = torch.empty_like(q)
    status = ops.paged_decode(
        q.data_ptr(),
        0,
        heads * head_dim,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        int(dtype == torch.bfloat16),
        0,
        tables.data_ptr(),
        width,
        ctx_lens.data_ptr(),
        num_seqs,
        heads,
        kv_heads,
        head_dim,
        block,
        0.2,
        window,
        0.0,
        out.data_ptr(),
        0,
        heads * head_dim,
        None,
    )
    assert status == 0
    for row in range(num_seqs):
        slots = (tables[row, :, None] * block + torch.arange(block)).flatten()[: lens[row]]
        if window:
            slots = slots[-window:]
        k, v = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)  # (KVH, L, D)
        assert_attends(ops, dtype, head_dim, out[row], attention_reference(q[row], k, v, 0.2))
    if dtype == torch.bfloat16 and ops.packs_keys(head_dim, block):
        # keys packed by block (as the runner keeps them for this build): bitwise the same output
        packed = pack_keys(k_cache, block)
        assert torch.equal(paged_rows(ops, q, packed, v_cache, tables, ctx_lens, heads, block, 0.2, window), out)


def test_without_a_build_for_this_cpu_one_warning_says_why_and_how_to_fix_it(
    fresh_native_ops, monkeypatch, caplog
):
    monkeypatch.setattr(kernels, "prebuilt_library", lambda variant: None)
    with caplog.at_level(logging.INFO, logger="inferd.llm.kernels"):
        assert fresh_native_ops() is None
        assert fresh_native_ops() is None  # cached: asked again, it does not warn again
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "torch paths" in message and "no kernel library this CPU can run" in message
    assert "pip install --force-reinstall" in message and "make install" in message


def test_a_build_that_does_not_load_is_named_and_the_next_level_runs(
    fresh_native_ops, tmp_path, monkeypatch, caplog
):
    """A broken best build (not a library, say) gives way to the next one this CPU runs, with a
    WARNING that carries the loader's error; when none loads, the torch paths run."""
    broken = tmp_path / "broken.so"
    broken.write_text("not a shared library")
    real = kernels.prebuilt_library
    best, *lower = variants.runnable()
    monkeypatch.setattr(kernels, "prebuilt_library", lambda v: broken if v == best else real(v))
    with caplog.at_level(logging.WARNING, logger="inferd.llm.kernels"):
        ops = fresh_native_ops()
    (record,) = caplog.records
    assert f"the {best.name} build did not load" in record.getMessage() and str(broken) in record.getMessage()
    if lower:
        assert (
            ops.variant == lower[0].name
            and f"running the {lower[0].name} build instead" in record.getMessage()
        )
    else:
        assert ops is None and "torch paths" in record.getMessage()
    caplog.clear()
    monkeypatch.setattr(kernels, "prebuilt_library", lambda v: broken)  # every build broken
    kernels.native_ops.cache_clear()
    with caplog.at_level(logging.WARNING, logger="inferd.llm.kernels"):
        assert fresh_native_ops() is None
    (record,) = caplog.records
    assert "torch paths" in record.getMessage()
    assert all(f"the {v.name} build did not load" in record.getMessage() for v in variants.runnable())


def bf16_close(got, expected):
    # One rounding to bf16 at the end: within a unit in the last place of bf16 (2^-8 relative).
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_add_rms_norm_matches_torch(ops, rows):
    torch.manual_seed(rows)
    residual = torch.randn(rows, 576).bfloat16()
    delta = torch.randn(rows, 576).bfloat16()
    weight = (torch.rand(576) + 0.5).bfloat16()
    summed = residual + delta  # torch's bf16 add: the residual stream as the unfused layer keeps it
    out = ops.add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(residual, summed)
    bf16_close(out, F.rms_norm(summed.float(), (576,), weight.float(), 1e-5))
    plain = ops.add_rms_norm(residual, None, weight, 1e-5)  # no delta: the residual is left alone
    assert torch.equal(residual, summed)
    bf16_close(plain, F.rms_norm(summed.float(), (576,), weight.float(), 1e-5))


@pytest.mark.parametrize("rows, width", [(1, 1536), (33, 300)])
def test_silu_mul_matches_torch(ops, rows, width):
    torch.manual_seed(0)
    gate_up = (torch.randn(rows, 2 * width) * 4).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    bf16_close(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("packed", [False, True, "int8"], ids=["plain", "packed", "int8"])
@pytest.mark.parametrize("tokens", [1, 20])
def test_rope_and_cache_rotates_in_place_and_stores_k_and_v(ops, tokens, packed):
    torch.manual_seed(0)
    heads, kv_heads, dim = 9, 3, 64
    # (int8 caches are read only where keys are packed, but every build stores them alike: its
    # AVX-512 BF16 quantisation or the scalar one)
    if packed is True and not ops.packs_keys(dim, 8):
        pytest.skip(f"the {ops.variant} build keeps no packed keys")
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    original = qkv.float().view(tokens, -1, dim)
    angles = torch.rand(tokens, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.randperm(64)[:tokens]
    if packed == "int8":
        qkv[0, heads * dim : (heads + 1) * dim] = 0  # a vector of zeros: scale 0, values 0
        # a vector too small for a scale with a finite reciprocal: scale 0, values 0 as well
        qkv[-1, (heads + kv_heads) * dim : (heads + kv_heads + 1) * dim] = 1e-38
    k_cache, v_cache = torch.zeros(2, 64, kv_heads, dim).bfloat16().unbind(0)
    scales = None
    if packed:  # 8 blocks of 8 slots, read back through the runner's own accessor
        dtype = torch.int8 if packed == "int8" else torch.bfloat16
        k_cache = kernels.packed_key_cache(8, kv_heads, dim, 8, dtype=dtype).zero_()
    if packed == "int8":
        v_cache = v_cache.to(torch.int8)
        scales = kernels.kv_scale_cache(8, kv_heads, 8).zero_()
    ops.rope_and_cache(qkv, heads, kv_heads, dim, cos, sin, slots, k_cache, v_cache, scales)
    if packed:
        k_cache = keys_at(k_cache, torch.arange(64))
    if packed == "int8":  # each rotated k and each v quantised per vector, bitwise as quantise_vectors does
        got = qkv.view(tokens, -1, dim)
        scale_at = scales.permute(0, 3, 2, 1).reshape(64, 2, kv_heads)  # (slot, [k | v], kv head)
        for cache, values, which in ((k_cache, got[:, heads : heads + kv_heads], 0), (v_cache, got[:, heads + kv_heads :], 1)):
            q, s = quantise_vectors(values)
            assert torch.equal(cache[slots], q) and torch.equal(scale_at[slots, which], s)
            assert (values - q * s[..., None]).abs().le(s[..., None] / 2 + 1e-6).all()
        assert not scale_at[slots[0], 0, 0] and not k_cache[slots[0], 0].any()  # the zero vector
        assert not scale_at[slots[-1], 1, 0] and not v_cache[slots[-1], 0].any()  # the tiny one
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[slots] = False
        assert not k_cache[untouched].any() and not v_cache[untouched].any() and not scale_at[untouched].any()
        return
    x = original[:, : heads + kv_heads]
    rotated = torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1)
    expected = x * cos[:, None] + rotated * sin[:, None]
    got = qkv.view(tokens, -1, dim)
    bf16_close(got[:, : heads + kv_heads], expected)
    assert torch.equal(got[:, heads + kv_heads :].float(), original[:, heads + kv_heads :])  # v untouched
    assert torch.equal(k_cache[slots], got[:, heads : heads + kv_heads])
    assert torch.equal(v_cache[slots], got[:, heads + kv_heads :])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_decode_reads_strided_bf16_queries_and_writes_bf16(ops):
    """The fused bf16 layer hands the kernel q as rows of the qkv output and takes bf16 back."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block, lens = 9, 3, 64, 16, [3, 40, 17]
    seqs, width = len(lens), 4
    k_cache, v_cache = torch.randn(2, 16 * block, kv_heads, dim).bfloat16().unbind(0)
    tables = torch.randperm(16)[: seqs * width].view(seqs, width).contiguous()
    qkv = torch.randn(seqs, (heads + 2 * kv_heads) * dim).bfloat16()
    out = torch.empty(seqs, heads * dim, dtype=torch.bfloat16)
    ctx_lens = torch.tensor(lens)
    assert (
        ops.paged_decode(
            qkv.data_ptr(),
            1,
            qkv.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            1,
            0,
            tables.data_ptr(),
            width,
            ctx_lens.data_ptr(),
            seqs,
            heads,
            kv_heads,
            dim,
            block,
            0.125,
            0,
            0.0,
            out.data_ptr(),
            1,
            out.stride(0),
            None,
        )
        == 0
    )
    for row in range(seqs):
        slots = (tables[row, :, None] * block + torch.arange(block)).flatten()[: lens[row]]
        k, v = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)
        q = qkv[row, : heads * dim].float().view(heads, 1, dim)
        expected = F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)[:, 0]
        bf16_close(out[row].view(heads, dim), expected)


def test_argmax_matches_torch_on_ties_infinities_nans_and_cut_rows(ops):
    torch.manual_seed(0)
    logits = torch.randn(7, 1003)
    logits[1, [5, 700]] = 50.0  # a tie: the first one wins
    logits[2] = float("-inf")
    logits[3, 998] = float("inf")
    logits[4, [10, 20]] = float("nan")  # NaN counts as the largest, first NaN wins
    logits[5, 1000:] = 99.0  # past the cut below: never chosen
    logits[6] = logits[6].round()  # many ties
    for rows in (logits, logits[:, :1000]):
        assert torch.equal(ops.argmax(rows), rows.argmax(dim=-1))


@pytest.fixture(params=LINEAR_KERNELS)
def linear_kernel(ops, request):
    with linear_kernel_selected(ops, request.param) as name:
        yield name


@pytest.mark.parametrize("rows", [1, 33])
def test_native_linear_can_write_float32(ops, linear_kernel, rows):
    torch.manual_seed(0)
    weight = torch.randn(100, 64).bfloat16()
    x = torch.randn(rows, 64).bfloat16()
    got = ops.linear(x, kernels.pack_amx_weight(weight), 100, None, fp32_out=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ weight.float().T, atol=1e-4, rtol=1e-4)


def test_native_linear_gives_a_row_bitwise_the_same_whatever_the_row_count(ops, linear_kernel):
    """Batch invariance of the linear layers: each output accumulates K in a fixed order and threads
    split only the columns, so a row's result does not depend on how many rows share the call (1
    as a decode, 12-row register blocks, 32-row AMX tiles, L2-sized row blocks) or where it sits."""
    torch.manual_seed(3)
    weight, x = torch.randn(200, 576).bfloat16(), torch.randn(420, 576).bfloat16()
    packed = kernels.pack_amx_weight(weight)
    whole = ops.linear(x, packed, 200, None)
    for start, stop in ((0, 1), (5, 6), (3, 16), (13, 45), (1, 70), (150, 420), (191, 193)):
        assert torch.equal(ops.linear(x[start:stop].contiguous(), packed, 200, None), whole[start:stop])


@pytest.mark.parametrize("int8", [False, True])
def test_gated_linear_is_the_layer_then_silu_mul_to_the_bit(ops, linear_kernel, int8):
    """linear_gated computes silu(gate) * up from the gate_up layer's registers: the same bf16
    values as the layer's output followed by silu_mul, at any row count (register blocks, row
    blocks) and wherever the 16 gate columns sit in the packed pairs."""
    if int8 and not ops.has_int8_linear:
        pytest.skip("no int8 linear kernel here")
    torch.manual_seed(7)
    width, k = 80, 96  # 80: gate and up halves fall at odd 16-column blocks of the pairs
    weight = torch.randn(2 * width, k).bfloat16()
    packed, scale = kernels.pack_int8_weight(weight) if int8 else (kernels.pack_amx_weight(weight), None)
    x = torch.randn(400, k).bfloat16() * 3
    got = ops.linear_gated(x, packed, width, scale)
    if linear_kernel == "amx" and not int8:
        assert got is None  # no gated form there: the caller runs the two steps
        return
    want = ops.silu_mul(ops.linear(x, packed, 2 * width, None, scale=scale))
    assert torch.equal(got, want)
    for start, stop in ((0, 1), (3, 10), (190, 200)):
        assert torch.equal(ops.linear_gated(x[start:stop].contiguous(), packed, width, scale), want[start:stop])
    # a width that is not a multiple of 16 has no gated form
    odd = torch.randn(2 * 24, k).bfloat16()
    odd_packed, odd_scale = kernels.pack_int8_weight(odd) if int8 else (kernels.pack_amx_weight(odd), None)
    assert ops.linear_gated(x, odd_packed, 24, odd_scale) is None


def pack_keys(k_cache: torch.Tensor, block: int) -> torch.Tensor:
    """A plain (slots, kv_heads, dim) bf16 (or int8) key cache in the packed layout
    (kernels.packed_key_cache)."""
    slots, kv_heads, dim = k_cache.shape
    packed = kernels.packed_key_cache(slots // block, kv_heads, dim, block, dtype=k_cache.dtype)
    packed.copy_(k_cache.view(slots // block, block, kv_heads, dim // 2, 2).permute(0, 2, 3, 1, 4))
    return packed


def int8_caches(k: torch.Tensor, v: torch.Tensor, block: int):
    """Plain (slots, kv_heads, dim) keys and values as the int8 cache holds them: packed int8 keys,
    int8 values, their scales (kernels.kv_scale_cache); and the values they stand for (float32)."""
    (kq, ks), (vq, vs) = quantise_vectors(k), quantise_vectors(v)
    slots, kv_heads, _ = k.shape
    scales = kernels.kv_scale_cache(slots // block, kv_heads, block)
    scales[:, :, 0] = ks.view(slots // block, block, kv_heads).transpose(1, 2)
    scales[:, :, 1] = vs.view(slots // block, block, kv_heads).transpose(1, 2)
    return pack_keys(kq, block), vq, scales, (kq * ks[..., None], vq * vs[..., None])


def paged_rows(
    ops, q, k_cache, v_cache, tables, ctx_lens, heads, block, scale, window=0, softcap=0.0, kv_scales=None
):
    """The kernel over query rows q (rows, heads, dim) fp32, each with its own table and length;
    k_cache plain or packed (pack_keys), or with kv_scales int8 caches (int8_caches)."""
    rows, _, dim = q.shape
    out = torch.empty_like(q)
    packed = kernels.packed_key_block(k_cache) > 0
    status = ops.paged_decode(
        *(q.data_ptr(), 0, heads * dim, k_cache.data_ptr(), v_cache.data_ptr(), 1, int(packed)),
        *(tables.data_ptr(), tables.shape[1], ctx_lens.data_ptr(), rows, heads, k_cache.shape[1], dim),
        *(block, scale, window, softcap, out.data_ptr(), 0, heads * dim),
        None if kv_scales is None else kv_scales.data_ptr(),
    )
    assert status == 0
    return out


@pytest.mark.parametrize(
    "spans, window, softcap",
    [
        ([(0, 37), (5, 1), (0, 3), (20, 16)], 0, 0.0),  # (cached, new): prefill runs, a decode, a short run
        ([(0, 70), (30, 21)], 24, 0.0),  # a window shorter than the spans
        ([(10, 19)], 0, 30.0),  # logit soft-capping
        ([(32, 5), (0, 9), (3, 6), (7, 1)], 0, 0.0),  # runs that split unevenly between the threads
    ],
)
def test_prefill_runs_match_causal_attention(ops, spans, window, softcap):
    """Consecutive rows of one sequence (a prefill chunk over its cached context) share packed keys
    in the bf16 path; every row still sees exactly its own causal context."""
    torch.manual_seed(1)
    heads, kv_heads, dim, block, scale = 9, 3, 64, 16, 0.125
    width = max(c + n for c, n in spans) // block + 1
    num_blocks = len(spans) * width
    k_cache, v_cache = torch.randn(2, num_blocks * block, kv_heads, dim).bfloat16().unbind(0)
    seq_tables = torch.randperm(num_blocks).view(len(spans), width)
    owner = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(spans)])
    ctx_lens = torch.cat([torch.arange(c + 1, c + n + 1) for c, n in spans])
    tables = seq_tables[owner].contiguous()
    q = torch.randn(len(ctx_lens), heads, dim).bfloat16().float()
    out = paged_rows(ops, q, k_cache, v_cache, tables, ctx_lens, heads, block, scale, window, softcap)
    for row in range(len(ctx_lens)):
        length = int(ctx_lens[row])
        slots = (tables[row, :, None] * block + torch.arange(block)).flatten()[:length]
        if window:
            slots = slots[-window:]
        k, v = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)
        assert_attends(ops, torch.bfloat16, dim, out[row], attention_reference(q[row], k, v, scale, softcap))


@pytest.mark.parametrize(
    "heads, kv_heads, dim, block, spans, window",
    [
        (9, 3, 64, 8, [(0, 37), (5, 1), (0, 3), (20, 16), (200, 1)], 0),  # prefill runs, decodes
        (9, 3, 64, 16, [(0, 70), (30, 21), (99, 1)], 24),  # a window
        (8, 2, 128, 8, [(0, 9), (60, 1)], 0),  # wider heads, 4 a kv head
        (6, 2, 96, 32, [(3, 40), (70, 1)], 0),  # head_dim 96: p . v over 4 chunks, then 2
    ],
)
def test_int8_caches_attend_as_their_dequantised_values(ops, heads, kv_heads, dim, block, spans, window):
    """With int8 caches the kernel attends over what they stand for (int8 x scale): keys widened to
    bf16 (exact) and scaled per position, values scaled through the (bf16) weights."""
    if not ops.packs_keys(dim, block):
        pytest.skip(f"the {ops.variant} build reads no int8 caches")
    torch.manual_seed(3)
    scale = dim**-0.5
    width = max(c + n for c, n in spans) // block + 1
    num_blocks = len(spans) * width
    k, v = (torch.randn(2, num_blocks * block, kv_heads, dim) * torch.rand(num_blocks * block, 1, 1) * 4).unbind(0)
    v[::7] = 0  # value vectors of zeros (scale 0): their weights still count in the total
    k_cache, v_cache, kv_scales, (k_seen, _) = int8_caches(k.bfloat16(), v.bfloat16(), block)
    v_int, v_scale = quantise_vectors(v.bfloat16())
    seq_tables = torch.randperm(num_blocks).view(len(spans), width)
    owner = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(spans)])
    ctx_lens = torch.cat([torch.arange(c + 1, c + n + 1) for c, n in spans])
    tables = seq_tables[owner].contiguous()
    q = torch.randn(len(ctx_lens), heads, dim).bfloat16().float()
    out = paged_rows(ops, q, k_cache, v_cache, tables, ctx_lens, heads, block, scale, window, kv_scales=kv_scales)
    for row in range(len(ctx_lens)):
        slots = (tables[row, :, None] * block + torch.arange(block)).flatten()[: int(ctx_lens[row])]
        if window:
            slots = slots[-window:]
        ks, vs = k_seen[slots].transpose(0, 1), v_int[slots].float().transpose(0, 1)
        value_scales = v_scale[slots].transpose(0, 1)
        assert_attends(ops, torch.int8, dim, out[row], attention_reference(q[row], ks, vs, scale, 0.0, value_scales))
    # and far from the bf16 values only by the quantisation (a sanity bound, not the kernel's)
    bf16 = paged_rows(ops, q, pack_keys(k.bfloat16(), block), v.bfloat16(), tables, ctx_lens, heads, block, scale, window)
    assert (out - bf16).abs().max() < 0.05 * v.abs().max()


@pytest.mark.parametrize("packed", [False, True, "int8"], ids=["plain", "packed", "int8"])
@pytest.mark.parametrize("block, window", [(8, 0), (16, 0), (16, 24), (32, 0), (8, 24), (32, 24)])
def test_a_row_attends_bitwise_the_same_alone_or_among_others(ops, block, window, packed):
    """Batch invariance: a row's output does not depend on the rows it shares a call with — a whole
    prefill chunk, the chunk split in pieces (as chunked prefill or a prefix-cache hit leaves it),
    the row alone as a decode, or next to other sequences' rows; nor on the key cache's layout."""
    torch.manual_seed(2)
    heads, kv_heads, dim, scale, length = 9, 3, 64, 0.125, 53
    width = length // block + 2
    k_cache, v_cache = torch.randn(2, 3 * width * block, kv_heads, dim).bfloat16().unbind(0)
    table, other = torch.randperm(3 * width)[: 2 * width].view(2, width)
    # NaN wherever no row may look: past each sequence's context and in blocks no table holds
    readable = torch.zeros(3 * width * block, dtype=torch.bool)
    for blocks, upto in ((table, length), (other, 40)):
        readable[(blocks[:, None] * block + torch.arange(block)).flatten()[:upto]] = True
    k_cache[~readable] = float("nan")
    v_cache[~readable] = float("nan")
    q = torch.randn(length, heads, dim).bfloat16().float()
    lens = torch.arange(1, length + 1)
    if packed and not ops.packs_keys(dim, block):
        pytest.skip(f"the {ops.variant} build keeps no packed keys")
    keys, values, kv_scales = pack_keys(k_cache, block) if packed else k_cache, v_cache, None
    if packed == "int8":  # NaN scales where no row may look
        keys, values, kv_scales, _ = int8_caches(k_cache.nan_to_num(), v_cache.nan_to_num(), block)
        kv_scales[~readable.view(-1, block)[:, None, None, :].expand_as(kv_scales)] = float("nan")

    def attend(rows: list[int], others: int = 0) -> torch.Tensor:
        """The rows (positions of the sequence) in one call, after `others` rows of another sequence."""
        extra_q = torch.randn(others, heads, dim).bfloat16().float()
        tables = torch.cat([other.expand(others, width), table.expand(len(rows), width)]).contiguous()
        ctx_lens = torch.cat([torch.arange(40 - others, 40), lens[rows]]).contiguous()
        qs = torch.cat([extra_q, q[rows]]).contiguous()
        return paged_rows(ops, qs, keys, values, tables, ctx_lens, heads, block, scale, window, 0.0, kv_scales)[others:]

    whole = attend(list(range(length)))
    pieces = torch.cat([attend(list(range(a, min(a + 13, length)))) for a in range(0, length, 13)])
    alone = torch.cat([attend([row]) for row in range(length)])
    among = torch.cat([attend(list(range(a, min(a + 5, length))), others=7) for a in range(0, length, 5)])
    assert not whole.isnan().any()
    for got in (pieces, alone, among):
        assert torch.equal(got, whole)
    if packed is True:  # and the same as from the plain layout
        keys = k_cache
        assert torch.equal(attend(list(range(length))), whole)


_THREADS_SCRIPT = """
import os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from inferd.llm.runner.kernels import native_ops
ops = native_ops()
x = torch.empty(4096, 2048, dtype=torch.bfloat16)  # no torch op runs in parallel before the kernel
x.view(torch.int16).fill_(0x3F80)  # 1.0 in bf16, filled without a parallel region either
before = len(os.listdir("/proc/self/task"))
for _ in range(3):
    ops.silu_mul(x)  # an OpenMP parallel loop at this size
after = len(os.listdir("/proc/self/task"))
maps = open("/proc/self/maps").read().splitlines()
runtimes = sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line})
print(before, after, len(runtimes))
"""


def _threads_after_kernels(num_threads: int) -> tuple[int, int, int]:
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(num_threads)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    before, after, runtimes = map(int, result.stdout.split())
    return before, after, runtimes


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc")
def test_kernels_share_torchs_openmp_runtime_and_its_thread_count():
    """One OpenMP runtime in the process (torch's), and the kernels' parallel loops use the threads
    torch is told to use (--num-threads), no more: with one, they start no thread at all."""
    for num_threads in (1, 2):
        before, after, runtimes = _threads_after_kernels(num_threads)
        assert runtimes == 1
        # No thread of their own: with one, the loops ran on the calling thread alone (a runtime or
        # a thread count of their own would start a worker); with two, on torch's pool as it was.
        assert after == before, num_threads


def test_the_boundary_refuses_what_a_kernel_would_read_or_write_out_of_bounds(ops):
    bf16 = torch.zeros(4, 64, dtype=torch.bfloat16)
    cases = [
        lambda: ops.silu_mul(bf16.float()),  # float32 read as bf16: twice the bytes
        lambda: ops.silu_mul(bf16[:, :63]),  # odd width, and rows that are not contiguous
        lambda: ops.add_rms_norm(bf16, torch.zeros(3, 64, dtype=torch.bfloat16), bf16[0], 1e-6),
        lambda: ops.add_rms_norm(bf16, None, torch.zeros(32, dtype=torch.bfloat16), 1e-6),
        lambda: ops.argmax(torch.zeros(4, 8, dtype=torch.float64)),
        lambda: ops.argmax(torch.zeros(8, 4).t()),  # column stride 4
    ]
    kv = torch.zeros(16, 2, 8, dtype=torch.bfloat16)
    qkv = torch.zeros(3, (2 + 2 * 2) * 8, dtype=torch.bfloat16)
    table = torch.zeros(3, 8)

    def rope(slots, k_cache=kv):
        ops.rope_and_cache(qkv, 2, 2, 8, table, table, slots, k_cache, kv)

    cases += [
        lambda: rope(torch.tensor([0, 1, 16])),  # slot 16 of a 16-slot cache
        lambda: rope(torch.tensor([0, -1, 2])),
        lambda: rope(torch.tensor([0, 1, 2], dtype=torch.int32)),
        lambda: rope(torch.tensor([0, 1, 2]), k_cache=kv.float()),
    ]
    for case in cases:
        with pytest.raises(kernels.KernelArgumentError):
            case()
    rope(torch.tensor([0, 1, 15]))  # what the kernel takes still runs
