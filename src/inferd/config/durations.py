"""Keep-alive durations as Ollama writes them: ``"5m"``, ``"1h30m"``, ``"45s"``, a number of seconds,
``0`` (unload once idle) or any negative value (keep forever)."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Longer than any server lives, and small enough for loop.call_later.
_LONGEST_S = 365 * 24 * 3600.0


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """Seconds to keep a model loaded once idle; None for forever. Raises ValueError when unreadable."""
    if value is None:
        raise ValueError("a keep-alive duration is needed")
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration such as '5m', a number of seconds, 0 or -1")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    f"keep_alive {value!r} is not a duration: use e.g. '30s', '5m', '1h', a number of "
                    "seconds, 0 (unload when idle) or -1 (keep loaded)"
                ) from None
            seconds = sign * sum(float(n) * _SECONDS[u] for n, u in parts)
    if seconds != seconds:  # NaN
        raise ValueError("keep_alive must be a number")
    if seconds < 0 or seconds > _LONGEST_S:
        return None
    return seconds
