"""Short prefills attend row by row through the native paged kernel: the same logits as SDPA."""

import pytest
import torch

from inferd.config.engine import LLMConfig
from inferd.config.settings import cpu_has_native_bf16
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.runner import model_runner
from inferd.llm.runner.kernels import native_ops
from inferd.llm.runner.model_runner import ModelRunner, ScheduledChunk

pytestmark = pytest.mark.skipif(native_ops() is None, reason="the native kernels do not build here")


def all_logits(path, row_pairs: int, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, ModelRunner]:
    """Logits of every position over two steps: step 1 prefills a long prompt's first part and a
    short prompt; step 2 mixes the long prompt's continuation (over its cached context), a fresh
    short prompt, a longer fresh prompt and a decode."""
    monkeypatch.setattr(model_runner, "NATIVE_ROW_PAIRS", row_pairs)
    config = LLMConfig(dtype="float32", kv_cache_memory=2**20, block_size=4)
    runner = ModelRunner(load_causal_lm(path, config), config, num_blocks=64)
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(4)]
    long = [(7 * i) % 150 + 20 for i in range(30)]
    short = [5, 17, 33, 9, 60]
    fresh = [40, 41, 42, 43, 44, 45, 46]
    longer = [(3 * i) % 120 + 30 for i in range(50)]
    first = runner.execute(
        [ScheduledChunk(long[:18], 0, tables[0], 18), ScheduledChunk(short, 0, tables[1], 5)]
    )
    second = runner.execute(
        [
            ScheduledChunk(long[18:], 18, tables[0], 12),
            ScheduledChunk(fresh, 0, tables[2], 7),
            ScheduledChunk([9], len(short), tables[1], 1),
            ScheduledChunk(longer, 0, tables[3], 50),
        ]
    )
    return first, second, runner


def test_row_path_matches_sdpa(tiny_llama, monkeypatch):
    rows_first, rows_second, runner = all_logits(tiny_llama, 10**6, monkeypatch)
    batch = runner.prepare_inputs([ScheduledChunk([1, 2, 3], 4, list(range(4)), 1)])[3]
    assert batch.all_rows and not batch.prefills  # a short chunk over cached context: rows only
    sdpa_first, sdpa_second, runner = all_logits(tiny_llama, 0, monkeypatch)
    batch = runner.prepare_inputs([ScheduledChunk([1, 2, 3], 4, list(range(4)), 1)])[3]
    assert len(batch.prefills) == 1 and not batch.all_rows
    torch.testing.assert_close(rows_first, sdpa_first, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rows_second, sdpa_second, atol=2e-5, rtol=1e-4)


def test_rows_or_sdpa_by_size(tiny_llama, monkeypatch):
    """Decodes always take the kernel; prefills take it while their query-position pairs are few."""
    monkeypatch.setattr(model_runner, "NATIVE_ROW_PAIRS", 100)
    config = LLMConfig(dtype="float32", kv_cache_memory=2**20, block_size=4)
    runner = ModelRunner(load_causal_lm(tiny_llama, config), config, num_blocks=64)
    chunks = [
        ScheduledChunk([1] * 10, 0, list(range(4)), 1),  # 10 * 5.5 = 55 pairs: rows
        ScheduledChunk([1] * 20, 0, list(range(4, 10)), 1),  # 210 pairs: SDPA
        ScheduledChunk([1], 200, list(range(10, 61)), 1),  # a decode over 201 positions: rows
    ]
    batch = runner.prepare_inputs(chunks)[3]
    assert [(s.start, s.num_new) for s in batch.prefills] == [(10, 20)]
    assert batch.row_idx.tolist() == [*range(10), 30]
    assert batch.row_ctx_lens.tolist() == [*range(1, 11), 201]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_random_bf16_batches_agree_between_rows_and_sdpa(model_root, tiny_llama):
    """Mixed steps (decodes, short and long prefill chunks over cached contexts, runs of every
    length from 2 to 40 rows) on a bf16 model with head_dim 32, the AVX512-BF16 kernel's shape:
    the rows path (the one-call step where the CPU has a native bf16 linear) and SDPA give the same
    logits."""
    import random
    import shutil

    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(5)
    config = AutoConfig.for_model(
        "llama", vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    path = model_root / "tiny-llama-hd32"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, path / name)
    llm = LLMConfig(dtype="bfloat16", kv_cache_memory=2**22, block_size=16)
    runner = ModelRunner(load_causal_lm(path, llm), llm, num_blocks=512)
    rng = random.Random(0)
    for _ in range(12):
        chunks, fills, next_block = [], [], 0
        for _ in range(rng.randint(1, 12)):
            cached = rng.choice([0, rng.randint(1, 120)])
            new = rng.choice([1, 1, rng.randint(2, 9), rng.randint(10, 40)])
            blocks = (cached + new) // 16 + 1
            table = list(range(next_block, next_block + blocks))
            next_block += blocks
            ids = [rng.randint(3, 199) for _ in range(cached + new)]
            if cached:
                fills.append(ScheduledChunk(ids[:cached], 0, table, 1))
            chunks.append(ScheduledChunk(ids[cached:], cached, table, new))
        runner.row_pairs = 0
        for fill in fills:
            runner.execute([fill])
        sdpa = runner.execute(chunks)
        runner.row_pairs = 10**6
        rows = runner.execute(chunks)
        assert torch.isfinite(rows).all()
        assert F.cosine_similarity(rows, sdpa, dim=-1).min() > 0.999
