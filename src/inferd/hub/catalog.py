"""The local models as plain rows (for `inferd list`) and one model's facts (for `inferd show`)."""

from __future__ import annotations

from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.hub.bundled import BUNDLED_MODELS, bundled_model_path
from inferd.hub.inspect import chat_template_present, inspect_model, pooling_and_dimensions
from inferd.hub.registry import ModelRegistry
from inferd.hub.resolve import locate_model
from inferd.memory.estimate import count_parameters, shape_from_config


def local_models(cache_dir: str | None) -> list[dict]:
    """Bundled (installed) models first, then every registered one, each with what its files say."""
    rows = []
    for name in BUNDLED_MODELS:
        path = bundled_model_path(name)
        if path is not None:
            rows.append(_row(name, "bundled", path))
    for entry in ModelRegistry(cache_dir).entries():
        rows.append(_row(entry.name, entry.origin, Path(entry.path)))
    return rows


def _row(name: str, origin: str, path: Path) -> dict:
    row = {"name": name, "origin": origin, "path": str(path), "kind": "?", "architecture": "?",
           "num_params": None, "dtype": None, "size_bytes": None, "error": None}  # fmt: skip
    if not path.exists():
        row["error"] = "files missing"
        return row
    try:
        files = inspect_model(path)
        shape = shape_from_config(files.config)
    except ModelLoadError as exc:
        row["error"] = exc.message
        return row
    row.update(
        kind=files.kind.value,
        architecture=shape.architecture,
        num_params=files.num_params or count_parameters(shape),
        dtype=files.stored_dtype,
        size_bytes=files.size_bytes,
    )
    return row


def describe_model(source: str, cache_dir: str | None) -> dict:
    """Everything `inferd show` prints, as a dict (``files`` last: (name, bytes) pairs)."""
    path = locate_model(source, cache_dir)
    files = inspect_model(path)
    shape = shape_from_config(files.config)
    pooling, dimensions = pooling_and_dimensions(path)
    return {
        "name": source,
        "path": str(path),
        "kind": files.kind.value,
        "architecture": shape.architecture,
        "model_type": shape.model_type,
        "parameters": files.num_params or count_parameters(shape),
        "parameters_from": files.params_source,
        "dtype": files.stored_dtype,
        "layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "attention_heads": shape.num_heads,
        "kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "context_length": shape.max_position_embeddings,
        "vocab_size": shape.vocab_size,
        "chat_template": chat_template_present(path),
        "pooling": pooling,
        "dimensions": dimensions if dimensions else (None if shape.is_causal else shape.hidden_size),
        "size_bytes": files.size_bytes,
        "files": [list(f) for f in files.files],
    }
