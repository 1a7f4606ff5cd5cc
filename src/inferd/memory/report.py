"""The numbers `inferd estimate` prints, for a local model or a hub id (config.json only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.hub.gguf import conversion_folder, is_converted, read_gguf_info
from inferd.memory.estimate import (
    DTYPE_BYTES,
    count_parameters,
    estimate,
    naive_kv_bytes,
    normalize_dtype,
    shape_from_config,
)
from inferd.memory.profile import free_memory

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8",
                       "I8": "int8"}  # fmt: skip
_CONVERTIBLE = ("float32", "bfloat16", "float16")  # the dtypes serve converts a GGUF into
_NO_CONVERSION = dict.fromkeys(("gguf_file_bytes", "conversion_dtype", "conversion_tensor_by_tensor",
                                "conversion_peak_bytes", "conversion_disk_bytes", "conversion_done"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """config.json of a model, and what else is known without its weights."""

    config: dict
    num_params: int | None
    params_from: str
    stored_dtype: str | None
    gguf_path: Path | None = None  # a GGUF file: serve converts it into its dtype first


def load_config_source(model: str, cache_dir: str | None) -> ConfigSource:
    """From local files when the model is here; else config.json and the index from the hub."""
    from inferd.hub.inspect import inspect_model, params_from_index
    from inferd.hub.names import Origin, parse_model_name
    from inferd.hub.resolve import locate_model

    try:
        path = locate_model(model, cache_dir)
    except ModelLoadError:
        ref = parse_model_name(model)
        if ref.origin is not Origin.HUGGINGFACE or ref.is_gguf:
            raise
        from inferd.hub.download import fetch_config

        config, index = fetch_config(ref)
        stored = _stored_dtype(config.get("torch_dtype") or config.get("dtype"))
        num_params = params_from_index(index, stored) if index else None
        return ConfigSource(config, num_params, "safetensors index" if num_params else "config", stored)
    files = inspect_model(path)
    if files.is_gguf:
        return ConfigSource(files.config, files.num_params, files.params_source, None, files.path)
    stored = _stored_dtype(files.stored_dtype or files.config.get("torch_dtype"))
    return ConfigSource(files.config, files.num_params, files.params_source, stored)


def _stored_dtype(name: str | None) -> str | None:
    if not name:
        return None
    name = _SAFETENSORS_DTYPES.get(name.split(",")[0], name)
    return name if name in DTYPE_BYTES else None


def estimate_report(
    model: str, *, dtype: str | None, context: int | None, batch: int, kv_dtype: str | None,
    device: str, cache_dir: str | None,
) -> dict:  # fmt: skip
    source = load_config_source(model, cache_dir)
    shape = shape_from_config(source.config)
    num_params = source.num_params or count_parameters(shape)
    is_gguf = source.gguf_path is not None
    # A GGUF is served dequantised (serve converts it once): in what serve would use, not as stored.
    dtype = normalize_dtype(dtype or (_served_dtype(device) if is_gguf else source.stored_dtype) or "float32")
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    result = estimate(
        shape, num_params=num_params, dtype=dtype, kv_dtype=kv_dtype, context=context, batch=batch,
        device=device,
    )  # fmt: skip
    free = _free_on(device)
    max_tokens = result.max_tokens(free)
    weights_as = f"GGUF dequantised to {dtype}, as served" if is_gguf else dtype
    return {
        "model": model, "architecture": shape.architecture, "device": device,
        "dtype": dtype, "weights_as": weights_as, "kv_dtype": kv_dtype,
        **(_conversion(source.gguf_path, dtype, cache_dir) if is_gguf else _NO_CONVERSION),
        "context": result.context, "batch": batch,
        "num_params": num_params, "params_from": source.params_from,
        "weight_bytes": result.weight_bytes,
        "kv_bytes_per_token": result.kv_bytes_per_token,
        "kv_cache_bytes": result.kv_cache_bytes,
        "naive_kv_cache_bytes": naive_kv_bytes(shape, result.context * batch, kv_dtype) if shape.is_causal else 0,
        "activation_bytes": result.activation_bytes,
        "runtime_bytes": result.runtime_bytes,
        "total_bytes": result.total_bytes,
        "free_bytes": free,
        "fits": result.total_bytes <= free,
        "max_context_at_batch": min(max_tokens // batch, shape.max_position_embeddings),
        "max_batch_at_context": max_tokens // result.context,
    }  # fmt: skip


def _conversion(gguf_path: Path, dtype: str, cache_dir: str | None) -> dict:
    """What serve's conversion of the GGUF file costs, once, before the weights load: its peak in RAM
    (freed before the KV cache is allocated) and the converted copy it leaves on disk."""
    info = read_gguf_info(gguf_path)
    # --quantization int8 is served from a bfloat16 conversion; int4 and float8 are not served.
    conversion = info.conversion(dtype if dtype in _CONVERTIBLE else "bfloat16")
    folder = conversion_folder(gguf_path, conversion.dtype, Path(cache_dir) if cache_dir else None)
    return {
        "gguf_file_bytes": info.file_size,
        "conversion_dtype": conversion.dtype,
        "conversion_tensor_by_tensor": conversion.tensor_by_tensor,
        "conversion_peak_bytes": conversion.peak_bytes,
        "conversion_disk_bytes": conversion.disk_bytes,
        "conversion_done": is_converted(folder),  # already in the cache: serve skips it
    }


def _served_dtype(device: str) -> str:
    """The dtype serve gives a chat model by default on ``device``."""
    if device.startswith("cuda"):
        return "bfloat16"
    from inferd.config.settings import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def _free_on(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA device is visible to torch on this machine")
    return free_memory(device)
