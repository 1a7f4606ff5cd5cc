"""The CPU bf16 path: prepacked oneDNN linears and the native kernel over a bf16 cache stay close
to the fp32 reference."""

import pytest
import torch
import torch.nn.functional as F

from inferd.config.engine import LLMConfig
from inferd.config.settings import cpu_has_native_bf16
from inferd.errors import ModelLoadError
from inferd.llm.models.decoder import NativeLinear, PackedLinear
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.runner.kernels import native_ops
from inferd.llm.runner.model_runner import ModelRunner, ScheduledChunk
from tests.unit.llm.kernel_helpers import LINEAR_KERNELS, linear_kernel_selected

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")


@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_packed_linear_matches_linear(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    got = PackedLinear(linear)(x).float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=0.03, rtol=0.02)


needs_native_linear = pytest.mark.skipif(
    native_ops() is None or not native_ops().has_linear, reason="no native bf16 linear for this CPU"
)


@pytest.fixture(params=LINEAR_KERNELS)
def linear_kernel(request):
    with linear_kernel_selected(native_ops(), request.param) as name:
        yield name


@needs_native_linear
@pytest.mark.parametrize("rows", [1, 5, 12, 13, 16, 17, 24, 25, 32, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_matches_linear(linear_kernel, rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 200, bias=bias).to(torch.bfloat16)  # 200 outputs: a partial column block
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = F.linear(
        x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
    )
    got = NativeLinear(linear, native_ops())(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, atol=0.03, rtol=0.02)


def logits_of(path, dtype, prompts, native=True, quantization="none", kv_cache_dtype="model"):
    """Logits of a prefill step of ``prompts`` and of one decode step after it."""
    config = LLMConfig(
        dtype=dtype,
        kv_cache_memory=2**20,
        block_size=8 if kv_cache_dtype == "int8" else 4,  # int8 caches: blocks of a multiple of 8
        native_kernels=native,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
    )
    loaded = load_causal_lm(path, config)
    runner = ModelRunner(loaded, config, num_blocks=64)
    assert runner.decoder is not None and (runner.native is not None) == native
    chunks, tables = [], []
    for index, ids in enumerate(prompts):
        tables.append(list(range(index * 8, index * 8 + 8)))
        chunks.append(ScheduledChunk(ids, 0, tables[-1], 1))
    first = runner.execute(chunks)  # prefill
    # One decode step per prompt through the native kernel over the bf16 (or fp32) cache.
    decodes = [ScheduledChunk([int(first[i].argmax())], len(p), tables[i], 1) for i, p in enumerate(prompts)]
    return first, runner.execute(decodes), runner


@pytest.mark.parametrize("native", [True, False], ids=["native-kernels", "torch-ops"])
def test_bf16_engine_logits_follow_fp32(tiny_llama, native):
    """bf16 through the native path (AMX linears where the CPU has AMX, fused element-wise steps,
    bf16 decode kernel) and through torch ops with oneDNN-prepacked linears, against fp32."""
    prompts = [[5, 17, 33, 9, 60, 71, 12], [8, 9, 10], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    ref_prefill, ref_decode, _ = logits_of(tiny_llama, "float32", prompts)
    prefill, decode, runner = logits_of(tiny_llama, "bfloat16", prompts, native)
    expected = NativeLinear if native and runner.native.has_linear else PackedLinear
    assert isinstance(runner.decoder.layers[0].qkv, expected)
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    for got, ref in ((prefill, ref_prefill), (decode, ref_decode)):
        cosine = F.cosine_similarity(got, ref, dim=-1)
        assert cosine.min() > 0.999, cosine


@needs_native_linear
def test_native_linear_over_several_row_blocks(linear_kernel):
    """Rows beyond one L2-sized block (320 rows at K = 1536) are computed block by block."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(1536, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(700, 1536, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(NativeLinear(linear, native_ops())(x).float(), expected, atol=0.06, rtol=0.02)


needs_int8 = pytest.mark.skipif(
    native_ops() is None or not native_ops().has_int8_linear, reason="no int8 linear kernel for this CPU"
)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as linear_int8 quantises it (bf16_linear.c): each row per group of 32 inputs, symmetric int8
    with the group's own scale (peak / 127), values rounded half to even; returned dequantised."""
    groups = x.float().view(x.shape[0], -1, 32)
    peak = groups.abs().amax(-1, keepdim=True)
    # 127 / peak divided once in float32 as the kernel does (torch's 127 / t multiplies by 1 / t)
    inv = torch.where(peak > 1e-30, torch.full_like(peak, 127) / peak, torch.zeros_like(peak))
    return (torch.round(groups * inv) * (peak / 127)).view(x.shape)


@needs_int8
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 33, 400])  # 400: three blocks of rows (ROW_BLOCK)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_int8_weights_times_int8_activations(rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 200, bias=bias).to(torch.bfloat16)  # 200 outputs: a partial column block
    layer = NativeLinear(linear, native_ops(), int8=True)
    scale = layer.scale[:200, None]
    quantised = torch.round(linear.weight.float() / scale).clamp(-127, 127)
    # Per column, the int8 weights are the bf16 ones to within half a step of that column's scale.
    assert ((quantised * scale - linear.weight.float()).abs() <= scale / 2 + 1e-6).all()
    x = torch.randn(rows, 96, dtype=torch.bfloat16) * torch.logspace(-3, 1, 96).bfloat16()  # uneven groups
    x[0, 32:64] = 0  # a group of zeros
    bias_f = None if linear.bias is None else linear.bias.double()
    expected = F.linear(int8_activations(x).double(), (quantised * scale).double(), bias_f)
    # exact int32 sums within a group; float32 only across the 3 groups and in the scales
    head = NativeLinear(linear, native_ops(), fp32_out=True, int8=True)(x)
    assert head.dtype == torch.float32
    torch.testing.assert_close(head.double(), expected, atol=1e-5, rtol=1e-5)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert torch.equal(got, head.bfloat16())
    # a row's result is its own: the same alone as among the others, in any block of rows
    assert torch.equal(layer(x[-1:].contiguous()), got[-1:])
    assert torch.equal(layer(x[rows // 2 :].contiguous()), got[rows // 2 :])


@needs_int8
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("at", [0, 20, 40])
def test_int8_linear_rows_with_a_nan_or_infinity_give_nan(bad, at):
    """As torch would: a NaN or an infinity in a row makes that row's outputs NaN (never finite
    garbage), in either half of a group, and leaves the other rows alone."""
    torch.manual_seed(0)
    layer = NativeLinear(torch.nn.Linear(64, 40).to(torch.bfloat16), native_ops(), fp32_out=True, int8=True)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    clean = layer(x)
    x[1, at] = bad
    got = layer(x)
    assert got[1].isnan().all()
    assert torch.equal(got[[0, 2]], clean[[0, 2]])


@needs_int8
def test_int8_weights_follow_fp32(tiny_llama):
    prompts = [[5, 17, 33, 9, 60, 71, 12], [8, 9, 10], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    ref_prefill, ref_decode, _ = logits_of(tiny_llama, "float32", prompts)
    prefill, decode, runner = logits_of(tiny_llama, "bfloat16", prompts, quantization="int8")
    layer = runner.decoder.layers[0]
    int8 = [layer.qkv, layer.o_proj, layer.gate_up, layer.down, runner.decoder.lm_head]
    assert all(isinstance(m, NativeLinear) and m.scale is not None for m in int8)
    for got, ref in ((prefill, ref_prefill), (decode, ref_decode)):
        cosine = F.cosine_similarity(got, ref, dim=-1)
        assert cosine.min() > 0.999, cosine


@pytest.mark.parametrize(
    ("dtype", "native", "message"),
    [("float32", True, "in bfloat16"), ("bfloat16", False, "native kernels")],
)
def test_int8_is_refused_where_it_cannot_run(tiny_llama, dtype, native, message):
    config = LLMConfig(dtype=dtype, kv_cache_memory=2**20, native_kernels=native, quantization="int8")
    with pytest.raises(ModelLoadError, match=message):
        load_causal_lm(tiny_llama, config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "float32"}, "in bfloat16"),
        ({"native_kernels": False}, "native kernels"),
        ({"block_size": 4}, "--block-size 4"),
        ({"model_impl": "transformers"}, "inferd's own forward"),
    ],
)
def test_an_int8_kv_cache_is_refused_where_it_cannot_run(tiny_llama, overrides, message):
    """Only the native bf16 attention reads int8 caches: anywhere else the load says why, up front."""
    settings = {"dtype": "bfloat16", "kv_cache_memory": 2**20, "block_size": 8, **overrides}
    with pytest.raises(ModelLoadError, match=f"--kv-cache-dtype int8 cannot serve this model: .*{message}"):
        load_causal_lm(tiny_llama, LLMConfig(**settings, kv_cache_dtype="int8"))


# int8 caches need head_dim a multiple of 32 (tiny_llama's is 16): 2 heads of 32 over one kv head
WIDE_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)


@needs_native_linear
def test_an_int8_kv_cache_is_refused_for_per_head_qk_norms(model_root, tiny_llama):
    """Qwen3's per-head q/k norms keep its layers on torch ops, which cannot write an int8 cache:
    refused at load, not at the first request."""
    from tests.unit.llm.test_architectures import build

    path = build(model_root, "qwen3", tiny_llama, head_dim=32)[0]
    config = LLMConfig(dtype="bfloat16", kv_cache_memory=2**20, block_size=8, kv_cache_dtype="int8")
    with pytest.raises(ModelLoadError, match=r"--kv-cache-dtype int8 cannot serve this model: .*q/k norms"):
        load_causal_lm(path, config)


@needs_native_linear
def test_an_int8_kv_cache_keeps_int8_and_follows_the_bf16_cache(model_root, tiny_llama):
    """--kv-cache-dtype int8: int8 keys and values with float32 scales, a little over half the
    bytes of bf16 per token, and logits that follow the bf16 cache's (the same weights)."""
    from tests.unit.llm.test_architectures import build

    path = build(model_root, "llama", tiny_llama, **WIDE_HEADS)[0]
    prompts = [[5, 17, 33, 9, 60, 71, 12], [8, 9, 10], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    ref_prefill, ref_decode, ref_runner = logits_of(path, "bfloat16", prompts)
    prefill, decode, runner = logits_of(path, "bfloat16", prompts, kv_cache_dtype="int8")
    assert all(k.dtype == v.dtype == torch.int8 for k, v in runner.kv_caches)
    assert len(runner.kv_scales) == len(runner.kv_caches) and runner.batch_invariant
    facts = runner.facts
    per_head = facts.head_dim + 4  # int8 values and a float32 scale
    assert facts.kv_bytes_per_token() == 2 * facts.num_layers * facts.num_kv_heads * per_head
    assert facts.kv_bytes_per_token() < 0.6 * ref_runner.facts.kv_bytes_per_token()
    for got, ref in ((prefill, ref_prefill), (decode, ref_decode)):
        cosine = F.cosine_similarity(got, ref, dim=-1)
        assert cosine.min() > 0.999, cosine


@needs_native_linear
@pytest.mark.parametrize("kv_cache_dtype", ["model", "int8"])
@pytest.mark.parametrize("quantization", ["none", "int8"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_one_native_call_per_step_equals_the_layer_by_layer_path(
    model_root, tiny_llama, family, quantization, kv_cache_dtype, monkeypatch
):
    """When every token is a query row, decoder_layers_bf16 runs all layers in one call: the same
    kernels in the same order as the Python layer loop, so the same logits to the bit. Mistral's
    window (8, shorter than the prompts) and Qwen2's q/k/v biases go through it too."""
    from inferd.llm.models.decoder import Decoder
    from tests.unit.llm.test_architectures import build

    if kv_cache_dtype == "int8":
        path = build(model_root, family, tiny_llama, **WIDE_HEADS)[0]
    else:
        path = tiny_llama if family == "llama" else build(model_root, family, tiny_llama)[0]
    prompts = [[5, 17, 33, 9, 60, 71, 12], [8, 9, 10], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    if quantization == "int8" and not native_ops().has_int8_linear:
        pytest.skip("no int8 linear kernel for this CPU")
    run = dict(quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    one_prefill, one_decode, runner = logits_of(path, "bfloat16", prompts, **run)
    assert runner.decoder._layer_table[1] is not None  # the one-call path ran
    monkeypatch.setattr(Decoder, "_native_layers", lambda self, *args: None)
    loop_prefill, loop_decode, _ = logits_of(path, "bfloat16", prompts, **run)
    assert torch.equal(one_prefill, loop_prefill)
    assert torch.equal(one_decode, loop_decode)
