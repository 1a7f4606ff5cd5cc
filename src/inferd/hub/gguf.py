"""GGUF files: converted once into a Hugging Face folder, so later loads take a second, not a minute.

transformers dequantises a GGUF file into full-precision weights and rebuilds its tokenizer on every
load (about 40 s for the bundled 135M model on two cores). The first load saves the result (fp32
safetensors, tokenizer, config) under the cache directory keyed by the file's identity.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/inferd").expanduser()


def converted_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder holding the dequantised weights and tokenizer of ``gguf_path``."""
    target = (cache_dir or DEFAULT_CACHE_DIR) / "gguf" / _key(gguf_path)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s once into %s (dequantising; later loads reuse it)", gguf_path.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are plain tensors by now; the GGUF "quantizer" only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Rename last: a crash mid-way never leaves a folder that looks complete.
    tmp.rename(target)
    return target


def _key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"
