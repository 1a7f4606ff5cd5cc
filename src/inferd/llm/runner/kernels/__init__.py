"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

The source ships with the package; the shared library is built once per source, compiler and CPU
into the cache directory and reused by later starts. Where no compiler is found or the build fails,
``paged_decode_kernel`` returns None and the runner keeps its pure-torch attention.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch  # noqa: F401  (loaded first: the library then binds to torch's libgomp.so.1)

log = logging.getLogger("inferd.llm.kernels")
_SOURCE = Path(__file__).with_name("paged_decode.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


@cache
def paged_decode_kernel(cache_dir: str | None = None):
    """The loaded ``paged_decode_attention`` function, or None when it cannot be built here."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: decode attention uses the torch path")
        return None
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "inferd"
    library = root / "kernels" / f"paged_decode-{_build_key(compiler)}.so"
    if not library.exists() and not _build(compiler, library):
        return None
    function = ctypes.CDLL(str(library)).paged_decode_attention
    function.restype = ctypes.c_int
    function.argtypes = [
        *(ctypes.c_void_p,) * 3, ctypes.c_int,  # q, k_cache, v_cache, is_bf16
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,  # block_tables, table_width, ctx_lens
        *(ctypes.c_int,) * 5,  # num_seqs, num_heads, num_kv_heads, head_dim, block_size
        ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,  # scale, window, softcap, out
    ]
    return function


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    digest.update(version.stdout.encode())
    digest.update(_cpu_flags().encode())  # -march=native: a library is only valid on its own CPU
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return os.uname().machine


def _build(compiler: str, library: Path) -> bool:
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        return _compile(compiler, library)
    except OSError as exc:  # a read-only or full cache directory: run without the kernel
        log.warning("cannot build the decode-attention kernel in %s (%s); using the torch path", library.parent, exc)
        return False


def _compile(compiler: str, library: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        target = Path(tmp) / library.name
        result = subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", str(target), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log.warning("building the decode-attention kernel failed; using the torch path:\n%s", result.stderr)
            return False
        os.replace(target, library)  # atomic: a concurrent start sees no half-written library
    return True
