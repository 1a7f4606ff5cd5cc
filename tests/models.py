"""Tiny randomly initialised models with real tokenizer files, built on disk for tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "are",
    "from",
    "or",
    "an",
    "not",
    "but",
    "cat",
    "cats",
    "dog",
    "dogs",
    "purr",
    "bark",
    "sun",
    "moon",
    "rain",
    "paris",
    "france",
    "capital",
    "city",
    "river",
    "sea",
    "query",
    "passage",
    "document",
]
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + WORDS
    + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
)
MAX_SEQ_LENGTH = 64


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB))
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=MAX_SEQ_LENGTH)
    (folder / "vocab.txt").unlink()
    return tokenizer


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **extra,
    )


def build_embedder(root: Path, *, dense: bool = True, pooling: str = "mean") -> Path:
    """A sentence-transformers folder: Transformer → Pooling → (Dense) → Normalize, with a prompt."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import BertModel

    torch.manual_seed(0)
    bert_dir = root / "bert"
    _tokenizer(bert_dir).save_pretrained(bert_dir)
    BertModel(_bert_config()).save_pretrained(bert_dir)
    modules = [
        st_models.Transformer(str(bert_dir), max_seq_length=MAX_SEQ_LENGTH),
        st_models.Pooling(32, pooling_mode=pooling),
    ]
    if dense:
        modules.append(st_models.Dense(32, 16))
    modules.append(st_models.Normalize())
    model = SentenceTransformer(modules=modules, prompts={"query": "query: "}, device="cpu")
    out = root / f"embedder-{pooling}{'-dense' if dense else ''}"
    model.save(str(out))
    return out


def build_cross_encoder(root: Path) -> Path:
    """A Hugging Face folder with a one-label BertForSequenceClassification."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    out = root / "cross-encoder"
    _tokenizer(out).save_pretrained(out)
    BertForSequenceClassification(_bert_config(num_labels=1)).save_pretrained(out)
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_llama(root: Path, *, num_layers: int = 2, vocab_words: int = 200) -> Path:
    """A tiny random LlamaForCausalLM with a real (word-level) tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
    words = [*WORDS, *[f"w{i}" for i in range(vocab_words - len(WORDS) - len(specials))]]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    out = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_byte_llama(
    root: Path,
    name: str,
    chat_template: str,
    *,
    specials: tuple[str, ...] = ("<|im_start|>", "<|im_end|>"),
    added: tuple[str, ...] = (),
    eos: str = "<|im_end|>",
    num_layers: int = 2,
    max_position_embeddings: int = 1024,
    seed: int = 3,
    never_ends: bool = False,
) -> Path:
    """A tiny random LlamaForCausalLM whose tokenizer can spell any text: one token per byte
    (GPT-2's byte-level alphabet, no merges), plus ``specials`` (special tokens, ``eos`` among them)
    and ``added`` (added tokens that are not special, e.g. ``<tool_call>`` or ``</think>`` as Qwen
    has them). For tests that need JSON, tool-call markup or any other text a word-level
    vocabulary cannot write; ``chat_template`` is written in the test in a model family's format.
    ``never_ends``: the EOS is a last special token the model's vocabulary leaves out, so it can never
    be sampled and every answer runs to max_tokens (sampled, a random model writes its EOS after a
    few hundred tokens on average)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if never_ends:
        eos = "<|never|>"
        backend.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)
    tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    config = LlamaConfig(
        vocab_size=len(tokenizer) - never_ends,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    out = root / name
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
