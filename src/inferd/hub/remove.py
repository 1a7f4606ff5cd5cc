"""``inferd rm``: delete a pulled model's files from the hub cache, keeping what others still use.

In the Hugging Face cache a snapshot holds symlinks into ``blobs/``; a blob is deleted only when no
snapshot links to it any more, and a snapshot only when it is empty. Files of a registered local
folder are never touched (``owned`` is False for those and this module is not called).

Paths come from models.json, which anyone with write access to the cache directory can edit, so
nothing is deleted unless it resolves (symlinks followed) inside the folder the model's origin
downloads into: the Hugging Face hub cache, or inferd's ``modelscope`` folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.hub.registry import RegistryEntry, inferd_cache_dir


def remove_model_files(
    entry: RegistryEntry, entries: list[RegistryEntry], cache_dir: str | None = None
) -> None:
    """Delete ``entry``'s files except those another registered entry still uses. Raises
    ModelLoadError, having deleted nothing, when a path lies outside the folder it belongs to."""
    root = _files_root(entry, cache_dir)
    path = Path(entry.path)
    snapshot = _snapshot_of(path)
    if snapshot is None:  # not a hub cache layout (e.g. a ModelScope folder): it is ours alone
        shutil.rmtree(_inside(path if path.is_dir() else path.parent, root, entry), ignore_errors=True)
        return
    snapshot = _real_snapshot(snapshot, root, entry)
    keep = {f for other in entries if other.name != entry.name and _same_snapshot(other, snapshot)
            for f in _files_of(other, snapshot)}  # fmt: skip
    names = _files_of(entry, snapshot) - keep
    for name in names:  # every name is checked before anything is deleted
        _check_file_name(name, snapshot, entry)
    for name in names:
        (snapshot / name).unlink(missing_ok=True)
    _prune(snapshot.parent.parent)


def _files_root(entry: RegistryEntry, cache_dir: str | None) -> Path:
    if entry.origin == "huggingface":
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    if entry.origin == "modelscope":
        return inferd_cache_dir(cache_dir) / "modelscope"
    raise ModelLoadError(
        f"refusing to delete the files of {entry.name}: origin {entry.origin!r} has no download folder"
    )


def _inside(path: Path, root: Path, entry: RegistryEntry) -> Path:
    """``path`` with symlinks resolved, when that lies strictly inside ``root``; else ModelLoadError."""
    real, real_root = path.resolve(), root.resolve()
    if real == real_root or not real.is_relative_to(real_root):
        raise ModelLoadError(
            f"refusing to delete {path}: it is not inside {root}, where the files of {entry.name} belong "
            "(check models.json in the cache directory)"
        )
    return real


def _real_snapshot(snapshot: Path, root: Path, entry: RegistryEntry) -> Path:
    """``snapshot`` resolved, when it still is a snapshot folder and its repo folder lies inside ``root``."""
    real = snapshot.resolve()
    if _snapshot_of(real) != real:  # symlinked elsewhere: pruning would delete around the link's target
        raise ModelLoadError(f"refusing to delete {snapshot}: it is not a Hugging Face cache snapshot")
    _inside(real.parent.parent, root, entry)
    return real


def _same_snapshot(other: RegistryEntry, snapshot: Path) -> bool:
    other_snapshot = _snapshot_of(Path(other.path))
    return other_snapshot is not None and other_snapshot.resolve() == snapshot


def _check_file_name(name: str, snapshot: Path, entry: RegistryEntry) -> None:
    # An absolute name or ".." leaves the snapshot, and so does a sub-folder symlinked elsewhere;
    # the file itself may be a symlink (into blobs/): unlink removes the link, not its target.
    target = snapshot / name
    if ".." in Path(name).parts or not target.parent.resolve().is_relative_to(snapshot):
        raise ModelLoadError(f"refusing to delete {name!r} of {entry.name}: it is not a file of {snapshot}")


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
