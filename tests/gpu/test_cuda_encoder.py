"""Opt-in (pytest -m gpu): the encoder on CUDA agrees with the CPU reference."""

import numpy as np
import pytest
import torch

from inferd.encoder.params import EmbedParams, RerankParams
from tests.unit.encoder_helpers import started

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = ["the cat", "dogs bark at the moon and the sun in paris", "a", "rain on the river " * 8]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
async def test_cuda_embeddings_match_cpu(bundled_minilm, dtype):
    with started(bundled_minilm) as cpu:
        reference = (await cpu.embed(TEXTS, EmbedParams())).embeddings
    with started(bundled_minilm, device="cuda", dtype=dtype) as gpu:
        ours = (await gpu.embed(TEXTS, EmbedParams())).embeddings
    assert (ours * reference).sum(1).min() >= (0.9999 if dtype == "float32" else 0.999)


async def test_cuda_cross_encoder_matches_cpu(tiny_cross_encoder):
    with started(tiny_cross_encoder) as cpu:
        reference = (await cpu.rerank("the cat", TEXTS, RerankParams())).scores
    with started(tiny_cross_encoder, device="cuda") as gpu:
        ours = (await gpu.rerank("the cat", TEXTS, RerankParams())).scores
    np.testing.assert_allclose(ours, reference, atol=1e-4)
