"""Llama-family safetensors read straight into inferd's decoder: the same logits as transformers'
own model, the checkpoints it does not know left to transformers' loader, and no modeling import."""

import json
import shutil

import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.llm.models.checkpoint import StaticRotary
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.runner.model_runner import ModelRunner, ScheduledChunk
from tests.unit.llm.test_architectures import COMMON
from tests.unit.modeling_imports import heavy_modules_after

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)
VARIANTS = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied-biases": ("llama", dict(tie_word_embeddings=True, attention_bias=True)),
    "llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=50000.0)),
    "linear-rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "yarn-rope": ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64))),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "qwen2-biases": ("qwen2", dict()),
    "qwen2-windowed-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=16)),
}
PROMPT = [(i * 13) % 180 + 10 for i in range(40)]  # longer than the windows and the llama3 original length


def build(root, tokenizer_dir, name, family, extra, **save):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **(COMMON | extra))).eval()
    out = root / f"ckpt-{name}"
    model.save_pretrained(out, **save)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / file, out / file)
    return out, model


def prefill_logits(loaded, config, ids=PROMPT):
    runner = ModelRunner(loaded, config, num_blocks=64)
    return runner.execute([ScheduledChunk(ids, 0, list(range(len(ids) // 4 + 1)), len(ids))])


FP32 = LLMConfig(kv_cache_memory=2**20, block_size=4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_direct_load_gives_transformers_logits(model_root, tiny_llama, name):
    family, extra = VARIANTS[name]
    path, model = build(model_root, tiny_llama, name, family, extra)
    loaded = load_causal_lm(path, FP32)
    assert loaded.model is None and loaded.decoder is not None  # read straight from the file
    assert isinstance(loaded.decoder.rotary, StaticRotary)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded, FP32), expected, atol=2e-5, rtol=1e-4)


def test_sharded_checkpoint_is_read_from_its_index(model_root, tiny_llama):
    path, model = build(model_root, tiny_llama, "sharded", "llama", {}, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    loaded = load_causal_lm(path, FP32)
    assert loaded.model is None
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded, FP32), expected, atol=2e-5, rtol=1e-4)


def _add_tensor(path, name):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    state[name] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "case", ["unknown-tensor", "dynamic-rope", "transformers-impl", "untied-head-missing"]
)
def test_checkpoints_it_does_not_know_go_through_transformers(model_root, tiny_llama, case):
    extra = {"rope_scaling": dict(rope_type="dynamic", factor=2.0)} if case == "dynamic-rope" else {}
    path, model = build(model_root, tiny_llama, case, "llama", extra | {"tie_word_embeddings": False})
    config = FP32
    if case == "unknown-tensor":
        _add_tensor(path, "model.layers.0.mlp.extra_scale")
    elif case == "transformers-impl":
        config = LLMConfig(kv_cache_memory=2**20, block_size=4, model_impl="transformers")
    elif case == "untied-head-missing":
        from safetensors.torch import load_file, save_file

        state = load_file(str(path / "model.safetensors"))
        del state["lm_head.weight"]
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_causal_lm(path, config)
    assert loaded.model is not None  # transformers built the model
    assert (loaded.decoder is None) == (case == "transformers-impl")
    if case in ("dynamic-rope", "transformers-impl"):
        with torch.no_grad():
            expected = model(torch.tensor([PROMPT])).logits[0]
        torch.testing.assert_close(prefill_logits(loaded, config), expected, atol=2e-5, rtol=1e-4)


def test_eos_ids_come_from_generation_config_too(model_root, tiny_llama):
    path, _ = build(model_root, tiny_llama, "eos", "llama", {})
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_causal_lm(path, FP32).facts.eos_token_ids == {2, 7}


def test_direct_load_never_imports_transformers_modeling(tiny_llama):
    code = (
        "from pathlib import Path\n"
        "from inferd.config.engine import LLMConfig\n"
        "from inferd.llm.models.loader import load_causal_lm\n"
        f"loaded = load_causal_lm(Path({str(tiny_llama)!r}), LLMConfig(kv_cache_memory=2**20))\n"
        "assert loaded.model is None and loaded.decoder is not None\n"
    )
    assert heavy_modules_after(code) == []
