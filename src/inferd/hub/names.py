"""What a model name means: bundled, a local path, a Hugging Face repo (maybe a GGUF file in it), or
a ModelScope repo. Parsing is pure; nothing here touches the network."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.hub.bundled import BUNDLED_MODELS

# The hub's own rule for a name part: letters, digits, '-', '_', '.', no '--' or '..' and not
# starting or ending with '-' or '.'; 96 characters at most.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO = re.compile(rf"^{_PART}/{_PART}$")
_QUANT_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


class InvalidModelNameError(ModelLoadError):
    """A model name that no source could ever hold (malformed)."""


class Origin(str, Enum):
    BUNDLED = "bundled"
    LOCAL = "local"
    HUGGINGFACE = "huggingface"
    MODELSCOPE = "modelscope"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed model name. ``file`` is a GGUF file name or a quantisation tag (``Q4_K_M``)."""

    origin: Origin
    name: str  # the canonical name: what `inferd list` shows and `serve --model` accepts
    repo_id: str | None = None
    revision: str | None = None
    file: str | None = None
    path: Path | None = None

    @property
    def is_gguf(self) -> bool:
        return self.file is not None


def parse_model_name(text: str) -> ModelRef:
    """``ORG/NAME[@REV][:FILE.gguf|:TAG]``, ``modelscope:ORG/NAME[@REV]``, a bundled name, or a path."""
    text = text.strip()
    if not text:
        raise InvalidModelNameError("the model name is empty")
    if text.lower() in BUNDLED_MODELS:
        return ModelRef(Origin.BUNDLED, text.lower())
    local = Path(text).expanduser()
    if local.exists() or text.startswith((".", "/", "~")):
        return ModelRef(Origin.LOCAL, str(local.resolve()), path=local.resolve())
    if text.startswith("modelscope:"):
        repo, revision = _split_revision(text.removeprefix("modelscope:"), text)
        _check_repo(repo, text)
        return ModelRef(Origin.MODELSCOPE, text, repo_id=repo, revision=revision)
    head, _, file = text.partition(":")
    repo, revision = _split_revision(head, text)
    _check_repo(repo, text)
    if file and not (file.endswith(".gguf") or _QUANT_TAG.match(file)):
        raise InvalidModelNameError(f"{file!r} in {text!r} is neither a .gguf file nor a quantisation tag")
    return ModelRef(Origin.HUGGINGFACE, text, repo_id=repo, revision=revision, file=file or None)


def _split_revision(text: str, whole: str) -> tuple[str, str | None]:
    repo, sep, revision = text.partition("@")
    if sep and not revision:
        raise InvalidModelNameError(f"{whole!r} has an empty revision after '@'")
    return repo, revision or None


def _check_repo(repo: str, whole: str) -> None:
    if not _REPO.match(repo) or "--" in repo or ".." in repo:
        bundled = ", ".join(BUNDLED_MODELS)
        raise InvalidModelNameError(
            f"model {whole!r} is neither a bundled name ({bundled}), an existing path, nor a model id: "
            "ORG/NAME[@REVISION][:FILE.gguf|:QUANT] (Hugging Face) or modelscope:ORG/NAME"
        )
