"""GGUF files: converted once into a Hugging Face folder in the served dtype, so later loads take a second.

transformers' GGUF loader dequantises every tensor to float32 and builds the whole model before it can be
saved: about twice the float32 model in RAM (27 GB for a 7B), and a float32 copy on disk. The llama
family (llama, mistral, qwen2, qwen3) is converted here tensor by tensor instead, straight into the
dtype serve uses: each tensor is read, dequantised (the ``gguf`` package, as transformers does),
un-permuted by transformers' own tensor processor, cast, and added to a safetensors shard of at most
``SHARD_BYTES``, so the conversion holds one shard plus one float32 tensor. The config and tokenizer
come from transformers' GGUF path, as its loader would make them. Other architectures still go
through transformers' loader (in the served dtype), with a log line saying so. The result is saved
under the cache directory, keyed by the file's identity and the dtype.

``--quantization int8`` converts to bfloat16 like any bf16 model, and the int8 weights are made from
those at load: its kernel takes one scale per output channel for a whole row, while GGUF Q8_0 keeps
an fp16 scale per block of 32 inputs, so Q8_0 blocks cannot be kept as they are without a kernel
that reads per-block scales (the weights are rounded twice: to Q8_0 once, to per-channel int8 again).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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

from inferd.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/inferd").expanduser()
# A converted shard is held in memory until it is written.
SHARD_BYTES = 512 * 2**20
# GGUF architectures (general.architecture) converted tensor by tensor; mistral GGUFs say "llama".
TENSOR_BY_TENSOR = frozenset({"llama", "qwen2", "qwen3"})
# Rows dequantised at a time: gguf's dequantize holds its whole output twice while it assembles it.
_DEQUANTISE_ELEMENTS = 2**20
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_SINGLE = "model.safetensors"  # one shard: named as save_pretrained names it, no index


def converted_gguf(gguf_path: Path, cache_dir: Path | None = None, dtype: str = "float32") -> Path:
    """A Hugging Face folder holding the weights of ``gguf_path`` in ``dtype``, and its tokenizer.

    Replicas may share the cache (a volume on Kubernetes, all of them PID 1): the first to come
    converts under a file lock, the others wait on it and then reuse that conversion."""
    target = conversion_folder(gguf_path, dtype, cache_dir)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if not is_converted(target):  # else another process converted it while we waited
            _convert_into(gguf_path, target, dtype)
    return target


def conversion_folder(gguf_path: Path, dtype: str, cache_dir: Path | None = None) -> Path:
    """Where ``gguf_path`` converted into ``dtype`` lives (or will)."""
    return (cache_dir or DEFAULT_CACHE_DIR) / "gguf" / _key(gguf_path, dtype)


# Written last into a finished conversion: a folder without it (a crash, a partial copy) is redone.
_COMPLETE = "inferd-conversion-complete"


def is_converted(target: Path) -> bool:
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


def _convert_into(gguf_path: Path, target: Path, dtype: str) -> None:
    log.info("converting %s once into %s in %s (later loads reuse it)", gguf_path.name, target, dtype)
    # A name of our own (not the PID: replicas are all PID 1), made like save_pretrained's folders
    # (mkdir under the umask, unlike mkdtemp's 0700) so other users of a shared cache can read it.
    # Under the lock no other converter is at work: a temp folder of this target is a killed
    # converter's leftover (gigabytes for a 7B), removed here since nothing else would.
    for stale in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}")
    tmp.mkdir()
    try:
        _convert(gguf_path, tmp, dtype)
        (tmp / _COMPLETE).write_text(f"{gguf_path.name}\n")
        shutil.rmtree(target, ignore_errors=True)  # an unfinished folder: never loaded, replaced
        # Rename last: a crash mid-way never leaves a folder that looks complete.
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf_path: Path, out: Path, dtype: str) -> None:
    """Write the weights of ``gguf_path`` in ``dtype``, its config and its tokenizer into ``out``."""
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    info = read_gguf_info(gguf_path)
    if info.architecture in TENSOR_BY_TENSOR:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        _convert_tensor_by_tensor(gguf_path, info, config, out, dtype)
    else:
        log.info("GGUF architecture %r is converted by transformers' loader, whole: about twice the model "
                 "in %s while it runs", info.architecture, dtype)  # fmt: skip
        _convert_whole(gguf_path, out, dtype)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def _convert_whole(gguf_path: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
    )
    # The weights are plain tensors by now; the GGUF "quantizer" only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)


def _convert_tensor_by_tensor(gguf_path: Path, info: GGUFInfo, config, out: Path, dtype: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    with torch.device("meta"):  # the parameter names, without any memory behind them
        model = AutoModelForCausalLM.from_config(config)
    names = _hf_names(info.architecture, model.state_dict(), config.num_hidden_layers)
    # transformers' own layout fixes (Llama's Q/K un-permute), as its loader applies them.
    processor = TENSOR_PROCESSORS.get(info.architecture, TensorProcessor)(config=config.to_dict())

    def convert(f: BinaryIO, tensor: TensorEntry) -> tuple[str, torch.Tensor]:
        weights = _dequantised(f, info.data_start, tensor)
        weights = processor.process(weights=weights, name=tensor.name).weights
        return names[tensor.name], torch.from_numpy(np.ascontiguousarray(weights)).to(getattr(torch, dtype))

    tensors = [t for t in info.tensors if t.name in names]  # as its loader skips the rest
    _check_complete(gguf_path, names, {t.name for t in tensors}, config.tie_word_embeddings)
    _write_shards(gguf_path, tensors, convert, _ITEMSIZE[dtype], out)
    config.architectures = [type(model).__name__]
    config.dtype = getattr(torch, dtype)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


def _check_complete(gguf_path: Path, names: dict[str, str], present: set[str], tied: bool) -> None:
    """Refuse a file that lacks a tensor the model needs (experts under "llama", a cut-down file):
    transformers' loader would leave those weights random and the model would serve nonsense."""
    needed = {name: hf for name, hf in names.items() if not (tied and hf == "lm_head.weight")}
    missing = sorted(hf for name, hf in needed.items() if name not in present)
    if missing:
        raise ModelLoadError(
            f"{gguf_path.name} has no tensor for {len(missing)} of its architecture's weights "
            f"(e.g. {', '.join(missing[:3])}); inferd converts dense checkpoints of it only"
        )


