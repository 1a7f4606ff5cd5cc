"""The local models inferd knows by name: pulled from a hub, or registered in place.

One JSON file (``models.json`` in the cache directory), rewritten atomically, so an interrupted
pull or rm never leaves a half-written registry. An entry is added only after every file of a
pull is on disk and verified.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inferd.errors import ModelLoadError

DEFAULT_CACHE_DIR = Path("~/.cache/inferd").expanduser()


def inferd_cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One known model. ``owned`` is True when inferd downloaded the files (rm may delete them)."""

    name: str
    origin: str  # huggingface, modelscope, local
    path: str
    kind: str
    owned: bool
    repo_id: str | None = None
    revision: str | None = None  # the commit the files came from
    files: list[str] = field(default_factory=list)
    added: float = field(default_factory=time.time)


class ModelRegistry:
    """Name → RegistryEntry, stored in ``<cache_dir>/models.json``."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.file = inferd_cache_dir(cache_dir) / "models.json"

    def entries(self) -> list[RegistryEntry]:
        if not self.file.is_file():
            return []
        try:
            data = json.loads(self.file.read_text())
            return [_entry(item) for item in data.get("models", [])]
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"the model registry {self.file} is corrupt ({exc}); remove it") from None

    def get(self, name: str) -> RegistryEntry | None:
        return next((e for e in self.entries() if e.name == name), None)

    def add(self, entry: RegistryEntry) -> None:
        self._write([*(e for e in self.entries() if e.name != entry.name), entry])

    def remove(self, name: str) -> RegistryEntry | None:
        entries = self.entries()
        removed = next((e for e in entries if e.name == name), None)
        if removed is not None:
            self._write([e for e in entries if e.name != name])
        return removed

    def _write(self, entries: list[RegistryEntry]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer: replicas sharing the cache may all be PID 1 in their containers.
        tmp = self.file.with_name(f"{self.file.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.write_text(json.dumps({"models": [asdict(e) for e in entries]}, indent=1))
            tmp.replace(self.file)
        finally:
            tmp.unlink(missing_ok=True)


def _entry(item: dict) -> RegistryEntry:
    """One entry of models.json; TypeError when a field has the wrong type (a hand-edited file)."""
    entry = RegistryEntry(**item)
    texts = [entry.name, entry.origin, entry.path, entry.kind]
    texts += entry.files if isinstance(entry.files, list) else [None]  # not a list: wrong type
    if not isinstance(entry.owned, bool) or not all(isinstance(text, str) for text in texts):
        raise TypeError(f"entry {entry.name!r} has a field of the wrong type")
    return entry
