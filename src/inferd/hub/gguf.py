"""GGUF files: converted once into a Hugging Face folder, so later loads take a second, not a minute.

transformers dequantises a GGUF file into full-precision weights and rebuilds its tokenizer on every
load (about 40 s for the bundled 135M model on two cores). The first load saves the result (fp32
safetensors, tokenizer, config) under the cache directory keyed by the file's identity.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import secrets
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/inferd").expanduser()


def converted_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder holding the dequantised weights and tokenizer of ``gguf_path``.

    Replicas may share the cache (a volume on Kubernetes, all of them PID 1): the first to come
    converts under a file lock, the others wait on it and then reuse that conversion."""
    target = (cache_dir or DEFAULT_CACHE_DIR) / "gguf" / _key(gguf_path)
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if not _is_converted(target):  # else another process converted it while we waited
            _convert_into(gguf_path, target)
    return target


# Written last into a finished conversion: a folder without it (a crash, a partial copy) is redone.
_COMPLETE = "inferd-conversion-complete"


def _is_converted(target: Path) -> bool:
    return (target / _COMPLETE).is_file()


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    # flock is released by the kernel when the process dies, so a crashed converter never blocks
    # the next start; the lock file itself stays (deleting it would race with a waiter).
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(gguf_path: Path, target: Path) -> None:
    log.info("converting %s once into %s (dequantising; later loads reuse it)", gguf_path.name, target)
    # A name of our own (not the PID: replicas are all PID 1), made like save_pretrained's folders
    # (mkdir under the umask, unlike mkdtemp's 0700) so other users of a shared cache can read it.
    # Under the lock no other converter is at work: a temp folder of this target is a killed
    # converter's leftover (gigabytes for a 7B), removed here since nothing else would.
    for stale in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}")
    tmp.mkdir()
    try:
        _convert(gguf_path, tmp)
        (tmp / _COMPLETE).write_text(f"{gguf_path.name}\n")
        shutil.rmtree(target, ignore_errors=True)  # an unfinished folder: never loaded, replaced
        # Rename last: a crash mid-way never leaves a folder that looks complete.
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise ``gguf_path`` with transformers and save the model and tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are plain tensors by now; the GGUF "quantizer" only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


# GGUF value types (gguf spec): id → struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# general.file_type → llama.cpp's name of the quantisation.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """A GGUF file's metadata (arrays reduced to their length) and its tensors' element count."""

    metadata: dict[str, object]
    num_params: int
    file_size: int

    def config(self) -> dict:
        """The config.json a Hugging Face conversion of this file would have (the keys memory needs)."""
        arch = str(self.metadata.get("general.architecture", "llama"))
        meta = {k.removeprefix(arch + "."): v for k, v in self.metadata.items() if k.startswith(arch + ".")}
        heads = int(meta.get("attention.head_count", 1))
        hidden = int(meta.get("embedding_length", 0))
        vocab = meta.get("vocab_size") or self.metadata.get("tokenizer.ggml.tokens", 0)
        return {
            "architectures": [f"{arch.capitalize()}ForCausalLM"],
            "model_type": arch,
            "num_hidden_layers": meta.get("block_count"),
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": meta.get("attention.head_count_kv", heads),
            "head_dim": meta.get("attention.key_length") or (hidden // heads if heads else None),
            "intermediate_size": meta.get("feed_forward_length"),
            "vocab_size": vocab,
            "max_position_embeddings": meta.get("context_length"),
            "tie_word_embeddings": "output.weight" not in self.metadata.get("_tensor_names", ()),
        }


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header of a GGUF file without loading any tensor (or any big array)."""
    from inferd.errors import ModelLoadError

    try:
        with path.open("rb") as f:
            return _read_gguf(f, path.stat().st_size)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a valid GGUF file: {exc}") from None


def _read_gguf(f: BinaryIO, file_size: int) -> GGUFInfo:
    if f.read(4) != b"GGUF":
        raise ValueError("bad magic")
    _version, num_tensors, num_kv = struct.unpack("<IQQ", f.read(20))
    metadata: dict[str, object] = {}
    for _ in range(num_kv):
        key = _read_str(f)
        metadata[key] = _read_value(f, struct.unpack("<I", f.read(4))[0])
    names, num_params = [], 0
    for _ in range(num_tensors):
        names.append(_read_str(f))
        (num_dims,) = struct.unpack("<I", f.read(4))
        dims = struct.unpack(f"<{num_dims}Q", f.read(8 * num_dims))
        f.read(12)  # type (u32) and offset (u64)
        num_params += math.prod(dims)
    metadata["_tensor_names"] = tuple(names)
    return GGUFInfo(metadata, num_params, file_size)


def _read_str(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8")


def _read_value(f: BinaryIO, value_type: int) -> object:
    if value_type == _STRING:
        return _read_str(f)
    if value_type == _ARRAY:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if item_type in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
        else:
            for _ in range(count):
                _read_value(f, item_type)
        return count  # arrays (token lists, merges) matter only by their length here
    if value_type not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {value_type}")
    fmt = "<" + _SCALARS[value_type]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
