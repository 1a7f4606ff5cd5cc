"""docker-compose.yml and what it mounts: the compose-spec schema (vendored by check-jsonschema,
offline), Prometheus' scrape target, Grafana's provisioning, and inferd's settings."""

from __future__ import annotations

import json
import os
from importlib import resources
from urllib.parse import urlsplit

import jsonschema
import pytest

from inferd.config.settings import load_settings
from tests.deploy.assets import COMPOSE_FILES, DEPLOY, REPO, compose_default, load_yaml

COMPOSE = DEPLOY / "docker-compose.yml"


def _compose() -> dict:
    return load_yaml(COMPOSE)


def _services() -> dict:
    return _compose()["services"]


def _bind_mounts(service: dict) -> dict[str, str]:
    """container path -> host path (resolved against deploy/) for each ./ bind mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    return float(duration)


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_matches_the_compose_spec(path, compose_validator):
    errors = sorted(compose_validator.iter_errors(load_yaml(path)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_rejects_a_misspelt_key(compose_validator):
    broken = _compose()
    broken["services"]["inferd"]["helthcheck"] = broken["services"]["inferd"].pop("healthcheck")
    assert not compose_validator.is_valid(broken)


def test_services_and_named_volumes():
    compose = _compose()
    assert {"inferd", "prometheus", "grafana"} <= set(compose["services"])
    declared = set(compose["volumes"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"volume {source} is not declared"


def test_inferd_builds_from_the_repository_root():
    build = _services()["inferd"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).is_file()


def test_inferd_model_cache_is_a_named_volume_at_models():
    volumes = dict(v.split(":")[:2][::-1] for v in _services()["inferd"]["volumes"])
    assert volumes["/models"] in _compose()["volumes"]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DEPLOY / dockerfile).read_text()
        assert "HF_HOME=/models/" in text and "INFERD_CACHE_DIR=/models/" in text


def test_inferd_healthcheck_hits_health_on_the_published_port():
    inferd = _services()["inferd"]
    container_ports = {int(p.split(":")[-1]) for p in inferd["ports"]}
    check = " ".join(inferd["healthcheck"]["test"])
    assert inferd["healthcheck"]["test"][0] == "CMD"
    assert any(f"127.0.0.1:{port}/health" in check for port in container_ports)
    assert _seconds(inferd["healthcheck"]["start_period"]) >= 120


def test_every_published_port_is_on_the_loopback_only():
    """No key is configured by default, so nothing is published on every interface."""
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_stop_grace_period_outlasts_the_drain():
    inferd = _services()["inferd"]
    drain = float(inferd["environment"]["INFERD_DRAIN_TIMEOUT"])
    assert _seconds(inferd["stop_grace_period"]) > drain


def test_inferd_environment_is_valid_settings(monkeypatch):
    for name in [n for n in os.environ if n.startswith("INFERD_")]:
        monkeypatch.delenv(name)
    for name, value in _services()["inferd"]["environment"].items():
        if name.startswith("INFERD_"):
            monkeypatch.setenv(name, compose_default(str(value)))
    settings = load_settings()
    assert len(settings.model) == 3


def test_bind_mounted_files_exist():
    for service in _services().values():
        for host_path in _bind_mounts(service).values():
            assert host_path.exists(), host_path


def test_prometheus_scrapes_the_inferd_service():
    prometheus = _services()["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = load_yaml(mounts[config_arg.split("=", 1)[1]])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "inferd"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    inferd_ports = {p.split(":")[-1] for p in _services()["inferd"]["ports"]}
    assert targets and all(t.split(":")[0] in _services() for t in targets)
    assert any(t == f"inferd:{port}" for t in targets for port in inferd_ports)


def test_grafana_datasource_points_at_prometheus():
    mounts = _bind_mounts(_services()["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in _services()
    assert any(p.endswith(f"{url.port}:{url.port}") for p in _services()[url.hostname]["ports"])
    dashboard = json.loads((mounts["/var/lib/grafana/dashboards"] / "inferd.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == datasource["uid"]


def test_grafana_dashboard_provider_reads_the_mounted_folder():
    grafana = _services()["grafana"]
    mounts = _bind_mounts(grafana)
    (provider,) = load_yaml(mounts["/etc/grafana/provisioning"] / "dashboards" / "inferd.yml")["providers"]
    folder = provider["options"]["path"]
    assert folder in mounts and any(mounts[folder].glob("*.json"))
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[folder] / home.removeprefix(folder + "/")).is_file()


def test_cuda_override_reserves_a_gpu_and_uses_the_cuda_image():
    override = load_yaml(DEPLOY / "docker-compose.cuda.yml")["services"]["inferd"]
    assert override["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    (device,) = override["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
