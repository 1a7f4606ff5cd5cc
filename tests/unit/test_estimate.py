"""Memory estimates from config.json: the worked examples, exact where the formula is exact."""

import json

import pytest
from typer.testing import CliRunner

from inferd.cli.main import app
from inferd.errors import ModelLoadError
from inferd.hub.inspect import inspect_model
from inferd.memory.estimate import (
    count_parameters,
    estimate,
    kv_bytes_per_token,
    naive_kv_bytes,
    shape_from_config,
    weight_bytes,
)

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
# Llama-3-8B's shape: grouped-query attention with 8 KV heads for 32 query heads.
LLAMA3_8B = {
    **LLAMA2_7B,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


def test_llama2_7b_fp16_weights_are_13_5_gb():
    shape = shape_from_config(LLAMA2_7B)
    assert count_parameters(shape) == 6_738_415_616  # the published count
    weights = weight_bytes(count_parameters(shape), "float16")
    assert weights == 13_476_831_232
    assert round(weights / 1e9, 1) == 13.5


def test_llama2_7b_kv_cache_for_4096_tokens_is_2_gib_exactly():
    shape = shape_from_config(LLAMA2_7B)
    assert kv_bytes_per_token(shape, "float16") == 2 * 32 * 32 * 128 * 2 == 524_288
    result = estimate(shape, num_params=count_parameters(shape), dtype="fp16", context=4096, batch=1)
    assert result.kv_cache_bytes == 2 * 2**30
    # Without grouped-query attention the textbook formula is the same number.
    assert naive_kv_bytes(shape, 4096, "float16") == 2 * 2**30


@pytest.mark.parametrize(
    ("billions", "gb"),
    [(7, (28, 14, 7, 3.5)), (13, (52, 26, 13, 6.5)), (70, (280, 140, 70, 35)), (175, (700, 350, 175, 87.5))],
)
def test_weights_table_by_size_and_precision(billions, gb):
    params = billions * 10**9
    got = tuple(weight_bytes(params, dtype) / 1e9 for dtype in ("fp32", "fp16", "int8", "int4"))
    assert got == gb


def test_grouped_query_attention_is_four_times_smaller_than_the_naive_formula():
    shape = shape_from_config(LLAMA3_8B)
    assert count_parameters(shape) == 8_030_261_248  # Llama-3-8B's published count
    per_token = kv_bytes_per_token(shape, "bfloat16")
    assert per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert naive_kv_bytes(shape, 8192, "bfloat16") == 4 * per_token * 8192


def test_parameter_counts_match_the_real_files(tiny_llama, bundled_minilm):
    from inferd.hub.bundled import bundled_model_path
    from inferd.hub.gguf import read_gguf_info

    gguf = read_gguf_info(bundled_model_path("smollm2-135m-instruct"))
    assert count_parameters(shape_from_config(gguf.config())) == gguf.num_params == 134_515_008
    minilm = inspect_model(bundled_minilm)
    assert count_parameters(shape_from_config(minilm.config)) == minilm.num_params == 22_713_216
    llama = inspect_model(tiny_llama)
    assert count_parameters(shape_from_config(llama.config)) == llama.num_params


def test_parameter_count_equals_torch(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert inspect_model(tiny_llama).num_params == sum(p.numel() for p in model.parameters())


def folder_with(tmp_path, config_text: str):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(config_text)
    return path


def test_cli_json_for_a_config_only_folder(tmp_path):
    path = folder_with(tmp_path, json.dumps(LLAMA2_7B))
    result = CliRunner().invoke(app, ["estimate", str(path), "--context", "4096", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["num_params"] == 6_738_415_616
    assert report["weight_bytes"] == 13_476_831_232  # stored dtype float16 is the default
    assert report["kv_cache_bytes"] == 2 * 2**30
    assert report["total_bytes"] == sum(
        report[k] for k in ("weight_bytes", "kv_cache_bytes", "activation_bytes", "runtime_bytes")
    )
    assert report["fits"] is (report["total_bytes"] <= report["free_bytes"])
    room = report["free_bytes"] - report["weight_bytes"] - report["activation_bytes"] - report["runtime_bytes"]
    assert report["max_batch_at_context"] == max(room, 0) // report["kv_bytes_per_token"] // 4096


def test_cli_table_shows_the_naive_formula_for_gqa(tmp_path):
    path = folder_with(tmp_path, json.dumps(LLAMA3_8B))
    result = CliRunner().invoke(
        app, ["estimate", str(path), "--dtype", "int4", "--kv-dtype", "fp16", "--context", "8192", "--batch", "2"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "KV cache for 8192 × 2" in result.output
    assert "2 × layers × hidden formula" in result.output
    assert "4.02 GB" in result.output  # 8,030,261,248 params at half a byte


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ('{"architectures": ["LlamaForCausalLM"]}', "has no 'hidden_size'"),
     ('{"hidden_size": "wide", "num_attention_heads": 2}', "malformed value")],
)  # fmt: skip
def test_cli_corrupt_config_is_a_clear_error(tmp_path, text, message):
    result = CliRunner().invoke(app, ["estimate", str(folder_with(tmp_path, text))])
    assert result.exit_code == 1
    assert message in result.output


def test_unknown_dtype_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["estimate", str(folder_with(tmp_path, json.dumps(LLAMA2_7B))), "--dtype", "fp12"])
    assert result.exit_code == 1
    assert "unknown dtype 'fp12'" in result.output
    with pytest.raises(ModelLoadError):
        weight_bytes(10, "q3")


def test_gguf_is_estimated_as_serve_holds_it_with_the_conversion_peak(tmp_path):
    """serve converts a GGUF once, tensor by tensor, into its served dtype: the weights it holds are
    in that dtype, not the file's size (a 4 GB Q4_K_M 7B is ~13.5 GB in bf16); the conversion holds
    one shard and the tensor at work, and leaves a copy in that dtype on disk."""
    from inferd.config.settings import cpu_has_native_bf16
    from inferd.hub.bundled import bundled_model_path
    from inferd.hub.gguf import SHARD_BYTES, conversion_folder

    runner = CliRunner()
    args = ["estimate", "smollm2-135m-instruct", "--json", "--cache-dir", str(tmp_path)]
    served = json.loads(runner.invoke(app, args).output)
    fp32 = json.loads(runner.invoke(app, [*args, "--dtype", "fp32"]).output)
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert served["weights_as"] == f"GGUF dequantised to {dtype}, as served"
    assert served["weight_bytes"] == 134_515_008 * (2 if dtype == "bfloat16" else 4)
    assert served["gguf_file_bytes"] == 98_362_432  # the file's size, reported beside
    assert served["conversion_dtype"] == dtype and served["conversion_tensor_by_tensor"]
    assert served["conversion_disk_bytes"] == served["weight_bytes"]
    assert fp32["weight_bytes"] == fp32["conversion_disk_bytes"] == 134_515_008 * 4
    assert fp32["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    # At most a 512 MiB shard and the embedding table at work: Q8_0 as stored (30,081,024 bytes), in
    # float32 and the rows being dequantised; transformers' whole-model path held twice the float32
    # model (1.08 GB).
    embedding = 49_152 * 576
    at_work = 30_081_024 + 4 * embedding + 4 * 2**20
    assert SHARD_BYTES < fp32["conversion_peak_bytes"] <= SHARD_BYTES + at_work < 2 * fp32["weight_bytes"]
    assert served["conversion_done"] is False
    gguf = bundled_model_path("smollm2-135m-instruct")
    done = conversion_folder(gguf, "float32", tmp_path)
    done.mkdir(parents=True)
    (done / "inferd-conversion-complete").write_text("")  # as a finished conversion leaves it
    assert json.loads(runner.invoke(app, [*args, "--dtype", "fp32"]).output)["conversion_done"] is True
