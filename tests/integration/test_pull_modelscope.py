"""`inferd pull modelscope:ORG/NAME` against a local endpoint (MODELSCOPE_ENDPOINT), when the
optional modelscope extra is installed."""

import json
import os
import subprocess
import sys

import pytest

from tests.fakehub import FakeModelScope

pytest.importorskip("modelscope", reason="the optional modelscope extra is not installed (pip install 'inferd[modelscope]')")

INFERD = [sys.executable, "-m", "inferd"]


def test_pull_from_a_modelscope_endpoint(tiny_embedder, tmp_path):
    bert = tiny_embedder / "config.json"
    files = {"config.json": bert.read_bytes(), "model.safetensors": (tiny_embedder / "model.safetensors").read_bytes()}
    with FakeModelScope({"acme/tiny": files}) as fake:
        env = os.environ | {"MODELSCOPE_ENDPOINT": fake.url, "INFERD_CACHE_DIR": str(tmp_path / "inferd"),
                            "MODELSCOPE_CACHE": str(tmp_path / "ms"), "HOME": str(tmp_path / "home")}  # fmt: skip
        result = subprocess.run([*INFERD, "pull", "modelscope:acme/tiny", "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    registry = json.loads((tmp_path / "inferd" / "models.json").read_text())["models"]
    assert [(m["name"], m["origin"], m["kind"]) for m in registry] == [("modelscope:acme/tiny", "modelscope", "embedding")]
    folder = tmp_path / "inferd" / "modelscope"
    assert (next(folder.rglob("model.safetensors"))).read_bytes() == files["model.safetensors"]
    assert any("FilePath=model.safetensors" in r for r in fake.requests)
