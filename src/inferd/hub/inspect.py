"""What a model's files say about it, read without loading a weight: shape, parameter count, files."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from inferd.config.model_spec import ModelKind
from inferd.errors import ModelLoadError
from inferd.hub.gguf import FILE_TYPES, read_gguf_info
from inferd.hub.resolve import detect_kind, read_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx")
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                      "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A local model as its files describe it."""

    path: Path
    kind: ModelKind
    config: dict
    num_params: int | None  # None: count it from the shape
    params_source: str  # "safetensors", "gguf" or "config"
    stored_dtype: str | None
    files: tuple[tuple[str, int], ...]  # (relative name, bytes)
    is_gguf: bool

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self.files)


# Families whose embeddings take plain 0-based position ids and whose attention goes through
# transformers' attention interface, so a packed row (positions restarting per item) is exact.
_PACKABLE_MODEL_TYPES = frozenset({"bert"})


def packs_unpadded(config: dict) -> bool:
    """Whether a sentence embedder with this config.json runs unpadded (packed) batches; a plain
    BERT checkpoint among them runs on inferd's own BERT (encoder/models/bert.py)."""
    return (
        config.get("model_type") in _PACKABLE_MODEL_TYPES
        and config.get("position_embedding_type", "absolute") == "absolute"
    )


def inspect_model(path: Path) -> ModelFiles:
    """Read config.json (or a GGUF header) and count parameters from safetensors headers."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a GGUF model")
        info = read_gguf_info(path)
        file_type = info.metadata.get("general.file_type")
        return ModelFiles(
            path, ModelKind.CHAT, info.config(), info.num_params, "gguf",
            f"GGUF {FILE_TYPES.get(file_type, file_type)}", ((path.name, info.file_size),), True,
        )  # fmt: skip
    config = read_config(path)
    num_params, stored = safetensors_parameters(path)
    return ModelFiles(
        path=path,
        kind=detect_kind(path),
        config=config,
        num_params=num_params,
        params_source="safetensors" if num_params else "config",
        stored_dtype=stored or config.get("torch_dtype") or config.get("dtype"),
        files=list_files(path),
        is_gguf=False,
    )


def list_files(path: Path) -> tuple[tuple[str, int], ...]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return tuple((str(p.relative_to(path)), p.stat().st_size) for p in files)


def has_weights(names: list[str]) -> bool:
    return any(name.endswith(WEIGHT_SUFFIXES) for name in names)


def safetensors_parameters(folder: Path) -> tuple[int | None, str | None]:
    """Exact parameter count and stored dtype from the safetensors headers (a few KB read per file)."""
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        return None, None
    total, dtypes = 0, set()
    for file in files:
        for entry in _safetensors_header(file).values():
            # Integer tensors are buffers (position ids), not parameters.
            if isinstance(entry, dict) and "shape" in entry and entry.get("dtype", "F")[0] in "FB":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
                dtypes.add(entry.get("dtype", "?"))
    return total, ",".join(sorted(dtypes))


def _safetensors_header(file: Path) -> dict:
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file} is not a valid safetensors file: {exc}") from None


def params_from_index(index: dict, stored_dtype: str | None) -> int | None:
    """Parameters from a safetensors index's total_size and the stored dtype (None when unknown)."""
    total = (index.get("metadata") or {}).get("total_size")
    size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(stored_dtype))
    return int(total) // size if total and size else None


def chat_template_present(path: Path) -> bool:
    if path.is_file():
        return True  # GGUF files carry theirs (tokenizer.chat_template)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
        except json.JSONDecodeError:
            return False
    return False


def pooling_and_dimensions(path: Path) -> tuple[str | None, int | None]:
    """sentence-transformers' pooling mode and output size (a Dense layer's out_features wins)."""
    pooling, dims = None, None
    modules_file = path / "modules.json"
    if not path.is_dir() or not modules_file.is_file():
        return None, None
    root = path.resolve()
    for module in json.loads(modules_file.read_text()):
        folder = module.get("path") if isinstance(module, dict) else None
        if not isinstance(folder, str) or not folder:
            continue
        module_config = path / folder / "config.json"
        # A path out of the model's folder ("../..") is never read: the loader refuses such a model.
        if not module_config.resolve().is_relative_to(root) or not module_config.is_file():
            continue
        data = json.loads(module_config.read_text())
        if module.get("type", "").endswith("Pooling"):
            pooling = _pooling_mode(data)
            dims = data.get("word_embedding_dimension") or data.get("embedding_dimension") or dims
        elif module.get("type", "").endswith("Dense"):
            dims = data.get("out_features", dims)
    return pooling, dims


def _pooling_mode(data: dict) -> str | None:
    """sentence-transformers v6 writes ``pooling_mode``; earlier versions one flag per mode."""
    if isinstance(data.get("pooling_mode"), str):
        return data["pooling_mode"]
    modes = [k.removeprefix("pooling_mode_") for k, v in data.items() if k.startswith("pooling_mode_") and v]
    return ",".join(m.removesuffix("_tokens") for m in modes) or None
