"""GGUF files converted tensor by tensor into the served dtype: the same weights as transformers' own
GGUF loader, the same greedy output, a bounded peak, and the conversion cache's rules.

The GGUF files are written here with the ``gguf`` package as llama.cpp's converter writes them:
gguf's tensor names, Llama's Q/K rows permuted, 1-D tensors in F32, a byte-level BPE tokenizer
(``tokenizer.ggml.*``) and a chat template. Q4_K has no quantiser in the ``gguf`` package, so its
blocks are random bytes with small scales: still a valid Q4_K tensor for both loaders to read.
"""

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.hub import gguf as hub_gguf
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (GGUF architecture, transformers model_type, config) of each family; llama.cpp writes Mistral as
# "llama" and transformers tells it apart by general.name.
FAMILIES = {
    "llama": ("llama", "llama", dict(head_dim=16)),
    "mistral": ("llama", "mistral", dict(head_dim=16)),
    "qwen2": ("qwen2", "qwen2", dict()),
    # transformers' GGUF config leaves Qwen3's head_dim at its default, 128, as real Qwen3s have it.
    "qwen3": ("qwen3", "qwen3", dict(head_dim=128, tie_word_embeddings=True)),
}


def tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return [*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]


def hf_model(family: str, hidden: int = 64, intermediate: int = 128, layers: int = 2, seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, model_type, family_extra = FAMILIES[family]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokens()), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        **{"tie_word_embeddings": False, **family_extra, **extra},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, so a wrong mapping of them shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows as llama.cpp's convert_hf_to_gguf.py writes them for Llama (rotary pairs interleaved)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def stored(weights: np.ndarray, qtype, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """``weights`` as the file stores them in ``qtype`` (1-D tensors stay F32, as llama.cpp keeps them)."""
    import gguf

    if weights.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return weights.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return weights.astype(np.float16), qtype
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        rows, cols = weights.shape
        blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
        blocks[:, 0:2] = np.array([0.002], dtype=np.float16).view(np.uint8)  # d
        blocks[:, 2:4] = np.array([0.004], dtype=np.float16).view(np.uint8)  # dmin
        return blocks.reshape(rows, -1), qtype
    return gguf.quants.quantize(weights, qtype), qtype


