"""``inferd pull``: fetch a model's files, verify them, and only then register the model.

Hugging Face downloads go through huggingface_hub (so HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE
apply), one file at a time with our progress bars. A dropped connection resumes with a Range
request; files finished before an interruption stay in the cache and are not fetched again;
huggingface_hub deletes the unfinished file. Sizes and hashes the hub lists are checked afterwards.
Files go into the Hugging Face cache (HF_HOME / HF_HUB_CACHE), shared with transformers; inferd's
own cache directory holds the registry, GGUF conversions and ModelScope downloads.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import importlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.hub.inspect import has_weights
from inferd.hub.names import ModelRef, Origin
from inferd.hub.progress import DownloadProgress
from inferd.hub.registry import ModelRegistry, RegistryEntry, inferd_cache_dir
from inferd.hub.resolve import detect_kind

# When a repo has safetensors, the other formats are copies of the same weights.
_DUPLICATE_FORMATS = ("*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf", "onnx/*",
                      "openvino/*", "*/onnx/*", "*/openvino/*", "coreml/*", "*.mlmodel")  # fmt: skip


@dataclass(frozen=True, slots=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files
    git_sha1: str | None  # regular files: the git blob id


def pull(
    ref: ModelRef,
    *,
    cache_dir: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    show_progress: bool = True,
    name: str | None = None,
    file_bar: Callable[[RemoteFile], type] | None = None,
) -> RegistryEntry:
    """Fetch (or, for a local path, find) the model and register it; nothing is registered on failure.
    ``file_bar`` replaces the terminal bars: the tqdm-like class that reports one Hugging Face file's
    bytes (the Ollama API streams them)."""
    registry = ModelRegistry(cache_dir)
    if ref.origin is Origin.LOCAL:
        entry = _local_entry(ref, name)
    elif ref.origin is Origin.MODELSCOPE:
        from inferd.hub.modelscope import pull_modelscope

        entry = pull_modelscope(ref, inferd_cache_dir(cache_dir) / "modelscope", include, exclude)
    elif ref.origin is Origin.HUGGINGFACE:
        entry = _pull_huggingface(ref, include, exclude, show_progress, file_bar)
    else:
        raise ModelLoadError(f"{ref.name} is bundled with inferd; there is nothing to pull")
    registry.add(entry)
    return entry


def _local_entry(ref: ModelRef, name: str | None) -> RegistryEntry:
    assert ref.path is not None
    if not ref.path.exists():
        raise ModelLoadError(f"{ref.path} does not exist")
    kind = detect_kind(ref.path)  # raises on a missing or corrupt config.json
    label = name or (ref.path.stem if ref.path.is_file() else ref.path.name)
    return RegistryEntry(
        name=label, origin=Origin.LOCAL.value, path=str(ref.path), kind=kind.value, owned=False
    )


def _pull_huggingface(
    ref: ModelRef, include: list[str] | None, exclude: list[str] | None, show: bool, file_bar=None
) -> RegistryEntry:
    from huggingface_hub import HfApi, constants

    assert ref.repo_id is not None
    with hub_errors(ref):
        if constants.is_offline_mode():
            return _cached_entry(ref)
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        remote = [_remote_file(s) for s in info.siblings or []]
        files = select_files(ref, remote, include, exclude)
        folder = _download(ref.repo_id, info.sha, files, show, file_bar)
    verify_files(folder, files)
    path = folder / files[0].name if ref.is_gguf else folder
    return RegistryEntry(
        name=ref.name, origin=Origin.HUGGINGFACE.value, path=str(path), kind=detect_kind(path).value,
        owned=True, repo_id=ref.repo_id, revision=info.sha, files=[f.name for f in files],
    )  # fmt: skip


def _remote_file(sibling) -> RemoteFile:
    lfs = sibling.lfs
    return RemoteFile(
        sibling.rfilename,
        lfs.size if lfs else sibling.size,
        lfs.sha256 if lfs else None,
        None if lfs else sibling.blob_id,
    )


def select_files(
    ref: ModelRef, remote: list[RemoteFile], include: list[str] | None, exclude: list[str] | None
) -> list[RemoteFile]:
    """The files a pull fetches: one GGUF file, or the repo minus duplicate weight formats."""
    if ref.is_gguf:
        return [pick_gguf(ref, remote)]
    names = [f.name for f in remote]
    skip = list(exclude or [])
    if include is None and any(n.endswith(".safetensors") for n in names):
        skip += _DUPLICATE_FORMATS
    chosen = [f for f in remote if _matches(f.name, include or ["*"]) and not _matches(f.name, skip)]
    if not has_weights([f.name for f in chosen]):
        listed = ", ".join(names) or "no files at all"
        raise ModelLoadError(f"{ref.repo_id} has no weight files to pull (it holds: {listed})")
    return chosen


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def pick_gguf(ref: ModelRef, remote: list[RemoteFile]) -> RemoteFile:
    assert ref.file is not None
    ggufs = [f for f in remote if f.name.endswith(".gguf")]
    if ref.file.endswith(".gguf"):
        matches = [f for f in ggufs if ref.file in (f.name, f.name.rsplit("/", 1)[-1])]
    else:
        tag = re.compile(rf"(^|[-_./]){re.escape(ref.file)}([-_.]|$)", re.IGNORECASE)
        matches = [f for f in ggufs if tag.search(f.name)]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(f.name for f in ggufs) or "none"
    if not matches:
        raise ModelLoadError(f"no GGUF file in {ref.repo_id} matches {ref.file!r}; GGUF files: {available}")
    raise ModelLoadError(f"{ref.file!r} matches several files in {ref.repo_id}: {available}; name one file")


def _download(repo_id: str, commit: str, files: list[RemoteFile], show: bool, file_bar=None) -> Path:
    from huggingface_hub import hf_hub_download

    folder = None
    with DownloadProgress([f.size or 0 for f in files], enabled=show and file_bar is None) as progress:
        for file in files:
            bar = file_bar(file) if file_bar is not None else progress.file_bar(file.name, file.size or 0)
            local = hf_hub_download(repo_id, file.name, revision=commit, tqdm_class=bar)
            progress.finish_file(file.name)
            folder = Path(local[: -len(file.name)])
    assert folder is not None
    return folder


def verify_files(folder: Path, files: list[RemoteFile]) -> None:
    """Each file's size and hash against what the hub listed; a mismatch deletes the file."""
    for file in files:
        path = folder / file.name
        size = path.stat().st_size
        problem = None
        if file.size is not None and size != file.size:
            problem = f"{size} bytes, the hub lists {file.size}"
        elif file.sha256 and _digest(path, hashlib.sha256()) != file.sha256:
            problem = "its sha256 differs from the hub's"
        elif file.git_sha1 and _digest(path, hashlib.sha1(f"blob {size}\0".encode())) != file.git_sha1:
            problem = "its git hash differs from the hub's"
        if problem:
            path.resolve().unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise ModelLoadError(f"downloaded {file.name} is corrupt ({problem}); it was removed, pull again")


