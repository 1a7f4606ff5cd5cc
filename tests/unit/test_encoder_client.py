"""Engine behaviour: validation before queueing, truncation, isolation, cancellation, backpressure."""

import asyncio

import numpy as np
import pytest

from inferd.encoder.params import EmbedParams, RerankParams
from inferd.errors import InputTooLongError, InvalidRequestError, OverloadedError
from tests.unit.encoder_helpers import started

LONG = "the cat and the dog " * 40  # > 64 tokens, the tiny model's limit


async def test_too_long_is_refused_unless_truncation_is_asked(tiny_embedder):
    with started(tiny_embedder) as client:
        with pytest.raises(InputTooLongError) as info:
            await client.embed(["short", LONG], EmbedParams())
        assert info.value.limit == 64 and info.value.length > 64
        assert "input[1]" in info.value.message
        right = await client.embed([LONG], EmbedParams(truncate=True))
        left = await client.embed([LONG + " moon"], EmbedParams(truncate=True, truncation_side="left"))
        assert right.num_prompt_tokens == 64 == left.num_prompt_tokens
        assert not np.allclose(right.embeddings, left.embeddings)


async def test_dimensions_truncate_then_renormalise(tiny_embedder):
    with started(tiny_embedder) as client:
        full = await client.embed(["the moon"], EmbedParams(normalize=False))
        short = await client.embed(["the moon"], EmbedParams(dimensions=4))
        with pytest.raises(InvalidRequestError, match="larger than this model's 16"):
            await client.embed(["x"], EmbedParams(dimensions=17))
    expected = full.embeddings[:, :4] / np.linalg.norm(full.embeddings[:, :4])
    np.testing.assert_allclose(short.embeddings, expected, rtol=1e-5)


async def test_token_ids_are_the_whole_input(tiny_embedder):
    with started(tiny_embedder) as client:
        ids = client._tokenizer.encode_texts(["the cat"], truncate=False, side="right")[0].input_ids
        by_ids = await client.embed([ids], EmbedParams())
        by_text = await client.embed(["the cat"], EmbedParams())
        np.testing.assert_allclose(by_ids.embeddings, by_text.embeddings, rtol=1e-5)
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await client.embed([[1, 10**6]], EmbedParams())


@pytest.mark.parametrize(
    ("inputs", "message"),
    [([], "must not be empty"), (["ok", ""], r"input\[1\] is an empty string"), (["x"] * 9, "limit of 8")],
)
async def test_bad_inputs_fail_before_queueing(tiny_embedder, inputs, message):
    with started(tiny_embedder, max_client_batch_size=8) as client:
        with pytest.raises(InvalidRequestError, match=message):
            await client.embed(inputs, EmbedParams())
        assert client.num_queued == 0


async def test_a_bad_request_does_not_disturb_its_neighbours(tiny_embedder):
    with started(tiny_embedder) as client:
        good = [client.embed([f"the cat {i}"], EmbedParams()) for i in range(6)]
        bad = [client.embed([LONG], EmbedParams()), client.embed([""], EmbedParams())]
        results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(r.embeddings.shape == (1, 16) for r in results[:6])
    assert all(isinstance(r, InvalidRequestError) for r in results[6:])


async def test_full_queue_answers_at_once(tiny_embedder):
    with started(tiny_embedder, max_queued_items=4, max_batch_requests=1) as client:
        results = await asyncio.gather(
            *[client.embed(["the moon"] * 3, EmbedParams()) for _ in range(4)], return_exceptions=True
        )
    assert any(isinstance(r, OverloadedError) for r in results)
    assert any(not isinstance(r, Exception) for r in results)


async def test_cancelled_requests_never_reach_the_model(tiny_embedder):
    with started(tiny_embedder, max_batch_requests=1) as client:
        seen = []
        forward = client._engine.model.forward
        client._engine.model.forward = lambda batch: (seen.extend(batch.items), forward(batch))[1]
        blocker = asyncio.ensure_future(client.embed(["the sun"] * 20, EmbedParams()))
        victim = asyncio.ensure_future(client.embed(["the cancelled one"] * 20, EmbedParams()))
        await asyncio.sleep(0)
        victim.cancel()
        await blocker
        await asyncio.sleep(0.05)
    assert victim.cancelled()
    assert seen and all(item.request is not victim for item in seen)
    assert len(seen) <= 21  # the blocker's 20, and at most one victim item already prefetched


