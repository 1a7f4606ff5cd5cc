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
