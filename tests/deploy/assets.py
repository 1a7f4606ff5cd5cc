"""Paths and loaders for the deployment assets under deploy/."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_FILES = (DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.cuda.yml")
DOCKERFILES = (DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda")

_COMPOSE_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def json_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.json"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def kubernetes_resources() -> tuple[tuple[Path, dict], ...]:
    """Every document of every manifest under deploy/kubernetes/, with its file."""
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path, doc))
    return tuple(found)


def resource(kind: str, name: str | None = None) -> dict:
    """The one manifest of this kind (and name) in deploy/kubernetes/."""
    matches = [
        doc
        for _, doc in kubernetes_resources()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def compose_default(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default."""
    return _COMPOSE_DEFAULT.sub(lambda m: m.group(2), value)


def parse_quantity(text: str | int) -> float:
    """A Kubernetes quantity ("500m", "8", "16Gi") as a number."""
    text = str(text)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)
