"""What this machine has free now: RAM (MemAvailable, within the container's memory limit), or a
GPU's free memory through torch."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

FALLBACK_FREE_BYTES = 4 * 2**30  # when the OS will not say (not Linux)
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63


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
    return _ram()[0]


def machine_memory() -> list[DeviceMemory]:
    """RAM, then each visible GPU (torch is imported only when CUDA could be present)."""
    devices = [DeviceMemory("cpu", *_ram())]
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return devices
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(DeviceMemory(f"cuda:{index}", int(free), int(total)))
    return devices


def _ram() -> tuple[int, int]:
    """(free, total) bytes of RAM this process may use: the machine's, bounded by its memory
    cgroup's limit. In a container /proc/meminfo shows the whole node, and a plan sized from it
    would outgrow the pod's limit and be OOM-killed."""
    info = _meminfo()
    free, total = info.get("MemAvailable", FALLBACK_FREE_BYTES), info.get("MemTotal", 0)
    limited = cgroup_memory()
    if limited is None:
        return free, total
    limit, used = limited
    return max(0, min(free, limit - used)), min(total, limit) if total else limit


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, int] | None:
    """(limit, in use) bytes of this process's memory cgroup, v2 or v1; None without a limit.

    In use is what the kernel charges short of reclaimable file cache (usage minus inactive
    files), the figure its OOM killer compares with the limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            found = _read_cgroup(
                root / path.lstrip("/"), root, "memory.max", "memory.current", "inactive_file"
            )
        elif "memory" in controllers.split(","):
            found = _read_cgroup(
                root / "memory" / path.lstrip("/"),
                root / "memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        else:
            continue
        if found is not None:
            return found
    return None


def _read_cgroup(
    folder: Path, top: Path, limit_file: str, usage_file: str, inactive_key: str
) -> tuple[int, int] | None:
    # A container sees its own cgroup as the root of its namespace: the path may name a folder
    # that is not there, and then the top folder is the container's.
    for candidate in (folder, top):
        try:
            raw = (candidate / limit_file).read_text().strip()
            usage = int((candidate / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if raw == "max" or int(raw) >= _UNLIMITED:
            return None
        inactive = 0
        try:
            for stat in (candidate / "memory.stat").read_text().splitlines():
                key, _, value = stat.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return int(raw), max(0, usage - inactive)
    return None


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