def _write_shards(gguf_path: Path, tensors: list[TensorEntry], convert, itemsize: int, out: Path) -> None:
    """Convert ``tensors`` in order into safetensors shards, holding one shard at a time, and write
    the index transformers and inferd's checkpoint reader read when there is more than one."""
    from safetensors.torch import save_file

    sizes = [t.num_elements * itemsize for t in tensors]
    shards = plan_shards(sizes)
    weight_map = {}
    with gguf_path.open("rb") as f:
        for number, shard in enumerate(shards, 1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else _SINGLE
            converted = dict(convert(f, tensors[i]) for i in shard)
            save_file(converted, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(converted, file))
            del converted  # now, not when the next shard is complete: one shard held, not two
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _hf_names(architecture: str, state_dict: dict, num_layers: int) -> dict[str, str]:
    """GGUF tensor name → the model's parameter name, from gguf's tensor name table.

    The table transformers' ``get_gguf_hf_weights_map`` reads too; it walks it again for every
    submodule (seconds per model), where for these models the top level already names every tensor."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == architecture)
    table = get_tensor_name_map(arch, num_layers)
    names = {}
    for hf_name in state_dict:
        base, _, suffix = hf_name.rpartition(".")
        if (gguf_name := table.get_name(base)) is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _dequantised(f: BinaryIO, data_start: int, tensor: TensorEntry):
    """One tensor of the file in float32 (numpy), in its row-major shape.

    Read with plain reads rather than through a memory map: mapped pages stay in the process's
    resident memory once touched, so by the end the whole file would count against it."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(tensor.ggml_type)
    num_rows = tensor.num_elements // tensor.shape[-1]
    f.seek(data_start + tensor.offset)
    rows = np.fromfile(f, dtype=np.uint8, count=tensor.stored_bytes).reshape(num_rows, -1)
    out = np.empty((num_rows, tensor.shape[-1]), dtype=np.float32)
    step = max(1, _DEQUANTISE_ELEMENTS // tensor.shape[-1])
    for start in range(0, num_rows, step):
        # gguf's dequantize takes rows of bytes, whatever the type (F32 and F16 too).
        out[start : start + step] = dequantize(rows[start : start + step], qtype)
    return out.reshape(tensor.shape)


def plan_shards(sizes: list[int]) -> list[range]:
    """Consecutive tensors (by their converted size) grouped into shards of at most ``SHARD_BYTES``;
    a larger tensor gets a shard of its own."""
    shards, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if total and total + size > SHARD_BYTES:
            shards.append(range(start, i))
            start, total = i, 0
        total += size
    shards.append(range(start, len(sizes)))
    return shards


def _key(path: Path, dtype: str) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{dtype}-{digest[:12]}"


# GGUF value types (gguf spec): id → struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# general.file_type → llama.cpp's name of the quantisation.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a GGUF file's tensor table."""

    name: str
    shape: tuple[int, ...]  # row-major (torch's order; ggml lists the fastest-moving dimension first)
    ggml_type: int
    offset: int  # from the start of the data section
    stored_bytes: int

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def working_bytes(self) -> int:
        """What converting it holds: as stored, dequantised to float32, and the rows at work."""
        return self.stored_bytes + 4 * self.num_elements + 4 * min(self.num_elements, _DEQUANTISE_ELEMENTS)


@dataclass(frozen=True, slots=True)
class Conversion:
    """What converting a GGUF file costs, once: memory while it runs, and the copy it leaves."""

    dtype: str
    peak_bytes: int
    disk_bytes: int
    tensor_by_tensor: bool


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """A GGUF file's metadata (arrays reduced to their length) and its tensor table."""

    metadata: dict[str, object]
    tensors: tuple[TensorEntry, ...]
    data_start: int  # where the tensor data begins
    file_size: int

    @property
    def num_params(self) -> int:
        return sum(t.num_elements for t in self.tensors)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def conversion(self, dtype: str) -> Conversion:
        """The cost of ``converted_gguf(..., dtype=dtype)`` (float32, bfloat16 or float16)."""
        itemsize = _ITEMSIZE[dtype]
        disk = self.num_params * itemsize
        if self.architecture not in TENSOR_BY_TENSOR:
            # transformers' loader: every converted tensor, then the model built from them.
            return Conversion(dtype, 2 * disk, disk, tensor_by_tensor=False)
        sizes = [t.num_elements * itemsize for t in self.tensors]
        largest_shard = max(sum(sizes[i] for i in shard) for shard in plan_shards(sizes))
        # The shard being filled, plus the tensor at work.
        working = max((t.working_bytes for t in self.tensors), default=0)
        return Conversion(dtype, largest_shard + working, disk, tensor_by_tensor=True)

    def config(self) -> dict:
        """The config.json a Hugging Face conversion of this file would have (the keys memory needs)."""
        arch = self.architecture
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
            "tie_word_embeddings": all(t.name != "output.weight" for t in self.tensors),
        }


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header of a GGUF file without loading any tensor (or any big array)."""
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
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = []
    for _ in range(num_tensors):
        name = _read_str(f)
        (num_dims,) = struct.unpack("<I", f.read(4))
        shape = struct.unpack(f"<{num_dims}Q", f.read(8 * num_dims))[::-1]
        ggml_type, offset = struct.unpack("<IQ", f.read(12))
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        tensors.append(TensorEntry(name, shape, ggml_type, offset, math.prod(shape) // block * block_bytes))
    alignment = int(metadata.get("general.alignment", 32))  # the data section starts aligned (gguf spec)
    return GGUFInfo(metadata, tuple(tensors), -(-f.tell() // alignment) * alignment, file_size)


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
