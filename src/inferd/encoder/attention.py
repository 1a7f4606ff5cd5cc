"""Unpadded ("varlen") encoder batches: every sequence's tokens packed into one row.

The linear layers, most of an encoder's work, then run as one large matrix product whatever the
mix of lengths, and no position is padding. Attention, the only place sequences must not see each
other, is ours: registered in transformers' attention interface, it attends within each sequence's
span of the packed row.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

ATTENTION_NAME = "inferd_varlen"
_current = threading.local()


@contextmanager
def packed_spans(bounds: list[tuple[int, int]]):
    """Install the (start, end) span of each sequence for the forward inside this block."""
    _current.bounds = bounds
    try:
        yield
    finally:
        _current.bounds = None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query/key/value (1, heads, tokens, dim) → (1, tokens, heads, dim), attending within spans."""
    out = torch.empty_like(query)
    for start, end in _current.bounds:
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=scaling
        )
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    return None


def register_varlen_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
