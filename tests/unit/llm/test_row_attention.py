"""Short prefills attend row by row through the native paged kernel: the same logits as SDPA."""

import pytest
import torch

from inferd.config.engine import LLMConfig
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
