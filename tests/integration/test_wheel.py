"""What a user installs runs what the tests ran: the wheel carries the native kernels, and a machine
without a compiler loads the best build for its CPU from it."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from inferd.llm.runner.kernels import variants

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: setuptools is here already, and the build must not reach an index.
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (built,) = out.glob("inferd-*.whl")
    return built


def test_the_wheel_carries_one_kernel_library_per_level(wheel):
    names = {Path(n).name.split(".")[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")}
    assert names == {v.stem for v in variants.variants()}


def test_an_install_without_a_compiler_runs_the_best_build_for_this_cpu(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The runtime dependencies come from this environment (a .pth file), inferd from the wheel.
    target = Path(subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip())
    (target / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    bin_dir = tmp_path / "bin"  # a PATH with python and nothing else: no cc, no gcc
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(python)
    script = (
        "import json, shutil, inferd.llm.runner.kernels as k;"
        "assert shutil.which('cc') is None and shutil.which('gcc') is None;"
        "ops = k.native_ops();"
        "print(json.dumps({'file': k.__file__, 'variant': ops and ops.variant}))"
    )
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "LANG": os.environ.get("LANG", "C.UTF-8")}
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(target))  # the wheel's copy, not this checkout's
    assert report["variant"] == variants.runnable()[0].name
