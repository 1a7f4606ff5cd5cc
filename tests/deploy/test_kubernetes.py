"""The Kubernetes manifests: schema-valid (kubernetes-validate's bundled schemas, offline, strict),
and consistent with each other, with the image and with inferd's settings."""

from __future__ import annotations

import copy
import os
import re

import kubernetes_validate
import pytest
import yaml

from inferd.config.settings import ServerSettings, load_settings
from tests.deploy.assets import (
    DEPLOY,
    KUBERNETES,
    container_env,
    kubernetes_resources,
    parse_quantity,
    resource,
)
from tests.deploy.metric_names import METRICS

# The oldest Kubernetes these manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def _deployment() -> dict:
    return resource("Deployment", "inferd")


def _pod() -> dict:
    return _deployment()["spec"]["template"]["spec"]


def _container() -> dict:
    (container,) = _pod()["containers"]
    return container


def _env() -> dict[str, str]:
    return container_env(_container())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "item",
    kubernetes_resources(),
    ids=lambda item: f"{item[0].relative_to(KUBERNETES)}:{item[1]['kind']}",
)
def test_manifest_matches_schema(item, version):
    _, doc = item
    kubernetes_validate.validate(doc, version, strict=True)


def test_validator_rejects_a_misspelt_field():
    # Guards the test above: strict validation must catch an unknown field, not skip the kind.
    broken = copy.deepcopy(_deployment())
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_expected_kinds_present():
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in kubernetes_resources()}
    for expected in (
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "PersistentVolumeClaim"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("v1", "Secret"),
        ("v1", "ConfigMap"),
    ):
        assert expected in kinds


def test_probes_hit_health_and_ready_on_the_container_port():
    container = _container()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port_names.get(port, port) == int(_env()["INFERD_PORT"])


def test_startup_probe_allows_a_slow_model_load():
    startup = _container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # The liveness probe must not be the one that waits for the load.
    assert "initialDelaySeconds" not in _container()["livenessProbe"]


def test_grace_period_outlasts_prestop_and_drain():
    drain = float(_env()["INFERD_DRAIN_TIMEOUT"])
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert _pod()["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def test_runs_as_the_images_non_root_user():
    pod_security = _pod()["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        users = re.findall(r"^USER\s+(\S+)", (DEPLOY / dockerfile).read_text(), re.MULTILINE)
        assert users == [f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    assert pod_security["fsGroup"] == pod_security["runAsGroup"]
    container_security = _container()["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_read_only_root_has_writable_tmp_and_home():
    if not _container()["securityContext"].get("readOnlyRootFilesystem"):
        pytest.skip("root filesystem is writable")
    mounts = {m["mountPath"] for m in _container()["volumeMounts"]}
    assert {"/tmp", "/home/inferd"} <= mounts


def test_resources_requests_within_limits_and_threads_match_cpu():
    resources = _container()["resources"]
    for key in ("cpu", "memory"):
        assert parse_quantity(resources["requests"][key]) <= parse_quantity(resources["limits"][key])
    assert int(_env()["INFERD_NUM_THREADS"]) == parse_quantity(resources["limits"]["cpu"])


def test_model_cache_is_on_the_pvc():
    pvc = resource("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    (mount,) = [
        m
        for m in _container()["volumeMounts"]
        if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]
    root = mount["mountPath"].rstrip("/") + "/"
    assert _env()["HF_HOME"].startswith(root)
    assert _env()["INFERD_CACHE_DIR"].startswith(root)


def test_api_key_file_comes_from_the_secret():
    secret = resource("Secret")
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    key_file = _env()["INFERD_API_KEY_FILE"]
    for mount in _container()["volumeMounts"]:
        source = volumes[mount["name"]].get("secret")
        if source and key_file.startswith(mount["mountPath"].rstrip("/") + "/"):
            assert source["secretName"] == secret["metadata"]["name"]
            item = key_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
            keys = {i["key"] for i in source["items"] if i["path"] == item}
            assert keys and keys <= set(secret["stringData"])
            assert mount.get("readOnly") is True
            return
    pytest.fail(f"{key_file} is not on a mounted Secret")


def test_example_secret_holds_placeholders_only():
    secret = resource("Secret")
    keys = [k for k in secret["stringData"]["api-keys"].splitlines() if k and not k.startswith("#")]
    assert keys and all(k.startswith("REPLACE-ME") for k in keys)


def test_env_and_config_file_are_valid_inferd_settings(tmp_path, monkeypatch):
    # Every INFERD_* name is a setting, and the env values plus the ConfigMap's config.yaml load
    # through inferd's own settings loader.
    env = _env()
    unknown = [
        n
        for n in env
        if n.startswith("INFERD_") and n.removeprefix("INFERD_").lower() not in ServerSettings.model_fields
    ]
    assert not unknown, f"not inferd settings: {unknown}"
    config = resource("ConfigMap", "inferd-config")["data"]["config.yaml"]
    assert set(yaml.safe_load(config)) <= set(ServerSettings.model_fields)
    path = tmp_path / "config.yaml"
    path.write_text(config)
    for name in [n for n in os.environ if n.startswith("INFERD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("INFERD_"):
            monkeypatch.setenv(name, value)
    settings = load_settings(config_file=path)
    assert settings.port == int(env["INFERD_PORT"])
    assert settings.drain_timeout == float(env["INFERD_DRAIN_TIMEOUT"])
    assert settings.model, "the ConfigMap serves no model"


def test_config_file_is_mounted_where_args_point():
    args = _container()["args"]
    config_path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    (mount,) = [m for m in _container()["volumeMounts"] if m["mountPath"] == config_path]
    config_map = volumes[mount["name"]]["configMap"]["name"]
    assert config_map == resource("ConfigMap", "inferd-config")["metadata"]["name"]
    assert mount["subPath"] in resource("ConfigMap", "inferd-config")["data"]


def test_service_selects_the_pods_and_targets_the_port():
    deployment = _deployment()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resource("Service", "inferd")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in _container()["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_prometheus_annotations_point_at_metrics():
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == int(_env()["INFERD_PORT"])
    assert _env().get("INFERD_PUBLIC_METRICS") == "true" or "INFERD_API_KEY_FILE" not in _env()


def test_hpa_scales_the_deployment_on_waiting_requests():
    hpa = resource("HorizontalPodAutoscaler")
    deployment = _deployment()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "inferd_num_requests_waiting"
    # Slow model loads: scale down more cautiously than up.
    behavior = hpa["spec"]["behavior"]
    assert (
        behavior["scaleDown"]["stabilizationWindowSeconds"]
        > behavior["scaleUp"]["stabilizationWindowSeconds"]
    )


def test_adapter_rule_exposes_the_hpa_metric():
    import promql_parser

    hpa_metric = resource("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    config = yaml.safe_load(resource("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = config["rules"]
    series = re.search(r'__name__="([^"]+)"', rule["seriesQuery"]).group(1)
    assert series in METRICS
    assert re.fullmatch(rule["name"]["matches"], series)
    assert re.sub(rule["name"]["matches"], rule["name"]["as"], series) == hpa_metric
    assert ":" not in hpa_metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # The templated query, filled in the way the adapter fills it, is valid PromQL.
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"inferd-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    promql_parser.parse(query)
