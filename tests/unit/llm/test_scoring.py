"""Prefill-only scoring (SamplingParams.score_token_ids) and the LLM reranker built on it, against
transformers' forward on the same prompt ids (fp32), on a tiny random Qwen3 reranker."""

import asyncio
import json

import numpy as np
import pytest
import torch

from inferd.api.llm_rerank import LLMRerankClient, start_llm_reranker
from inferd.config.engine import LLMConfig
from inferd.encoder.params import RerankParams
from inferd.errors import InputTooLongError, InvalidRequestError, ModelLoadError, OverloadedError
from inferd.hub.resolve import llm_reranker_hint
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams
from tests.conftest import wait_for

# Qwen2/Qwen3's pre-tokenizer split: a newline run is its own piece, so a prompt tokenised in parts
# that meet at a newline gives the ids of the whole.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3-Reranker's prompt, written out here independently of the module under test.
SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

QUERY = "what is the capital of france?"
DOCS = [
    "Paris is the capital of France.",
    "Cats purr.",
    "The river Seine runs through Paris, the capital city and largest city of France, " * 3,
    "no",
    "Berlin is the capital of Germany; yes, it is.",
]
LONG_DOC = " ".join(f"word{i} and the moon" for i in range(35))  # ~700 tokens: prefilled in chunks


def build_llm_reranker(root, name: str = "tiny-qwen3-reranker", *, answer_merges: bool = True):
    """A tiny random Qwen3ForCausalLM with a byte-level BPE tokenizer split as Qwen's is, in which
    "yes" and "no" are one token each (through merges, as in Qwen's vocabulary) unless
    ``answer_merges`` is False."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("y", "e"), ("ye", "s"), ("n", "o")] if answer_merges else []
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(5)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        initializer_range=0.2,  # scores spread well apart, so the reference order is clear
    )
    out = root / name
    Qwen3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reranker_path(model_root):
    return build_llm_reranker(model_root)


@pytest.fixture(scope="module")
def hf_model(reranker_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(reranker_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def answer_ids(reranker_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reranker_path))
    return tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")


def reference(model, prompts, token_ids):
    """log_softmax at each prompt's last position, from transformers' own forward."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            out.append(torch.log_softmax(logits, dim=-1)[list(token_ids)].tolist())
    return np.array(out)


def config(**overrides):
    base = dict(kv_cache_memory=4 * 2**20, block_size=8, max_num_batched_tokens=2048)
    return LLMConfig(**(base | overrides))


async def start(path, **overrides) -> LLMRerankClient:
    return await asyncio.to_thread(start_llm_reranker, path, config(**overrides), asyncio.get_running_loop())


def prompts_of(client: LLMRerankClient, query, docs, **params):
    return client.prepare_prompts(query, docs, RerankParams(**params))


async def test_prompt_is_qwen3_rerankers_format(reranker_path):
    """Tokenised in parts (the query part once), each prompt's ids are those of its whole text."""
    client = await start(reranker_path)
    try:
        tokenizer = client.llm.tokenizer
        for doc, prompt in zip(DOCS, prompts_of(client, QUERY, DOCS), strict=True):
            text = f"{SYSTEM}<Instruct>: {INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {doc}{SUFFIX}"
            assert prompt == tokenizer.encode(text, add_special_tokens=False)
        custom = LLMRerankClient(client.llm, instruction="Find the answer")
        prompt = custom.prepare_prompts("q", ["d"], RerankParams())[0]
        assert (
            tokenizer.decode(prompt)
            == f"{SYSTEM}<Instruct>: Find the answer\n<Query>: q\n<Document>: d{SUFFIX}"
        )
    finally:
        client.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["one-step", "chunked-prefill"])
