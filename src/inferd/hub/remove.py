"""``inferd rm``: delete a pulled model's files from the hub cache, keeping what others still use.

In the Hugging Face cache a snapshot holds symlinks into ``blobs/``; a blob is deleted only when no
snapshot links to it any more, and a snapshot only when it is empty. Files of a registered local
folder are never touched (``owned`` is False for those and this module is not called).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from inferd.hub.registry import RegistryEntry


def remove_model_files(entry: RegistryEntry, entries: list[RegistryEntry]) -> None:
    """Delete ``entry``'s files except those another registered entry still uses."""
    path = Path(entry.path)
    snapshot = _snapshot_of(path)
    if snapshot is None:  # not a hub cache layout (e.g. a ModelScope folder): it is ours alone
        shutil.rmtree(path if path.is_dir() else path.parent, ignore_errors=True)
        return
    keep = {f for other in entries if other.name != entry.name and _snapshot_of(Path(other.path)) == snapshot
            for f in _files_of(other, snapshot)}  # fmt: skip
    for name in _files_of(entry, snapshot) - keep:
        (snapshot / name).unlink(missing_ok=True)
    _prune(snapshot.parent.parent)


def _snapshot_of(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            return parent
    return None


def _files_of(entry: RegistryEntry, snapshot: Path) -> set[str]:
    if entry.files:
        return set(entry.files)
    return {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()}


def _prune(repo_folder: Path) -> None:
    """Drop blobs no snapshot links to, empty snapshot folders, and the repo folder if nothing is left."""
    snapshots = repo_folder / "snapshots"
    linked = {p.resolve() for p in snapshots.rglob("*") if p.is_symlink()}
    for blob in (repo_folder / "blobs").glob("*"):
        if blob.resolve() not in linked:
            blob.unlink(missing_ok=True)
    for folder in sorted(snapshots.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if not any(snapshots.iterdir()):
        shutil.rmtree(repo_folder, ignore_errors=True)