async def test_cosine_rerank_of_an_embedder(tiny_embedder):
    with started(tiny_embedder) as client:
        out = await client.rerank("the cat", ["the cat", "dogs bark at the moon"], RerankParams())
        vectors = (
            await client.embed(["the cat", "the cat", "dogs bark at the moon"], EmbedParams())
        ).embeddings
    np.testing.assert_allclose(out.scores, vectors[1:] @ vectors[0], rtol=1e-5)
    assert out.scores[0] == pytest.approx(1.0, abs=1e-5)


async def test_max_tokens_per_doc_cuts_documents(tiny_cross_encoder):
    with started(tiny_cross_encoder) as client:
        cut = await client.rerank("the cat", [LONG], RerankParams(max_tokens_per_doc=5))
        short = await client.rerank("the cat", ["the cat and the dog"], RerankParams())
        with pytest.raises(InputTooLongError):
            await client.rerank("the cat", [LONG], RerankParams())
    np.testing.assert_allclose(cut.scores, short.scores, rtol=1e-5)


def test_tokenizer_is_safe_to_share_between_threads(tiny_embedder):
    from concurrent.futures import ThreadPoolExecutor

    from inferd.encoder.tokenize import InputTokenizer

    tokenizer = InputTokenizer(tiny_embedder, 64)
    texts = [LONG, "the cat", LONG + " moon"] * 20

    def work(i: int) -> int:
        truncate = i % 2 == 0
        encoded = tokenizer.encode_texts(
            texts if truncate else texts[1:2], truncate=truncate, side="left" if i % 4 else "right"
        )
        tokenizer.truncate_texts([LONG], 7)
        return max(len(e.input_ids) for e in encoded)

    with ThreadPoolExecutor(4) as pool:
        lengths = list(pool.map(work, range(200)))
    assert set(lengths) <= {64, 4}


async def test_a_prompt_times_many_inputs_is_refused_before_it_is_built(tiny_embedder, monkeypatch):
    with started(tiny_embedder, max_request_chars=1000) as client:

        def never(*args, **kwargs):
            raise AssertionError("tokenised a request over the character budget")

        monkeypatch.setattr(client._tokenizer, "encode_texts", never)
        with pytest.raises(InvalidRequestError, match=r"characters to tokenise.*limit of 1000") as info:
            await client.embed(["cat"] * 8, EmbedParams(prompt="p" * 200))  # 8 × 203 characters
        assert info.value.param == "input"
        with pytest.raises(InvalidRequestError, match="limit of 1000"):
            await client.rerank("q" * 200, ["dog"] * 8, RerankParams())  # the query read 8 times
        assert client.num_queued == 0


async def test_an_admission_check_sees_the_token_count_before_queueing(tiny_embedder):
    seen = []

    def admit(num_tokens: int) -> None:
        seen.append(num_tokens)
        raise OverloadedError("no budget")

    with started(tiny_embedder) as client:
        with pytest.raises(OverloadedError):
            await client.embed(["the cat", "the dog"], EmbedParams(), admit=admit)
        assert client.num_queued == 0
        out = await client.embed(["the cat", "the dog"], EmbedParams())
    assert seen == [out.num_prompt_tokens]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pairs_equal_the_tokenizers_own_pairs_with_the_query_tokenised_once(tiny_cross_encoder, side):
    from transformers import AutoTokenizer

    from inferd.encoder.tokenize import InputTokenizer

    tokenizer = InputTokenizer(tiny_cross_encoder, 64)
    reference = AutoTokenizer.from_pretrained(str(tiny_cross_encoder), truncation_side=side)
    query = "the cat sat on the mat"
    docs = ["the dog", LONG, "cats purr in the sun", "a"]
    backend = tokenizer._tokenizer.backend_tokenizer
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode(self, text, *args, **kwargs):
            calls.append(text)
            return backend.encode(text, *args, **kwargs)

        def encode_batch(self, texts, *args, **kwargs):
            calls.extend(texts)
            return backend.encode_batch(texts, *args, **kwargs)

    tokenizer._tokenizer = _WithBackend(tokenizer._tokenizer, Counting())
    pairs = tokenizer.encode_pairs(query, docs, truncate=True, side=side)
    expected = reference([query] * len(docs), docs, truncation=True, max_length=64)
    assert [p.input_ids for p in pairs] == expected["input_ids"]
    assert [p.token_type_ids for p in pairs] == expected["token_type_ids"]
    assert sorted(calls) == sorted([query, *docs])  # the query once, not once per document
    with pytest.raises(InputTooLongError, match=r"documents\[1\]"):
        tokenizer.encode_pairs(query, docs, truncate=False, side=side)


class _WithBackend:
    """A transformers tokenizer whose backend_tokenizer is replaced (to watch its calls)."""

    def __init__(self, tokenizer, backend) -> None:
        self._tokenizer = tokenizer
        self.backend_tokenizer = backend

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)
