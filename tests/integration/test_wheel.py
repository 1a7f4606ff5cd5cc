"""What a user installs runs what the tests ran: the wheel carries the native kernels, and a machine
without a compiler loads the best build for its CPU from it and serves with it."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from inferd.llm.runner.kernels import variants
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: setuptools is here already, and the build must not reach an index.
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        str(ROOT),
        "-w",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (built,) = out.glob("inferd-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed by pip (console script included), the runtime
    dependencies taken from this environment through a .pth file, and an environment whose PATH
    holds python and nothing else: no cc, no gcc."""
    root = tmp_path_factory.mktemp("installed")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    target = Path(
        subprocess.check_output(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (target / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(python)
    env = {
        "PATH": str(bin_dir),
        "HOME": str(root),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "INFERD_CACHE_DIR": str(root / "inferd"),
    }
    return {"python": python, "inferd": env_dir / "bin" / "inferd", "site": target, "env": env}


def test_the_wheel_carries_one_kernel_library_per_level(wheel):
    names = {Path(n).name.split(".")[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")}
    assert names == {v.stem for v in variants.variants()}


def test_an_install_without_a_compiler_runs_the_best_build_for_this_cpu(installed):
    script = (
        "import json, shutil, inferd.llm.runner.kernels as k;"
        "assert shutil.which('cc') is None and shutil.which('gcc') is None;"
        "ops = k.native_ops();"
        "print(json.dumps({'file': k.__file__, 'variant': ops and ops.variant}))"
    )
    result = subprocess.run(
        [installed["python"], "-c", script], capture_output=True, text=True, env=installed["env"], timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(installed["site"]))  # the wheel's copy, not this checkout's
    assert report["variant"] == variants.runnable()[0].name


def test_the_installed_server_serves_chat_on_the_best_build(installed, tiny_llama):
    """`inferd serve` from the wheel's console script, no compiler on PATH: ready, /version names
    the best build for this CPU, the process maps that build from the install, and a chat
    completion comes back."""
    port = free_port()
    command = [
        installed["inferd"],
        "serve",
        "--model",
        f"{tiny_llama}=tiny-chat",
        "--port",
        str(port),
        "--num-threads",
        "1",
    ]
    log = installed["site"].parent / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, env=installed["env"], stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(base):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not ready in 60 s:\n" + log.read_text()
            time.sleep(0.2)
        best = variants.runnable()[0]
        assert httpx.get(f"{base}/version").json()["kernels"] == best.name
        mapped = Path(f"/proc/{server.pid}/maps").read_text()
        assert str(installed["site"] / "inferd" / "llm" / "runner" / "kernels" / best.stem) in mapped
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4}
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "without the native kernels" not in log.read_text()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
