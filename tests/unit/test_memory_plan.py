"""The one memory planner: pure function from needs and budgets to a plan that fits or says why not."""

import pytest

from inferd.config import load_settings
from inferd.memory.plan import (
    CPU_DEFAULT_KV_CACHE_BYTES,
    KVPolicy,
    ModelNeed,
    describe,
    plan_device,
    plan_memory,
)
from inferd.memory.server import MemoryPlanError, check_plans, plan_server

MiB, GiB = 2**20, 2**30
# 46,080 bytes a token: SmolLM2-135M's KV cache in fp32.
LLM = ModelNeed("chat", "cpu", "float32", 500 * MiB, 70 * MiB, 128 * MiB, 46_080, 8192)
EMBEDDER = ModelNeed("embed", "cpu", "float32", 90 * MiB, 400 * MiB, 128 * MiB)


def test_encoders_get_what_they_need_and_the_llm_a_share_of_the_rest():
    plan = plan_device([LLM, EMBEDDER], 2 * GiB, KVPolicy(kv_cache_fraction=0.5), "cpu")
    rest = 2 * GiB - LLM.fixed_bytes - EMBEDDER.fixed_bytes
    assert rest // 2 < CPU_DEFAULT_KV_CACHE_BYTES  # the share, not the CPU cap, decides here
    assert plan.fits and plan.problems == ()
    assert plan.kv_cache_bytes == rest // 2
    assert plan.kv_tokens(LLM) == rest // 2 // 46_080
    assert plan.total_bytes == LLM.fixed_bytes + EMBEDDER.fixed_bytes + rest // 2


def test_cpu_cache_is_capped_and_never_larger_than_every_sequence_can_use():
    roomy = plan_device([LLM], 64 * GiB, KVPolicy(), "cpu")
    assert roomy.kv_cache_bytes == CPU_DEFAULT_KV_CACHE_BYTES
    # A context longer than the cap holds still gets one full-length sequence by default.
    long_context = ModelNeed("chat", "cpu", "float32", 500 * MiB, 70 * MiB, 128 * MiB, 46_080, 32_768)
    assert plan_device([long_context], 64 * GiB, KVPolicy(), "cpu").kv_cache_bytes == 32_768 * 46_080
    gpu = plan_device([LLM], 64 * GiB, KVPolicy(max_num_seqs=2), "cuda")
    assert gpu.kv_cache_bytes == 2 * 8192 * 46_080  # two full-length sequences


def test_user_split_is_honoured_exactly():
    plan = plan_device([LLM, EMBEDDER], 4 * GiB, KVPolicy(kv_cache_memory=1 * GiB), "cpu")
    assert plan.fits and plan.kv_cache_bytes == 1 * GiB


def test_weights_that_do_not_fit_name_the_numbers_and_the_flags():
    plan = plan_device([LLM, EMBEDDER], 1000 * MiB, KVPolicy(), "cpu")
    assert not plan.fits
    (message,) = plan.problems
    assert "the models need 1.29 GiB on cpu before any KV cache but the budget is 1000.0 MiB" in message
    assert "--dtype bfloat16: 786.0 MiB (fits)" in message
    assert "without chat: 618.0 MiB (fits)" in message
    assert "without embed: 698.0 MiB (fits)" in message
    assert f"--memory-budget (at least {LLM.fixed_bytes + EMBEDDER.fixed_bytes} bytes)" in message


def test_a_cache_smaller_than_one_sequence_names_the_context_that_fits():
    budget = LLM.fixed_bytes + 200 * MiB
    plan = plan_device([LLM], budget, KVPolicy(kv_cache_fraction=0.5), "cpu")
    tokens = 100 * MiB // 46_080
    assert plan.kv_tokens(LLM) == tokens
    (message,) = plan.problems
    assert "less than one sequence of --max-model-len 8192 (360.0 MiB)" in message
    assert f"--max-model-len {tokens // 16 * 16}" in message
    assert "--dtype bfloat16" in message and "--max-num-seqs" in message
    # All of the rest would hold a full sequence: say which explicit size does.
    roomier = plan_device([LLM], LLM.fixed_bytes + 500 * MiB, KVPolicy(), "cpu")
    assert f"--kv-cache-memory {8192 * 46_080}" in roomier.problems[0]


def test_an_explicit_cache_larger_than_the_rest_is_refused():
    plan = plan_device([LLM], LLM.fixed_bytes + 1 * GiB, KVPolicy(kv_cache_memory=2 * GiB), "cpu")
    (message,) = plan.problems
    assert f"--kv-cache-memory {2 * GiB} (2.00 GiB) does not fit" in message
    assert f"use --kv-cache-memory {1 * GiB} or less" in message


def test_devices_are_planned_separately():
    gpu_llm = ModelNeed("chat", "cuda", "bfloat16", 10 * GiB, 1 * GiB, 512 * MiB, 131_072, 8192)
    plans = plan_memory([gpu_llm, EMBEDDER], {"cuda": 16 * GiB, "cpu": 1 * GiB}, KVPolicy())
    assert [p.device for p in plans] == ["cuda", "cpu"]
    assert all(p.fits for p in plans)
    assert plans[0].kv_cache_bytes == (16 * GiB - gpu_llm.fixed_bytes) // 2
    assert "memory plan on cuda: budget 16.00 GiB" in describe(plans)


def test_server_plan_reads_every_model_and_counts_shared_weights_once(tiny_llama, tiny_embedder):
    settings = load_settings(
        {"model": [str(tiny_llama), f"{tiny_embedder}=e", f"{tiny_embedder}=r,kind=rerank"],
         "device": "cpu", "dtype": "float32"}
    )
    (plan,) = plan_server(settings, {"cpu": 4 * GiB})
    assert [n.name for n in plan.needs] == [str(tiny_llama), "e, r"]
    llm = plan.needs[0]
    assert llm.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # 2 layers, 2 KV heads of 16 dims, fp32
    assert llm.max_model_len == 256
    assert plan.kv_cache_bytes == 256 * 32 * llm.kv_bytes_per_token  # every sequence at full length
    check_plans((plan,))


def test_server_plan_refusal_is_a_typed_error(tiny_llama):
    settings = load_settings({"model": [str(tiny_llama)], "device": "cpu", "dtype": "float32"})
    plans = plan_server(settings, {"cpu": 10 * MiB})
    with pytest.raises(MemoryPlanError, match="do not fit") as caught:
        check_plans(plans)
    assert "memory plan on cpu: budget 10.0 MiB" in caught.value.message


def test_int8_weights_are_planned_at_a_byte_a_parameter_but_the_embeddings(tiny_llama):
    settings = {"model": [str(tiny_llama)], "device": "cpu", "dtype": "bfloat16"}
    (bf16,) = plan_server(load_settings(settings), {"cpu": 4 * GiB})
    (int8,) = plan_server(load_settings(settings | {"quantization": "int8"}), {"cpu": 4 * GiB})
    embedding = 200 * 64  # vocab × hidden of the tiny llama; its head is untied
    params = bf16.needs[0].weight_bytes // 2
    assert int8.needs[0].weight_bytes == params - embedding + 2 * embedding
