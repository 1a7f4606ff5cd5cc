"""Our engine against sentence-transformers, the reference implementation."""

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer

from inferd.encoder.params import EmbedParams, RerankParams
from tests.models import build_embedder
from tests.unit.encoder_helpers import started

TEXTS = [
    "the cat",
    "dogs bark at the moon and the sun in paris",
    "a",
    "rain on the river by the sea, with cats and dogs and the city of paris in france " * 2,
    "query passage document",
]


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


async def test_embeddings_match_sentence_transformers(tiny_embedder):
    reference = SentenceTransformer(str(tiny_embedder), device="cpu").encode(TEXTS)
    with started(tiny_embedder, max_batch_requests=2) as client:
        out = await client.embed(TEXTS, EmbedParams())
    assert out.embeddings.shape == reference.shape == (5, 16)
    assert cosines(out.embeddings, reference).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "max", "lasttoken"])
async def test_other_poolings_match(model_root, pooling):
    path = build_embedder(model_root / pooling, dense=False, pooling=pooling)
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    with started(path) as client:
        out = await client.embed(TEXTS, EmbedParams())
    assert cosines(out.embeddings, reference).min() >= 0.9999


async def test_prompts_match_sentence_transformers(tiny_embedder):
    reference = SentenceTransformer(str(tiny_embedder), device="cpu").encode(TEXTS, prompt_name="query")
    with started(tiny_embedder) as client:
        by_name = await client.embed(TEXTS, EmbedParams(prompt_name="query"))
        literal = await client.embed(TEXTS, EmbedParams(prompt="query: "))
    assert cosines(by_name.embeddings, reference).min() >= 0.9999
    np.testing.assert_allclose(by_name.embeddings, literal.embeddings)


async def test_cross_encoder_scores_match_within_1e_4(tiny_cross_encoder):
    query = "what is the capital of france"
    reference = CrossEncoder(str(tiny_cross_encoder), device="cpu").predict([(query, t) for t in TEXTS])
    with started(tiny_cross_encoder, max_batch_requests=3) as client:
        out = await client.rerank(query, TEXTS, RerankParams())
        raw = await client.rerank(query, TEXTS, RerankParams(raw_scores=True))
    np.testing.assert_allclose(out.scores, reference, atol=1e-4)
    np.testing.assert_allclose(1 / (1 + np.exp(-raw.scores)), reference, atol=1e-4)


async def test_plain_hugging_face_encoder_uses_mean_pooling(tiny_embedder):
    import torch
    from transformers import AutoModel, AutoTokenizer

    plain = tiny_embedder.parent / "bert"  # a BertModel folder with no sentence-transformers files
    tokenizer = AutoTokenizer.from_pretrained(str(plain))
    model = AutoModel.from_pretrained(str(plain)).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    reference = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    with started(plain) as client:
        assert client.info.normalizes is False and client.info.dimensions == 32
        out = await client.embed(TEXTS, EmbedParams())
    np.testing.assert_allclose(out.embeddings, reference, rtol=1e-4, atol=1e-5)