def write_gguf(path: Path, model, family: str, qtype: str, name: str | None = None, skip: tuple = ()) -> Path:
    """``model`` written as a GGUF file of ``qtype`` (F32, F16, Q8_0 or Q4_K), without the tensors
    named in ``skip``."""
    import gguf

    arch, model_type, _ = FAMILIES[family]
    config = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or model_type)  # transformers reads a "llama" named exactly "mistral" as Mistral
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens())
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens()) - 3)
    )
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    table = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)  # fmt: skip
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, _, suffix = name.rpartition(".")
        gguf_name = f"{table.get_name(base)}.{suffix}"
        if gguf_name in skip:
            continue
        weights = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        data, data_type = stored(weights, getattr(gguf.GGMLQuantizationType, qtype), rng)
        writer.add_tensor(gguf_name, data, raw_dtype=data_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def converted_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def transformers_gguf(path: Path, dtype: torch.dtype):
    """transformers' own GGUF loader: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def assert_same_weights(folder: Path, reference) -> None:
    state = converted_state(folder)
    expected = reference.state_dict()
    if reference.config.tie_word_embeddings:
        del expected["lm_head.weight"]  # the same tensor as the embeddings; not saved twice
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


CASES = [
    ("llama", "F32"),
    ("llama", "F16"),
    ("llama", "Q8_0"),
    ("qwen2", "Q8_0"),
    ("qwen3", "F16"),
]


@pytest.mark.parametrize(("family", "qtype"), CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_tensor_equals_transformers_gguf_load_in_the_served_dtype(tmp_path, family, qtype, dtype):
    path = write_gguf(tmp_path / f"tiny.{qtype}.gguf", hf_model(family), family, qtype)
    folder = hub_gguf.converted_gguf(path, tmp_path / "cache", dtype)
    reference = transformers_gguf(path, getattr(torch, dtype))
    assert_same_weights(folder, reference)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == dtype and config["architectures"] == [type(reference).__name__]
    assert config["model_type"] == FAMILIES[family][1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gguf_read_as_mistral_converts_though_transformers_loader_cannot(tmp_path, dtype):
    """transformers reads a "llama" GGUF named exactly "mistral" as Mistral, and then its loader finds
    no "mistral" name table in gguf and fails. Converted here with the file's own (llama) table; the
    reference is transformers' load of the same weights under another name, which it reads as Llama."""
    model = hf_model("mistral")
    path = write_gguf(tmp_path / "mistral" / "tiny.Q8_0.gguf", model, "mistral", "Q8_0")
    as_llama = write_gguf(tmp_path / "llama" / "tiny.Q8_0.gguf", model, "mistral", "Q8_0", name="tiny")
    folder = hub_gguf.converted_gguf(path, tmp_path / "cache", dtype)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert_same_weights(folder, transformers_gguf(as_llama, getattr(torch, dtype)))


def test_a_k_quant_equals_transformers_gguf_load(tmp_path):
    # Q4_K's 256-element blocks need rows of 256.
    model = hf_model("llama", hidden=256, intermediate=512, head_dim=64)
    path = write_gguf(tmp_path / "tiny.Q4_K.gguf", model, "llama", "Q4_K")
    folder = hub_gguf.converted_gguf(path, tmp_path / "cache", "float32")
    assert_same_weights(folder, transformers_gguf(path, torch.float32))


def test_an_f32_file_converts_back_to_the_original_weights_exactly(tmp_path):
    """Independently of transformers: llama.cpp's Q/K permutation is undone, every name lands home."""
    model = hf_model("llama")
    path = write_gguf(tmp_path / "tiny.F32.gguf", model, "llama", "F32")
    state = converted_state(hub_gguf.converted_gguf(path, tmp_path / "cache", "float32"))
    assert sorted(state) == sorted(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_name_table_is_transformers_mapping(family):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    arch = FAMILIES[family][0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_model(family).config)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    expected = get_gguf_hf_weights_map(model, processor, model_type=arch)
    assert hub_gguf._hf_names(arch, model.state_dict(), model.config.num_hidden_layers) == expected


async def test_served_greedy_output_equals_transformers_generate_on_the_gguf(tmp_path):
    path = write_gguf(tmp_path / "tiny.Q8_0.gguf", hf_model("llama", layers=3, seed=5), "llama", "Q8_0")
    reference = transformers_gguf(path, torch.float32)
    prompts = [[(i * 7 + k) % 250 + 3 for i in range(n)] for k, n in enumerate((4, 19, 33))]
    expected = []
    for ids in prompts:
        out = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(ids) :].tolist())
    config = LLMConfig(kv_cache_memory=2 * 2**20, cache_dir=str(tmp_path / "cache"))
    client = LLMClient.start(path, config, asyncio.get_running_loop())  # converts the GGUF on load
    try:
        assert client.engine.runner.decoder is not None  # inferd's own forward, read from the shards
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

        async def run(ids):
            return [t async for out in client.generate(ids, params) for t in out.new_token_ids]

        got = await asyncio.gather(*[run(ids) for ids in prompts])
    finally:
        client.close()
    for tokens_out, want in zip(got, expected):
        assert tokens_out[: len(want)] == want  # generate stops at EOS; the engine was told not to


def test_each_dtype_is_a_conversion_of_its_own(tmp_path):
    path = write_gguf(tmp_path / "tiny.Q8_0.gguf", hf_model("llama"), "llama", "Q8_0")
    fp32 = hub_gguf.converted_gguf(path, tmp_path / "cache", "float32")
    bf16 = hub_gguf.converted_gguf(path, tmp_path / "cache", "bfloat16")
    assert fp32 != bf16 and "float32" in fp32.name and "bfloat16" in bf16.name
    assert {t.dtype for t in converted_state(fp32).values()} == {torch.float32}
    assert {t.dtype for t in converted_state(bf16).values()} == {torch.bfloat16}
    assert hub_gguf.converted_gguf(path, tmp_path / "cache", "bfloat16") == bf16  # reused


