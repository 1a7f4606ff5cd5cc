"""Pooling of token states into one vector, as sentence-transformers' Pooling module configures it."""

from __future__ import annotations

import torch

POOLING_MODES = ("cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")

# Keys of the legacy (sentence-transformers < 6) 1_Pooling/config.json, in its order of output.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def pooling_modes(config: dict) -> tuple[str, ...]:
    """The modes a Pooling config asks for, in output order; mean when it names none."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_KEYS.items() if config.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    modes = modes or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ValueError(f"unsupported pooling mode(s) {unknown}; supported: {POOLING_MODES}")
    return modes


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """(batch, seq, dim) states and a right-padded mask → (batch, len(modes) × dim), float32."""
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    outputs = [_POOLERS[mode](hidden, mask, attention_mask) for mode in modes]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _cls(hidden, mask, attention_mask):
    return hidden[:, 0]


def _mean(hidden, mask, attention_mask):
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _mean_sqrt_len(hidden, mask, attention_mask):
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9).sqrt()


def _max(hidden, mask, attention_mask):
    return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values


def _last_token(hidden, mask, attention_mask):
    last = attention_mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _weighted_mean(hidden, mask, attention_mask):
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
    weights = mask * positions.view(1, -1, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


_POOLERS = {
    "cls": _cls,
    "mean": _mean,
    "mean_sqrt_len_tokens": _mean_sqrt_len,
    "max": _max,
    "lasttoken": _last_token,
    "weightedmean": _weighted_mean,
}


def pool_packed(hidden: torch.Tensor, bounds: list[tuple[int, int]], modes: tuple[str, ...]) -> torch.Tensor:
    """Pooling over a packed row: (tokens, dim) states and each sequence's (start, end) span."""
    hidden = hidden.float()
    outputs = [_PACKED_POOLERS[mode](hidden, bounds) for mode in modes]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _segments(hidden: torch.Tensor, bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([end - start for start, end in bounds], device=hidden.device)
    segment_ids = torch.repeat_interleave(torch.arange(len(bounds), device=hidden.device), lengths)
    return segment_ids, lengths


def _packed_sum(hidden, bounds):
    segment_ids, lengths = _segments(hidden, bounds)
    total = torch.zeros(len(bounds), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    return total.index_add_(0, segment_ids, hidden), lengths.to(hidden.dtype)[:, None]


def _packed_mean(hidden, bounds):
    total, lengths = _packed_sum(hidden, bounds)
    return total / lengths


def _packed_mean_sqrt_len(hidden, bounds):
    total, lengths = _packed_sum(hidden, bounds)
    return total / lengths.sqrt()


def _packed_max(hidden, bounds):
    return torch.stack([hidden[start:end].max(dim=0).values for start, end in bounds])


def _packed_weighted_mean(hidden, bounds):
    return torch.stack(
        [
            _weighted_mean(hidden[None, start:end], torch.ones(1, end - start, 1), None)[0]
            for start, end in bounds
        ]
    )


_PACKED_POOLERS = {
    "cls": lambda hidden, bounds: hidden[[start for start, _ in bounds]],
    "lasttoken": lambda hidden, bounds: hidden[[end - 1 for _, end in bounds]],
    "mean": _packed_mean,
    "mean_sqrt_len_tokens": _packed_mean_sqrt_len,
    "max": _packed_max,
    "weightedmean": _packed_weighted_mean,
}
