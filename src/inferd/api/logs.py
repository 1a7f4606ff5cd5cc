"""Log lines as JSON objects (one per line, for log shippers) or as text for people."""

from __future__ import annotations

import faulthandler
import functools
import logging
import sys
from datetime import datetime, timezone

import orjson

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...}``; access lines add their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """One line per record for people. Control characters a client put in what is logged (a path
    with ``%0a``) are escaped, so no client can forge a line; a traceback keeps its own lines."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _escape_controls(super().formatMessage(record))


def _escape_controls(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def configure_logging(level: str, log_format: str) -> None:
    """One handler on the root logger; uvicorn's loggers propagate to it (run it with log_config=None).
    Python warnings become records of that handler, and a crash inside native code (a kernel, a
    library) still writes every thread's Python stack to stderr. With JSON logs, libraries' progress
    bars are off: a log shipper reads stderr line by line, and a bar is not a JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if sys.__stderr__ is not None:  # the process's own stderr: the one a crash can still write to
        faulthandler.enable(file=sys.__stderr__)
    if log_format == "json":
        _disable_progress_bars()


def _disable_progress_bars() -> None:
    """tqdm's bars (transformers' GGUF conversion uses tqdm directly) and huggingface_hub's."""
    from huggingface_hub.utils import disable_progress_bars
    from tqdm import std

    disable_progress_bars()
    if not getattr(std.tqdm, "_inferd_disabled", False):
        # Every bar, whoever makes it (tqdm.auto's classes call this __init__), starts disabled.
        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
        std.tqdm._inferd_disabled = True
