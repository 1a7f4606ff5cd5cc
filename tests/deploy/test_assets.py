"""Every YAML and JSON asset under deploy/ parses, and deploy/README.md names each one."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.deploy.assets import DEPLOY, json_files, yaml_files


def test_assets_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    for required in (
        "Dockerfile.cpu",
        "Dockerfile.cuda",
        "docker-compose.yml",
        "prometheus/prometheus.yml",
        "grafana/dashboards/inferd.json",
        "kubernetes/deployment.yaml",
        "kubernetes/hpa.yaml",
        "nginx/inferd.conf",
        "README.md",
    ):
        assert required in names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", json_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path):
    with path.open() as f:
        assert isinstance(json.load(f), dict)


def test_readme_names_every_asset():
    readme = (DEPLOY / "README.md").read_text()
    assets = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [str(p.relative_to(DEPLOY)) for p in assets if p.name not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"
