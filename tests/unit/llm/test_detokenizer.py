"""Streaming detokenization against real tokenizers trained here (no network): byte-level BPE as in
GPT-2/Llama 3/Qwen, SentencePiece-style Unigram, and SentencePiece-style BPE with byte fallback as in
Llama 2/Mistral."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from inferd.llm.detokenizer import IncrementalDetokenizer
from inferd.llm.params import SamplingParams

CORPUS = [
    "Hello world, this is a small corpus for streaming detokenization tests.",
    "The quick brown fox jumps over the lazy dog. Numbers 1234567890!",
    "你好，世界！这是一个测试。我们喜欢流式输出。",
    "Emoji time 😀🎉 and a thumbs up 👍🏽 and rockets 🚀.",
    "Stop here: END or abcd or abcx, keep going.",
] * 10

TEXTS = [
    "Hello world, streaming 你好世界 with emoji 😀🎉 and 👨\u200d👩\u200d👧 family.",
    "这是一个测试。🚀 The quick brown fox 👍🏽!",
    "Unseen characters: 漢字テスト 🦀🧪 end.",
]

SPECIAL = ["<|endoftext|>", "<|im_end|>"]


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )


def byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return wrap(tok)


def metaspace_unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL], unk_token="<unk>")
    tok.train_from_iterator(CORPUS + TEXTS, trainer)
    return wrap(tok)


def metaspace_bpe_byte_fallback() -> PreTrainedTokenizerFast:
    """Characters outside a deliberately small alphabet become <0xNN> byte tokens, one per byte."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL], limit_alphabet=60)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(
        decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]).__getstate__()
    )
    return wrap(Tokenizer.from_str(json.dumps(spec)))


@pytest.fixture(scope="module", params=[byte_level_bpe, metaspace_unigram, metaspace_bpe_byte_fallback])
def tokenizer(request):
    return request.param()