def _digest(path: Path, hasher) -> str:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _cached_entry(ref: ModelRef) -> RegistryEntry:
    """HF_HUB_OFFLINE: register what the cache already holds, or say that it holds nothing."""
    from huggingface_hub import snapshot_download

    assert ref.repo_id is not None
    folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
    path = folder
    if ref.is_gguf:
        remote = [RemoteFile(str(p.relative_to(folder)), None, None, None) for p in folder.rglob("*.gguf")]
        path = folder / pick_gguf(ref, remote).name
    return RegistryEntry(
        name=ref.name, origin=Origin.HUGGINGFACE.value, path=str(path), kind=detect_kind(path).value,
        owned=True, repo_id=ref.repo_id, revision=folder.name,
    )  # fmt: skip


@contextmanager
def hub_errors(ref: ModelRef) -> Iterator[None]:
    """Turn huggingface_hub's and the OS's errors into inferd's, with what to do about them."""
    try:
        yield
    except Exception as exc:  # only re-raised as a typed error, or unchanged
        mapped = map_hub_error(ref, exc)
        if mapped is None:
            raise
        raise mapped from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "could not reach the server" errors. huggingface_hub 2.x uses ``httpx2``,
    1.x ``httpx``; neither is a dependency of inferd's own, so only what is installed is named."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def map_hub_error(ref: ModelRef, exc: BaseException) -> Exception | None:
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    endpoint = constants.ENDPOINT
    if isinstance(exc, hf.GatedRepoError):
        return ModelLoadError(f"{ref.repo_id} is gated: accept its terms on the hub and set HF_TOKEN")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelLoadError(
            f"repository {ref.repo_id!r} was not found on {endpoint} (private? set HF_TOKEN)"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelLoadError(f"revision {ref.revision!r} of {ref.repo_id} was not found on {endpoint}")
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, *_transport_errors())):
        return ModelLoadError(
            f"cannot reach the model hub at {endpoint} and {ref.name} is not in the local cache "
            f"({type(exc).__name__}); check the network, or point HF_ENDPOINT at a mirror you can reach"
        )
    if isinstance(exc, hf.EntryNotFoundError):
        return ModelLoadError(f"{ref.repo_id} has no such file on {endpoint}: {exc}")
    if isinstance(exc, hf.HfHubHTTPError):
        return ModelLoadError(f"the hub at {endpoint} refused {ref.name}: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ModelLoadError(
            f"no space left to download {ref.name} ({exc.strerror}); the partial file was removed. "
            "Free some space or pull into a larger --cache-dir"
        )
    return None


def fetch_config(ref: ModelRef) -> tuple[dict, dict | None]:
    """config.json and the safetensors index of a hub repo, fetching nothing else (no weights)."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    assert ref.repo_id is not None
    with hub_errors(ref):
        config_file = hf_hub_download(ref.repo_id, "config.json", revision=ref.revision)
        try:
            index_file = hf_hub_download(ref.repo_id, "model.safetensors.index.json", revision=ref.revision)
        except EntryNotFoundError:
            index_file = None
    try:
        config = json.loads(Path(config_file).read_text())
        index = json.loads(Path(index_file).read_text()) if index_file else None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{ref.repo_id}'s config.json is not valid JSON: {exc}") from None
    return config, index
