"""The builds of the native kernel library: one per instruction-set level, made when the package is
built (``setup.py`` imports this file on its own: it must not import torch or inferd).

The C sources pick their fast paths at compile time (``#if defined(__AVX512BF16__)``…), so one
source tree compiled with each level's flags gives each level's kernels. At run time the best
build whose instructions this CPU has is loaded (``best_variant``), the way ggml ships CPU
variants: no compiler is needed where the server runs, and a library is never loaded on a CPU
that lacks its instructions (the old ``-march=native`` build on a shared volume could be).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

# The x86-64 psABI levels' CPU flags as /proc/cpuinfo names them (lzcnt shows as abm).
_X86_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True, slots=True)
class Variant:
    """One build: its compiler flags, and the CPU flags a CPU needs to run it."""

    name: str
    flags: tuple[str, ...]
    needs: frozenset[str]

    @property
    def stem(self) -> str:
        """The library's file name stem inside the package."""
        return f"_inferd_cpu_{self.name}"


# Best first. "portable" runs on any CPU of the architecture: plain C loops, auto-vectorised for
# the architecture's baseline (SSE2 on x86-64, NEON on aarch64).
X86_64 = (
    Variant("amx", ("-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
            _X86_V4 | {"avx512_bf16", "amx_tile", "amx_bf16"}),
    Variant("avx512bf16", ("-march=x86-64-v4", "-mavx512bf16"), _X86_V4 | {"avx512_bf16"}),
    Variant("avx512", ("-march=x86-64-v4",), _X86_V4),
    Variant("avx2", ("-march=x86-64-v3",), _X86_V3),
    Variant("portable", ("-march=x86-64",), frozenset()),
)  # fmt: skip
OTHER = (Variant("portable", (), frozenset()),)

# Every build: -fno-trapping-math lets gcc vectorise floorf (the exp in softmax and SiLU) with
# unchanged values. OpenMP is linked in when the compiler has it; the process then shares torch's
# runtime (torch loads its libgomp first, and the loader reuses it by soname).
COMMON_FLAGS = ("-O3", "-fno-trapping-math", "-fPIC")
OPENMP_FLAG = "-fopenmp"


def variants(machine: str | None = None) -> tuple[Variant, ...]:
    """The builds for ``machine`` (default: this one), best first."""
    machine = (machine or platform.machine()).lower()
    return X86_64 if machine in ("x86_64", "amd64") else OTHER


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is absent:
    only the portable build is then chosen)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def runnable(flags: frozenset[str] | None = None, machine: str | None = None) -> list[Variant]:
    """The builds this CPU can execute, best first (the portable one always)."""
    flags = cpu_flags() if flags is None else flags
    return [v for v in variants(machine) if v.needs <= flags]