def test_shards_are_bounded_and_an_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    import safetensors.torch

    path = write_gguf(tmp_path / "tiny.F16.gguf", hf_model("llama"), "llama", "F16")
    monkeypatch.setattr(hub_gguf, "SHARD_BYTES", 70_000)  # the largest tensor: 262 × 64 × 4 = 67,072 bytes
    real_save = safetensors.torch.save_file
    written = []

    def crash_on_the_third(tensors, file, metadata=None):
        if len(written) == 2:
            raise OSError("killed")
        written.append(Path(file).name)
        real_save(tensors, file, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_the_third)
    with pytest.raises(OSError, match="killed"):
        hub_gguf.converted_gguf(path, tmp_path / "cache", "float32")
    assert [p.suffix for p in (tmp_path / "cache" / "gguf").iterdir()] == [".lock"]  # nothing half-done
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    folder = hub_gguf.converted_gguf(path, tmp_path / "cache", "float32")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in folder.glob("*.safetensors"))
    for file in files:
        assert (folder / file).stat().st_size <= 70_000 + 4096  # the shard and its header
    assert_same_weights(folder, transformers_gguf(path, torch.float32))


def test_a_file_without_some_of_the_models_tensors_is_refused(tmp_path):
    from inferd.errors import ModelLoadError

    path = write_gguf(
        tmp_path / "tiny.Q8_0.gguf", hf_model("llama"), "llama", "Q8_0", skip=("blk.1.ffn_down.weight",)
    )
    with pytest.raises(
        ModelLoadError, match=r"no tensor for 1 of .* \(e\.g\. model\.layers\.1\.mlp\.down_proj\.weight\)"
    ):
        hub_gguf.converted_gguf(path, tmp_path / "cache", "float32")
    assert [p.suffix for p in (tmp_path / "cache" / "gguf").iterdir()] == [".lock"]


def test_an_architecture_not_converted_here_goes_through_transformers_whole(tmp_path, monkeypatch, caplog):
    path = write_gguf(tmp_path / "tiny.Q8_0.gguf", hf_model("llama"), "llama", "Q8_0")
    monkeypatch.setattr(hub_gguf, "TENSOR_BY_TENSOR", frozenset())
    with caplog.at_level(logging.INFO, logger="inferd.hub.gguf"):
        folder = hub_gguf.converted_gguf(path, tmp_path / "cache", "bfloat16")
    assert "converted by transformers' loader, whole" in caplog.text
    assert_same_weights(folder, transformers_gguf(path, torch.bfloat16))
    info = hub_gguf.read_gguf_info(path)
    assert info.conversion("bfloat16") == hub_gguf.Conversion("bfloat16", 4 * info.num_params,
                                                              2 * info.num_params, tensor_by_tensor=False)  # fmt: skip


PEAK_SCRIPT = """
import json, sys
from pathlib import Path

import gguf, safetensors.torch, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.llama import modeling_llama
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

from inferd.hub import gguf as hub_gguf


def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024


hub_gguf.SHARD_BYTES = 64 * 2**20
before = status("VmRSS")
hub_gguf.converted_gguf(Path(sys.argv[1]), Path(sys.argv[2]), "float32")
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def test_the_conversion_holds_a_shard_and_a_tensor_not_the_model(tmp_path, monkeypatch):
    """~200 MB of F16 weights (400 MB in float32), converted into float32 in 64 MiB shards in a fresh
    process: its peak RSS grows by about a shard and the largest tensor, as ``conversion`` reports,
    where transformers' whole-model path held the float32 model twice (800 MB). The peak is the
    process's VmHWM, not getrusage's ru_maxrss: that one starts from the forking parent's RSS."""
    model_path = write_large_f16_gguf(tmp_path / "large.F16.gguf")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), str(model_path), str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    monkeypatch.setattr(hub_gguf, "SHARD_BYTES", 64 * 2**20)  # as in the run
    info = hub_gguf.read_gguf_info(model_path)
    bound = info.conversion("float32").peak_bytes
    # The report's figure, plus 32 MiB for what config, tokenizer and the meta model allocate.
    assert growth < bound + 32 * 2**20, (growth, bound)
    assert growth < 2 * 4 * info.num_params / 6, (growth, info.num_params)


