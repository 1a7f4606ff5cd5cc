"""``inferd pull modelscope:ORG/NAME``, through the ``modelscope`` package (``pip install inferd[modelscope]``).

The client honours MODELSCOPE_ENDPOINT (a mirror or a private deployment) and keeps its own
resumable downloads; files land under ``<cache_dir>/modelscope``.
"""

from __future__ import annotations

from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.hub.inspect import has_weights, list_files
from inferd.hub.names import ModelRef, Origin
from inferd.hub.registry import RegistryEntry
from inferd.hub.resolve import detect_kind


def pull_modelscope(
    ref: ModelRef, cache: Path, include: list[str] | None, exclude: list[str] | None
) -> RegistryEntry:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
        from modelscope_hub.errors import HubError
        from requests import RequestException
    except ImportError:
        raise ModelLoadError(
            "ModelScope models need the modelscope package: pip install 'inferd[modelscope]'"
        ) from None
    try:
        folder = Path(
            snapshot_download(
                ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                allow_patterns=include, ignore_patterns=exclude,
            )
        )  # fmt: skip
    except (HubError, RequestException, OSError, ValueError) as exc:
        raise ModelLoadError(f"could not fetch {ref.name} from ModelScope: {exc}") from None
    names = [name for name, _ in list_files(folder)]
    if not has_weights(names):
        raise ModelLoadError(f"{ref.repo_id} on ModelScope has no weight files (it holds: {', '.join(names)})")
    return RegistryEntry(
        name=ref.name, origin=Origin.MODELSCOPE.value, path=str(folder), kind=detect_kind(folder).value,
        owned=True, repo_id=ref.repo_id, revision=ref.revision, files=names,
    )  # fmt: skip