async def test_scores_equal_transformers(reranker_path, hf_model, answer_ids, chunked):
    # 64 tokens a step: every prompt (~250-900 tokens) is prefilled over several steps.
    client = await start(reranker_path, max_num_batched_tokens=64 if chunked else 2048)
    try:
        engine = client.llm.engine
        prompts = prompts_of(client, QUERY, [*DOCS, LONG_DOC])
        assert len(prompts[-1]) > 700 and len({len(p) for p in prompts}) == len(prompts)
        got = np.array(await client.llm.score(prompts, answer_ids))
        np.testing.assert_allclose(got, reference(hf_model, prompts, answer_ids), atol=1e-4)
        # The query part was computed for the first document and reused by the others: all its
        # full 8-token blocks.
        shared = next(i for i, (a, b) in enumerate(zip(*prompts[:2])) if a != b)
        assert shared > 250
        assert engine.kv_cache.num_prefix_hits >= (len(prompts) - 1) * (shared // 8 * 8)
        # Again, with the same query and other documents: the query's blocks come from the cache.
        hits = engine.kv_cache.num_prefix_hits
        again = prompts_of(client, QUERY, ["Lyon is in France.", "The moon."])
        got = np.array(await client.llm.score(again, answer_ids))
        np.testing.assert_allclose(got, reference(hf_model, again, answer_ids), atol=1e-4)
        assert engine.kv_cache.num_prefix_hits - hits >= 2 * (shared // 8 * 8)
        assert engine.scheduler.num_finished["stop"] == len(prompts) + 2  # nothing generated, all ended
        assert not engine.has_work
    finally:
        client.close()


async def test_scoring_while_generating(reranker_path, hf_model, answer_ids):
    client = await start(reranker_path, max_num_batched_tokens=96)
    try:
        llm = client.llm
        prompt = prompts_of(client, QUERY, DOCS[:1])[0]
        expected = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()

        async def generate():
            tokens, reasons = [], []
            params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
            async for output in llm.generate(prompt, params):
                tokens.extend(output.new_token_ids)
                reasons.append(output.finish_reason)
            return tokens, reasons[-1]

        generation = asyncio.create_task(generate())
        await asyncio.sleep(0)  # the generation is in the engine first; the scoring joins its steps
        prompts = prompts_of(client, "the moon", [*DOCS, LONG_DOC])
        got = np.array(await llm.score(prompts, answer_ids))
        tokens, reason = await generation
        np.testing.assert_allclose(got, reference(hf_model, prompts, answer_ids), atol=1e-4)
        assert tokens == expected and reason == "length"
    finally:
        client.close()


async def test_scoring_after_a_failed_step(reranker_path, hf_model, answer_ids, monkeypatch):
    """A step that fails is run again request by request: the scoring requests in it still score."""
    client = await start(reranker_path)
    try:
        llm, failures = client.llm, []
        execute = llm.engine.runner.execute

        def failing(chunks):  # any step where the generation shares the batch fails once
            table = llm.engine.kv_cache.block_table("gen") if "gen" in llm.engine._live else None
            if len(chunks) > 1 and any(chunk.block_table is table for chunk in chunks):
                failures.append(len(chunks))
                raise RuntimeError("boom")
            return execute(chunks)

        monkeypatch.setattr(llm.engine.runner, "execute", failing)
        prompt = prompts_of(client, QUERY, DOCS[:1])[0]
        stream = llm.submit(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), "gen")
        prompts = prompts_of(client, "the sun", DOCS)
        got = np.array(await llm.score(prompts, answer_ids))
        tokens = [t async for output in stream for t in output.new_token_ids]
        assert failures
        np.testing.assert_allclose(got, reference(hf_model, prompts, answer_ids), atol=1e-4)
        expected = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert tokens == expected[0, len(prompt) :].tolist()
    finally:
        client.close()


async def test_scoring_survives_preemption(reranker_path, hf_model, answer_ids):
    # 2 layers × K,V × 2 heads × 16 dims × fp32 = 512 bytes a token: 1100 tokens of cache. A
    # generation grows to ~600 tokens while the long prompt (~1000) is prefilled 64 tokens a step
    # beside it, so the scoring request, the newest, is preempted and recomputed until it fits.
    client = await start(
        reranker_path, kv_cache_memory=1100 * 512, max_num_batched_tokens=64, enable_prefix_caching=False
    )
    try:
        llm = client.llm
        prompts = prompts_of(client, QUERY, [LONG_DOC, *DOCS[:2]])
        assert len(prompts[0]) + len(prompts[1]) + 300 > llm.max_model_len >= len(prompts[0])
        params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        stream = llm.submit(prompts[1], params)
        got = np.array(await llm.score(prompts, answer_ids))
        tokens = [t async for output in stream for t in output.new_token_ids]
        assert llm.engine.scheduler.num_preemptions > 0
        np.testing.assert_allclose(got, reference(hf_model, prompts, answer_ids), atol=1e-4)
        assert len(tokens) == 300
    finally:
        client.close()


async def test_rerank_client_scores_and_errors(reranker_path, hf_model, answer_ids):
    client = await start(reranker_path)
    try:
        assert client.info.scoring == "llm" and client.info.max_input_tokens == 2048
        assert client.answer_ids == answer_ids and not client.can_embed and client.is_running
        prompts = prompts_of(client, QUERY, DOCS)
        expected = reference(hf_model, prompts, answer_ids)
        margin = expected[:, 0] - expected[:, 1]
        output = await client.rerank(QUERY, DOCS, RerankParams())
        np.testing.assert_allclose(output.scores, 1 / (1 + np.exp(-margin)), atol=1e-5)
        assert output.num_prompt_tokens == sum(map(len, prompts))
        raw = await client.rerank(QUERY, DOCS, RerankParams(raw_scores=True))
        np.testing.assert_allclose(raw.scores, margin, atol=1e-4)
        assert np.ptp(raw.scores) > 0.1  # distinct scores: the order is the reference's
        admitted = []
        await client.rerank(QUERY, DOCS[:2], RerankParams(), admit=admitted.append)
        assert admitted == [sum(map(len, prompts[:2]))]

        with pytest.raises(InvalidRequestError, match="query must be") as caught:
            await client.rerank("", DOCS, RerankParams())
        assert caught.value.param == "query"
        with pytest.raises(InvalidRequestError, match=r"texts\[1\] is an empty") as caught:
            await client.rerank(QUERY, ["a", ""], RerankParams(), param="texts")
        assert caught.value.param == "texts"
        with pytest.raises(InvalidRequestError, match="more than the limit of 288"):
            await client.rerank(QUERY, ["doc"] * 289, RerankParams())  # 32 running + 256 queued
    finally:
        client.close()


async def test_too_long_documents_are_refused_or_cut(reranker_path, hf_model, answer_ids):
    client = await start(reranker_path, max_model_len=400)
    try:
        limit = client.info.max_input_tokens
        assert limit == 400
        with pytest.raises(InputTooLongError, match=r"documents\[1\] has \d+ tokens") as caught:
            await client.rerank(QUERY, ["short", LONG_DOC], RerankParams())
        assert caught.value.param == "documents" and caught.value.limit == 400
        with pytest.raises(InputTooLongError, match="leaves no room") as caught:
            await client.rerank(LONG_DOC, ["short"], RerankParams(truncate=True))
        assert caught.value.param == "query"

        right, left = (
            prompts_of(client, QUERY, [LONG_DOC], truncate=True, truncation_side=side)[0]
            for side in ("right", "left")
        )
        assert len(right) == len(left) == limit
        tokenizer = client.llm.tokenizer
        assert "<Document>: word0 and" in tokenizer.decode(right)
        assert "<Document>:" in tokenizer.decode(left) and "word0 " not in tokenizer.decode(left)
        assert tokenizer.decode(left).endswith(f"word34 and the moon{SUFFIX}")
        cut = prompts_of(client, QUERY, [LONG_DOC], max_tokens_per_doc=10)[0]  # byte-level: " word0 and"
        assert tokenizer.decode(cut).endswith(f"<Document>: word0 and{SUFFIX}")

        output = await client.rerank(QUERY, [DOCS[0], LONG_DOC], RerankParams(truncate=True, raw_scores=True))
        expected = reference(hf_model, [prompts_of(client, QUERY, DOCS[:1])[0], right], answer_ids)
        np.testing.assert_allclose(output.scores, expected[:, 0] - expected[:, 1], atol=1e-4)
    finally:
        client.close()


async def test_engine_refuses_what_it_cannot_score(reranker_path, answer_ids):
    client = await start(reranker_path, max_model_len=300, max_num_seqs=2, max_queued_requests=2)
    llm = client.llm
    try:
        # A scoring prompt may fill the whole context (nothing follows it); one more token may not.
        full = [5] * 300
        assert len(await llm.score([full], answer_ids)) == 1
        with pytest.raises(InputTooLongError, match="maximum context length of 300"):
            await llm.score([[5] * 301], answer_ids)
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await llm.score([[5, 6]], (answer_ids[0], 10**6))
        with pytest.raises(InvalidRequestError, match="must not be empty"):
            await llm.score([[5, 6]], ())
        with pytest.raises(InvalidRequestError, match="more than this server holds at once"):
            await llm.score([[5, 6]] * 5, answer_ids)
        held = [llm.submit([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)) for _ in range(3)]
        with pytest.raises(OverloadedError):  # 3 in flight + 2 more > 2 running + 2 queued
            await llm.score([[5, 6]] * 2, answer_ids)
        for stream in held:
            stream.close()
    finally:
        client.close()


async def test_cancelling_a_rerank_aborts_every_document(reranker_path):
    client = await start(reranker_path, max_num_batched_tokens=32)
    engine = client.llm.engine
    try:
        task = asyncio.create_task(
            client.rerank(QUERY, [LONG_DOC + str(i) for i in range(6)], RerankParams())
        )
        await asyncio.to_thread(wait_for, lambda: engine.scheduler.running, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_for, lambda: not engine.has_work, 10)
        assert engine.scheduler.num_finished["abort"] == 6 and not client.llm._collectors
        assert engine.kv_cache.usage == 0.0
    finally:
        client.close()


async def test_a_model_without_single_answer_tokens_is_refused(model_root, monkeypatch):
    path = build_llm_reranker(model_root, "tiny-no-answer-tokens", answer_merges=False)
    closed = []
    close = LLMClient.close
    monkeypatch.setattr(LLMClient, "close", lambda self: (closed.append(self), close(self))[1])
    with pytest.raises(ModelLoadError, match="does not spell 'yes' as one token"):
        await start(path)
    assert len(closed) == 1 and not closed[0].is_running  # the engine it started is stopped


def write_model(folder, architectures, modules=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": architectures}))
    if modules is not None:
        (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_llm_reranker_hint(tmp_path):
    causal, classifier = ["Qwen3ForCausalLM"], ["Qwen3ForSequenceClassification"]
    assert llm_reranker_hint(write_model(tmp_path / "Qwen3-Reranker-0.6B", causal))
    assert not llm_reranker_hint(write_model(tmp_path / "Qwen3-0.6B", causal))
    # A sequence classifier named reranker is a cross-encoder, not an LLM reranker.
    assert not llm_reranker_hint(write_model(tmp_path / "qwen3-reranker-seq-cls", classifier))
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-Reranker-4B" / "snapshots" / "0123abcd"
    assert llm_reranker_hint(write_model(snapshot, causal))
    logit_score = [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": "sentence_transformers.base.modules.transformer.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_LogitScore",
            "type": "sentence_transformers.cross_encoder.modules.LogitScore",
        },
    ]
    assert llm_reranker_hint(write_model(tmp_path / "my-model", causal, logit_score))
    assert not llm_reranker_hint(write_model(tmp_path / "other", causal, logit_score[:1]))
    gguf = tmp_path / "qwen3-reranker-0.6b-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert llm_reranker_hint(gguf)