def test_the_conversion_cost_is_the_largest_shard_and_the_tensor_at_work(monkeypatch):
    monkeypatch.setattr(hub_gguf, "SHARD_BYTES", 1000)
    q8_0 = 8  # 32 weights in 34 bytes
    tensors = tuple(
        hub_gguf.TensorEntry(name, shape, ggml_type, 0, stored)
        for name, shape, ggml_type, stored in [
            ("token_embd.weight", (8, 32), q8_0, 8 * 34),  # 1,024 bytes in float32: a shard of its own
            ("blk.0.attn_norm.weight", (32,), 0, 128),  # F32
            ("blk.0.attn_q.weight", (4, 32), q8_0, 4 * 34),  # 512 bytes in float32
            ("blk.0.attn_k.weight", (2, 32), q8_0, 2 * 34),  # 256: with the two above, 896 in a shard
        ]
    )
    info = hub_gguf.GGUFInfo({"general.architecture": "llama"}, tensors, 0, 0)
    fp32, bf16 = info.conversion("float32"), info.conversion("bfloat16")
    assert hub_gguf.plan_shards([1024, 128, 512, 256]) == [range(0, 1), range(1, 4)]
    # The embedding at work: 272 bytes as stored, 1,024 in float32 and 1,024 being dequantised.
    assert fp32 == hub_gguf.Conversion("float32", 1024 + 272 + 2 * 1024, 4 * 480, tensor_by_tensor=True)
    assert hub_gguf.plan_shards([512, 64, 256, 128]) == [range(0, 4)]
    assert bf16 == hub_gguf.Conversion("bfloat16", 960 + 272 + 2 * 1024, 2 * 480, tensor_by_tensor=True)


def test_the_plan_counts_a_conversion_that_runs_at_start(tmp_path):
    from inferd.config import load_settings
    from inferd.memory.plan import KVPolicy, ModelNeed, describe, plan_device
    from inferd.memory.server import server_needs

    path = write_gguf(tmp_path / "tiny.Q8_0.gguf", hf_model("llama"), "llama", "Q8_0")
    settings = load_settings({"model": [str(path)], "device": "cpu", "dtype": "float32",
                              "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    (need,) = server_needs(settings)
    assert need.load_peak_bytes == hub_gguf.read_gguf_info(path).conversion("float32").peak_bytes > 0
    hub_gguf.converted_gguf(path, tmp_path / "cache", "float32")
    assert server_needs(settings)[0].load_peak_bytes == 0  # converted: later starts skip it

    MiB = 2**20
    embedder = ModelNeed("embed", "cpu", "float32", 300 * MiB, 100 * MiB, 100 * MiB)
    chat = ModelNeed(
        "chat", "cpu", "float32", 200 * MiB, 50 * MiB, 100 * MiB, 1024, 1024, load_peak_bytes=600 * MiB
    )
    policy = KVPolicy(kv_cache_memory=64 * MiB)
    # Beside the embedder's 500 MiB, the conversion's 600 MiB does not fit 1 GiB, though the
    # steady state (914 MiB) does; with 1.25 GiB it fits.
    (problem,) = plan_device([embedder, chat], 1024 * MiB, policy, "cpu").problems
    assert "converting the GGUF file of chat at start needs 600.0 MiB" in problem
    assert "524.0 MiB of the 1.00 GiB budget is left beside the other models" in problem
    plan = plan_device([embedder, chat], 1280 * MiB, policy, "cpu")
    assert plan.fits
    assert "GGUF conversion first 600.0 MiB (once, freed before loading)" in "\n".join(describe((plan,)))


def write_large_f16_gguf(path: Path) -> Path:
    """A Llama-shaped file of about 100 M parameters in F16, written without building a model."""
    import gguf

    hidden, intermediate, layers = 1024, 4096, 6
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("large")
    for add, value in [("context_length", 256), ("embedding_length", hidden), ("block_count", layers),
                       ("feed_forward_length", intermediate), ("head_count", 8), ("head_count_kv", 8),
                       ("rope_dimension_count", hidden // 8), ("layer_norm_rms_eps", 1e-6),
                       ("vocab_size", len(tokens())), ("tokenizer_model", "gpt2"), ("token_list", tokens()),
                       ("token_merges", MERGES), ("bos_token_id", 1), ("eos_token_id", 2)]:  # fmt: skip
        getattr(writer, f"add_{add}")(value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens()), hidden), "output_norm.weight": (hidden,),
              "output.weight": (len(tokens()), hidden)}  # fmt: skip
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,)}
        shapes |= {f"blk.{i}.attn_{p}.weight": (hidden, hidden) for p in ("q", "k", "v", "output")}
        shapes |= {f"blk.{i}.ffn_{p}.weight": (intermediate, hidden) for p in ("gate", "up")}
        shapes[f"blk.{i}.ffn_down.weight"] = (hidden, intermediate)
    for name, shape in shapes.items():
        values = rng.standard_normal(shape, dtype=np.float32) * 0.02
        writer.add_tensor(name, values if len(shape) == 1 else values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
