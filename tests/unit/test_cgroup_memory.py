"""Free RAM inside a container: the memory cgroup's limit bounds what /proc/meminfo says."""

from __future__ import annotations

from pathlib import Path

from inferd.memory import profile
from inferd.memory.profile import cgroup_memory

GIB = 2**30


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def _files(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_v2_limit_and_usage_less_reclaimable_cache(tmp_path):
    root = tmp_path / "fs"
    _files(root / "kubepods" / "pod1", {"memory.max": f"{8 * GIB}\n", "memory.current": f"{3 * GIB}\n"})
    (root / "kubepods" / "pod1" / "memory.stat").write_text(f"anon {2 * GIB}\ninactive_file {GIB}\n")
    assert cgroup_memory(root, _proc(tmp_path, "0::/kubepods/pod1\n")) == (8 * GIB, 2 * GIB)


def test_v2_in_a_cgroup_namespace_reads_the_top_folder(tmp_path):
    # Inside the container the path names the host's folder; the container sees its own at the top.
    root = tmp_path / "fs"
    _files(root, {"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n"})
    assert cgroup_memory(root, _proc(tmp_path, "0::/kubepods/elsewhere\n")) == (4 * GIB, GIB)


def test_no_limit_is_none(tmp_path):
    root = tmp_path / "fs"
    _files(root, {"memory.max": "max\n", "memory.current": f"{GIB}\n"})
    assert cgroup_memory(root, _proc(tmp_path, "0::/\n")) is None
    # cgroup v1 spells "no limit" as a page-rounded 2**63.
    v1 = tmp_path / "v1"
    _files(
        v1 / "memory", {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "100\n"}
    )
    assert cgroup_memory(v1, _proc(tmp_path, "4:memory:/\n0::/\n")) is None
    assert cgroup_memory(tmp_path / "missing", tmp_path / "no-proc-file") is None


def test_v1_memory_controller(tmp_path):
    root = tmp_path / "fs"
    folder = root / "memory" / "docker" / "abc"
    _files(folder, {"memory.limit_in_bytes": f"{6 * GIB}\n", "memory.usage_in_bytes": f"{2 * GIB}\n"})
    (folder / "memory.stat").write_text(f"cache {GIB}\ntotal_inactive_file {GIB // 2}\n")
    proc = _proc(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_memory(root, proc) == (6 * GIB, 2 * GIB - GIB // 2)


def test_free_memory_is_bounded_by_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(profile, "_meminfo", lambda: {"MemAvailable": 20 * GIB, "MemTotal": 24 * GIB})
    monkeypatch.setattr(profile, "cgroup_memory", lambda: (8 * GIB, 3 * GIB))
    assert profile.free_memory("cpu") == 5 * GIB
    (cpu,) = [d for d in profile.machine_memory() if d.device == "cpu"]
    assert (cpu.free_bytes, cpu.total_bytes) == (5 * GIB, 8 * GIB)
    monkeypatch.setattr(profile, "cgroup_memory", lambda: None)
    assert profile.free_memory("cpu") == 20 * GIB
