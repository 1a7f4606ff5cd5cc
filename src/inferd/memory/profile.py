"""What this machine has free now: RAM (MemAvailable), or a GPU's free memory through torch."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

FALLBACK_FREE_BYTES = 4 * 2**30  # when the OS will not say (not Linux)


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    device: str  # "cpu", "cuda:0", ...
    free_bytes: int
    total_bytes: int


def free_memory(device: str) -> int:
    """Bytes free now on ``device``: MemAvailable for the CPU, torch.cuda.mem_get_info on a GPU."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(index)
        return int(free)
    return _meminfo().get("MemAvailable", FALLBACK_FREE_BYTES)


def machine_memory() -> list[DeviceMemory]:
    """RAM, then each visible GPU (torch is imported only when CUDA could be present)."""
    info = _meminfo()
    devices = [DeviceMemory("cpu", info.get("MemAvailable", FALLBACK_FREE_BYTES), info.get("MemTotal", 0))]
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return devices
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(DeviceMemory(f"cuda:{index}", int(free), int(total)))
    return devices


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def release_freed_memory() -> bool:
    """Hand memory that the process freed back to the OS; True when the C library could.

    Loading a model allocates and frees large temporaries (fp32 weights converted to bf16, q/k/v
    copied into one fused matrix, weights repacked for the CPU kernels). glibc keeps freed heap
    memory for reuse, so without this the process stays that much larger for its whole life: about
    220 MB of the default trio's 1.07 GB right after loading, measured on this project's machine.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl has none
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