@pytest.fixture(scope="module")
def byte_level():
    return byte_level_bpe()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, output_ids, prompt_ids=(), **params):
    """Push every id (stopping when a stop string matches); returns (deltas, detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), SamplingParams(**params))
    deltas = []
    for token_id in output_ids:
        deltas.append(detok.push(token_id))
        if detok.stopped_on is not None:
            return deltas, detok
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_without_replacement_chars(tokenizer, text):
    ids = encode(tokenizer, text)
    deltas, detok = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == detok.text
    assert "\ufffd" not in tokenizer.decode(ids)
    assert all("\ufffd" not in delta for delta in deltas)


def test_multi_byte_characters_really_are_split_across_tokens(byte_level):
    # Guards the test above: for the byte-level tokenizer some token must end inside a character.
    ids = encode(byte_level, TEXTS[2])
    assert any("\ufffd" in byte_level.decode(ids[:n]) for n in range(1, len(ids)))
    deltas, _ = stream(byte_level, ids)
    assert "" in deltas[:-1]


def test_first_output_token_keeps_its_space_after_a_prompt(tokenizer):
    ids = encode(tokenizer, "Hello world, 你好 😀")
    split = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]) == "Hello")
    prompt, output = ids[:split], ids[split:]
    deltas, _ = stream(tokenizer, output, prompt_ids=prompt)
    assert "".join(deltas) == " world, 你好 😀"
    # Decoding the output alone would lose that space wherever the decoder strips a first "▁".
    if isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace):
        assert tokenizer.decode(output) == "world, 你好 😀"


def test_an_unfinished_character_at_the_end_is_flushed_as_the_full_decode_shows_it(byte_level):
    ids = encode(byte_level, "ok 🦀")
    cut = next(n for n in range(1, len(ids)) if byte_level.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams())
    pushed = "".join(detok.push(token_id) for token_id in ids[:cut])
    assert "\ufffd" not in pushed
    assert pushed + detok.flush() == byte_level.decode(ids[:cut])


def boundaries(tokenizer, ids) -> list[int]:
    """Character offsets in the decoded text where one token ends and the next begins."""
    return [len(tokenizer.decode(ids[:n])) for n in range(1, len(ids))]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens_never_leaks(tokenizer, include):
    text = "The quick brown fox jumps over the lazy dog and runs on."
    ids = encode(tokenizer, text)
    full = tokenizer.decode(ids)
    cut = next(b for b in boundaries(tokenizer, ids) if 10 < b < len(full) - 10 and full[b - 1] != " ")
    stop = full[cut - 2 : cut + 2]  # two characters on each side of a token boundary
    assert full.count(stop) == 1
    expected = full[: full.index(stop) + (len(stop) if include else 0)]
    detok = IncrementalDetokenizer(
        tokenizer, [], SamplingParams(stop=(stop,), include_stop_str_in_output=include)
    )
    emitted = ""
    for token_id in ids:
        emitted += detok.push(token_id)
        assert expected.startswith(emitted), f"leaked {emitted!r}"
        if detok.stopped_on:
            break
    assert detok.stopped_on == stop
    assert emitted == detok.text == expected


def char_ids(byte_level, text: str) -> list[int]:
    """One token per character, so each push adds exactly one character."""
    return [id_ for char in text for id_ in encode(byte_level, char)]


def test_possible_stop_starts_are_held_back_until_ruled_out(byte_level):
    text = "xx abcx abcabcd tail"
    stop = "abcd"
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=(stop,)))
    emitted = ""
    for n, token_id in enumerate(char_ids(byte_level, text), start=1):
        emitted += detok.push(token_id)
        if detok.stopped_on:
            break
        so_far = text[:n]
        held = max(k for k in range(len(stop)) if so_far.endswith(stop[:k]))
        assert emitted == so_far[: n - held], (so_far, emitted)
    assert detok.stopped_on == stop
    assert emitted == "xx abcx abc"


def test_stop_string_inside_one_token_cuts_the_rest_of_that_token(byte_level):
    ids = encode(byte_level, "Hello world")
    deltas, detok = stream(byte_level, ids, stop=("ll",))
    assert (detok.stopped_on, "".join(deltas)) == ("ll", "He")
    deltas, detok = stream(byte_level, ids, stop=("ll",), include_stop_str_in_output=True)
    assert (detok.stopped_on, "".join(deltas)) == ("ll", "Hell")


@pytest.mark.parametrize("one_char_per_token", [True, False])
def test_the_stop_string_completed_first_wins_whatever_the_tokenization(byte_level, one_char_per_token):
    ids = char_ids(byte_level, "Hello") if one_char_per_token else encode(byte_level, "Hello")
    assert one_char_per_token or "ll" in byte_level.convert_ids_to_tokens(ids)  # both stops in one delta
    deltas, detok = stream(byte_level, ids, stop=("ell", "l"))
    assert (detok.stopped_on, "".join(deltas)) == ("l", "He")


def test_text_held_for_a_stop_that_never_completes_is_flushed(byte_level):
    deltas, detok = stream(byte_level, char_ids(byte_level, "go abc"), stop=("abcd",))
    assert detok.stopped_on is None
    assert deltas[-1] == "abc" and "".join(deltas) == detok.text == "go abc"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*encode(tokenizer, "Hi there"), im_end, *encode(tokenizer, " 你好")]
    deltas, _ = stream(tokenizer, ids, skip_special_tokens=skip)
    text = "".join(deltas)
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


class Shout:
    """A decoder that rewrites earlier tokens' text once it sees "!" (what DecodeStream cannot diff)."""

    def decode_chain(self, tokens):
        return [t.upper() for t in tokens] if "!" in tokens else tokens


def test_a_decoder_that_rewrites_earlier_text_does_not_break_the_stream():
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.decoder = decoders.Decoder.custom(Shout())
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    deltas = [detok.push(token_id) for token_id in [0, 1, 2, 0]]
    # Text already streamed cannot be recalled; the stream restarts and carries on.
    assert deltas == ["a", "b", "!", "A"]
