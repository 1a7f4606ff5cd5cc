"""Rich progress bars for downloads: one per file and one for the total (bytes, speed, time left).

huggingface_hub creates a bar per file through its ``tqdm_class`` argument; any callable that
returns an object with ``update(n)`` and context-manager methods will do, so ``file_bar`` hands it
a factory bound to our rich Progress.
"""

from __future__ import annotations

from functools import partial

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class DownloadProgress:
    """A total bar over ``sizes`` plus a bar for each file while it downloads."""

    def __init__(self, sizes: list[int], *, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}", table_column=None),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._total = self._progress.add_task("total", total=sum(sizes))
        self._counted: dict[str, int] = {}
        self._sizes: dict[str, int] = {}

    def __enter__(self) -> DownloadProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def file_bar(self, name: str, size: int):
        """The ``tqdm_class`` for one file's download."""
        self._counted[name] = 0
        self._sizes[name] = size
        return partial(_FileBar, self, name)

    def finish_file(self, name: str) -> None:
        """A file already in the cache never opened a bar: count it in the total now."""
        missing = self._sizes.pop(name, 0) - self._counted.pop(name, 0)
        if missing > 0:
            self._progress.advance(self._total, missing)

    def _add(self, name: str, total: int | None, initial: int) -> TaskID:
        task = self._progress.add_task(name, total=total or self._sizes.get(name), completed=initial)
        self._advance(name, initial, None)
        return task

    def _advance(self, name: str, num_bytes: int, task: TaskID | None) -> None:
        if task is not None:
            self._progress.advance(task, num_bytes)
        self._counted[name] = self._counted.get(name, 0) + num_bytes
        self._progress.advance(self._total, num_bytes)


class _FileBar:
    """The slice of tqdm's interface huggingface_hub's downloader uses."""

    def __init__(self, owner: DownloadProgress, name: str, *, total=None, initial=0, **_: object) -> None:
        self._owner, self._name = owner, name
        self._task = owner._add(name, total, initial)

    def update(self, num_bytes: int) -> None:
        self._owner._advance(self._name, num_bytes, self._task)

    def close(self) -> None:
        return None

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
