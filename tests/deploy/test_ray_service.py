"""deploy/ray/rayservice.yaml, offline: the RayService validates strictly against KubeRay's own CRD
schema (pruned, tests/deploy/schemas/), its pod templates against Kubernetes' (kubernetes-validate),
its serveConfigV2 against Ray Serve's schema and inferd's settings, the application builds without
a cluster, and the cluster it asks for can hold the replicas it asks for."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from inferd.config.settings import ServerSettings, load_settings
from tests.deploy.assets import DEPLOY, REPO, container_env, parse_quantity, resource
from tests.deploy.schemas import prune_kuberay_crd
from tests.deploy.test_kubernetes import KUBERNETES_VERSIONS

RAY_SERVICE = DEPLOY / "ray" / "rayservice.yaml"
CRD_SCHEMA = Path(__file__).parent / "schemas" / "kuberay_rayservice_v1.schema.json"
# KubeRay's limits (ray-operator/controllers/ray/utils/constant.go and validation.go at the
# commit the schema records): the RayCluster name is the RayService's plus 6 characters, and
# "<cluster>-serve-svc" must fit a 63-character Service name.
MAX_RAY_SERVICE_NAME = 53 - 6
TOKEN_AUTH_MIN_RAY = Version("2.52.0")
# From this Ray on, KubeRay's injected liveness/readiness probes are HTTP GETs; before, they run
# wget in the container, and inferd's image (python:slim) has no wget.
HTTP_PROBES_MIN_RAY = Version("2.53.0")


@cache
def _doc() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(RAY_SERVICE.read_text()) if d is not None]
    return doc


def _cluster() -> dict:
    return _doc()["spec"]["rayClusterConfig"]


def _groups() -> list[tuple[str, dict]]:
    """(name, group spec) for the head group and each worker group."""
    workers = [(g["groupName"], g) for g in _cluster()["workerGroupSpecs"]]
    return [("head", _cluster()["headGroupSpec"]), *workers]


def _workers() -> list[dict]:
    return _cluster()["workerGroupSpecs"]


def _ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the first container of a pod template (utils.RayContainerIndex).
    return group["template"]["spec"]["containers"][0]


def _serve_config() -> dict:
    return yaml.safe_load(_doc()["spec"]["serveConfigV2"])


def _app_config() -> dict:
    (app,) = _serve_config()["applications"]
    return app


def _args() -> dict:
    return _app_config()["args"]


@pytest.fixture
def pod_env(monkeypatch) -> dict[str, str]:
    """The workers' INFERD_* variables, and only them, as the replicas' processes see them."""
    for name in [n for n in os.environ if n.startswith("INFERD_")]:
        monkeypatch.delenv(name)
    env = {k: v for k, v in container_env(_ray_container(_workers()[0])).items() if k.startswith("INFERD_")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _settings() -> ServerSettings:
    return load_settings(dict(_args()))


def _ray_cpus(group: dict) -> int:
    """The CPUs Ray offers on one pod of ``group``: rayStartParams' num-cpus, else what KubeRay
    derives from the Ray container (generateRayStartCommand in common/pod.go: the CPU limit, else
    the request, rounded up as Quantity.Value() does)."""
    if "num-cpus" in group.get("rayStartParams", {}):
        return int(group["rayStartParams"]["num-cpus"])
    resources = _ray_container(group).get("resources", {})
    for kind in ("limits", "requests"):
        if "cpu" in resources.get(kind, {}):
            return math.ceil(parse_quantity(resources[kind]["cpu"]))
    pytest.fail(f"{group.get('groupName', 'head')}: Ray would count the node's CPUs, not the pod's")


# KubeRay's CRD schema


@cache
def _crd_schema() -> dict:
    return json.loads(CRD_SCHEMA.read_text())


def _crd_validator() -> jsonschema.Validator:
    checker = jsonschema.FormatChecker()
    for name, bits in (("int32", 32), ("int64", 64)):
        # Kubernetes' integer formats: out of range is a rejection at the API server.
        checker.checks(name)(
            lambda v, bits=bits: not isinstance(v, int) or -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)
        )
    return jsonschema.Draft202012Validator(_crd_schema(), format_checker=checker)


def _crd_errors(doc: dict) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in _crd_validator().iter_errors(doc)]


def test_schema_records_its_source_and_kind():
    source = _crd_schema()["x-source"]
    assert source["repository"] == "https://github.com/ray-project/kuberay"
    assert source["path"] == "ray-operator/config/crd/bases/ray.io_rayservices.yaml"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    (gvk,) = _crd_schema()["x-kubernetes-group-version-kind"]
    assert _doc()["apiVersion"] == f"{gvk['group']}/{gvk['version']}" == "ray.io/v1"
    assert _doc()["kind"] == gvk["kind"] == "RayService"
    jsonschema.Draft202012Validator.check_schema(_crd_schema())


def test_ray_service_matches_kuberay_crd_schema():
    assert _crd_errors(_doc()) == []


@pytest.mark.parametrize(
    ("path", "misspelt"),
    [
        (("spec", "serveConfigV2"), "serveConfig"),
        (("spec", "rayClusterConfig", "enableInTreeAutoscaling"), "enableInTreeAutoScaling"),
        (("spec", "rayClusterConfig", "autoscalerOptions", "idleTimeoutSeconds"), "idleTimeoutSecond"),
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"), "rayStartParam"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "minReplica"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_crd_schema_rejects_a_misspelt_field(path, misspelt):
    # Guards the test above: the API server would drop an unknown field without a word, so the
    # pruned schema must be closed wherever upstream lists properties.
    broken = copy.deepcopy(_doc())
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[misspelt] = parent.pop(path[-1])
    errors = _crd_errors(broken)
    assert any(f"'{misspelt}' was unexpected" in e for e in errors), errors


def test_crd_schema_rejects_wrong_types_and_values():
    broken = copy.deepcopy(_doc())
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    broken["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 2**31
    errors = _crd_errors(broken)
    for path in ("maxReplicas", "upscalingMode", "num-cpus", "minReplicas"):
        assert any(path in e for e in errors), (path, errors)


def test_prune_script_closes_objects_and_prunes_only_pod_templates():
    pod_template = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object"},
            "spec": {"type": "object", "properties": {"containers": {"type": "array"}}},
        },
    }
    crd = {
        "metadata": {"name": "things.example.io"},
        "spec": {
            "group": "example.io",
            "names": {"kind": "Thing"},
            "versions": [
                {"name": "v1alpha1", "schema": {"openAPIV3Schema": {"type": "object"}}},
                {
                    "name": "v1",
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "pod": {"type": "object", "properties": {"template": pod_template}},
                                # a `template` that is no pod template stays
                                "other": {"type": "object", "properties": {"template": {"type": "string"}}},
                                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                "since": {"type": "string", "nullable": True},
                            },
                        }
                    },
                },
            ],
        },
    }
    schema = prune_kuberay_crd.prune(crd, commit="0" * 40, sha256="1" * 64)
    assert schema["x-source"]["pruned_pod_templates"] == 1
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": "example.io", "version": "v1", "kind": "Thing"}
    ]
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"pod": {"template": {"anything": 1}}, "other": {"template": "x"}})
    assert validator.is_valid({"open": {"x": 1}, "labels": {"a": "b"}, "since": None})
    assert not validator.is_valid({"pod": {"templates": {}}})
    assert not validator.is_valid({"other": {"template": 1}})
    assert not validator.is_valid({"unknown": 1})
    assert not validator.is_valid({"labels": {"a": 1}})


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD"), reason="set KUBERAY_CRD to the upstream CRD file")
def test_committed_schema_is_the_scripts_output():
    # KUBERAY_CRD=path/to/ray.io_rayservices.yaml (at the recorded commit) pytest ...
    import hashlib

    raw = Path(os.environ["KUBERAY_CRD"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == _crd_schema()["x-source"]["sha256"]
    schema = prune_kuberay_crd.prune(
        yaml.safe_load(raw),
        commit=_crd_schema()["x-source"]["commit"],
        sha256=hashlib.sha256(raw).hexdigest(),
    )
    assert prune_kuberay_crd.render(schema) == CRD_SCHEMA.read_text()


# The pod templates, as Kubernetes sees them


def _pod_template(name: str, group: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": f"{_doc()['metadata']['name']}-{name}"},
        "template": group["template"],
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("group", _groups(), ids=lambda g: g[0])
def test_pod_template_matches_kubernetes_schema(group, version):
    kubernetes_validate.validate(_pod_template(*group), version, strict=True)


def test_pod_template_validator_rejects_a_misspelt_field():
    # Guards the test above: the pod template is validated, not skipped as an unknown kind.
    name, group = copy.deepcopy(_groups()[-1])
    container = _ray_container(group)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_pod_template(name, group), KUBERNETES_VERSIONS[0], strict=True)


# What KubeRay's controller checks beyond the schema (utils/validation.go), and its probes


def test_kuberay_controller_rules():
    name = _doc()["metadata"]["name"]
    assert len(name) <= MAX_RAY_SERVICE_NAME
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), "not a DNS-1035 label"
    assert "name" not in _cluster()["headGroupSpec"].get("headService", {}).get("metadata", {})
    names = [g["groupName"] for g in _workers()]
    assert len(names) == len(set(names))
    for _, group in _groups():
        assert group["template"]["spec"]["containers"]
        # `resources` and rayStartParams must not both set resources (validateRayGroupResources).
        assert not group.get("resources")
    for group in _workers():
        assert (
            0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        )
    auth = _cluster().get("authOptions")
    if auth is not None and auth.get("mode", "token") == "token":  # KubeRay's default mode
        assert Version(_cluster()["rayVersion"]) >= TOKEN_AUTH_MIN_RAY
        assert not auth.get("enableK8sTokenAuth"), "not supported for a RayService"


def test_probes_work_without_wget():
    assert Version(_cluster()["rayVersion"]) >= HTTP_PROBES_MIN_RAY
    for group in _workers():
        # KubeRay's readiness probe for RayService workers is a wget command whatever the Ray
        # version; only a probe of our own replaces it.
        probe = _ray_container(group)["readinessProbe"]
        assert probe["httpGet"]["path"] == "/-/healthz"
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
        assert ports[probe["httpGet"]["port"]] == _serve_config()["http_options"]["port"]
    for _, group in _groups():
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert "exec" not in _ray_container(group).get(probe, {})


def test_kuberay_starts_ray_in_place_of_the_image_entrypoint():
    # KubeRay replaces the container command with `ray start` unless the command or args already
    # contain it; the image's ENTRYPOINT is inferd's CLI.
    for _, group in _groups():
        container = _ray_container(group)
        assert "command" not in container
        assert "args" not in container


# Versions and the image


def test_ray_version_fits_the_ray_extra_and_the_image_recipe():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray,) = [Requirement(r) for r in extras["ray"] if Requirement(r).name == "ray"]
    assert "serve" in ray.extras
    ray_version = _cluster()["rayVersion"]
    assert ray.specifier.contains(ray_version)
    readme = (DEPLOY / "README.md").read_text()
    assert f"ray[serve]=={ray_version}" in readme, "deploy/README.md builds the image with another Ray"
    images = {c["image"] for _, g in _groups() for c in g["template"]["spec"]["containers"]}
    (image,) = images
    assert f"-t {image} " in readme, f"deploy/README.md does not say how {image} is built"


def test_runs_as_the_images_non_root_user():
    users = re.findall(r"^USER\s+(\S+)", (DEPLOY / "Dockerfile.cpu").read_text(), re.MULTILINE)
    for _, group in _groups():
        pod_security = group["template"]["spec"]["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert users == [f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
        assert pod_security["fsGroup"] == pod_security["runAsGroup"]
        container_security = _ray_container(group)["securityContext"]
        assert container_security["allowPrivilegeEscalation"] is False
        assert container_security["capabilities"]["drop"] == ["ALL"]
        if container_security.get("readOnlyRootFilesystem"):
            # Ray writes its session under /tmp/ray.
            assert {"/tmp", "/home/inferd"} <= {m["mountPath"] for m in _ray_container(group)["volumeMounts"]}


# serveConfigV2: Ray Serve's schema, inferd's settings, the application


def _unknown_keys(model: type, data: Any, path: str = "") -> list[str]:
    """Keys in ``data`` that ``model`` (a pydantic model) does not declare, recursively. Ray Serve
    accepts unknown keys on purpose (forward compatibility), so a misspelt option passes its
    schema and is ignored."""
    if not isinstance(data, dict):
        return []
    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{path}{key}")
            continue
        for sub in _models_in(field.annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                where = f"{path}{key}[{i}]." if isinstance(value, list) else f"{path}{key}."
                unknown += _unknown_keys(sub, item, where)
    return unknown


def _models_in(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_serve_config_matches_ray_serve_schema():
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_serve_config())
    assert _unknown_keys(ServeDeploySchema, _serve_config()) == []
    (app,) = config.applications
    assert (app.name, app.import_path, app.route_prefix) == ("inferd", "inferd.scale.ray_serve:app", "/")
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 8000)


def test_serve_config_check_rejects_a_misspelt_field():
    # Guards the test above: Ray Serve's own schema lets these through.
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    broken = _serve_config()
    broken["http_option"] = broken.pop("http_options")
    broken["applications"][0]["route_prefx"] = broken["applications"][0].pop("route_prefix")
    ServeDeploySchema.model_validate(broken)
    assert set(_unknown_keys(ServeDeploySchema, broken)) == {"http_option", "applications[0].route_prefx"}


def test_args_are_inferd_settings(pod_env):
    settings = _settings()  # extra="forbid": a misspelt key fails here
    assert settings.api_key_file == Path(pod_env["INFERD_API_KEY_FILE"])
    assert settings.max_replicas and settings.max_replicas > settings.replicas, "no autoscaling"
    with pytest.raises(ValueError, match="replica"):
        load_settings({**_args(), "replica": 2})


def test_args_serve_what_the_single_pod_deployment_serves(pod_env):
    config = yaml.safe_load(resource("ConfigMap", "inferd-config")["data"]["config.yaml"])
    shared = {k: _args()[k] for k in config if k in _args()}
    assert shared == config, "args and deploy/kubernetes/configmap.yaml disagree"


def test_app_builds_with_the_autoscaling_asked_for(pod_env):
    pytest.importorskip("ray")
    # The step Ray Serve's controller runs on the cluster before deploying (no cluster needed).
    from ray.serve._private.build_app import build_app

    from inferd.scale import ray_serve

    settings = _settings()
    app = ray_serve.app(_args())
    built = build_app(app, name=_app_config()["name"])
    deployments = {d.name: d for d in built.deployments}
    assert set(deployments) == {"ingress", "engine"}
    assert built.ingress_deployment_name == "ingress"
    engine = deployments["engine"]
    autoscaling = engine._deployment_config.autoscaling_config
    assert autoscaling is not None, "a fixed replica count: max_replicas is ignored"
    assert (autoscaling.min_replicas, autoscaling.initial_replicas, autoscaling.max_replicas) == (
        _args()["replicas"],
        _args()["replicas"],
        _args()["max_replicas"],
    )
    assert autoscaling.target_ongoing_requests == _args()["autoscale_target"]
    assert engine.ray_actor_options["num_cpus"] == _args()["cpus_per_replica"]
    assert engine._deployment_config.graceful_shutdown_timeout_s == settings.drain_timeout
    (replica_settings,) = engine.init_args
    assert replica_settings.num_threads == int(_args()["cpus_per_replica"])
    assert replica_settings.api_key_file == Path(pod_env["INFERD_API_KEY_FILE"])
    assert deployments["ingress"].ray_actor_options["num_cpus"] == 0


# Consistency: capacity, ports, env, Secret and PVC


def test_head_offers_no_cpus_to_replicas():
    assert _cluster()["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _ray_cpus(_cluster()["headGroupSpec"]) == 0


def test_workers_hold_max_replicas(pod_env):
    settings = _settings()
    assert _cluster()["enableInTreeAutoscaling"] is True, "Serve's autoscaling would get no new pods"
    capacity = sum(g["maxReplicas"] * _ray_cpus(g) for g in _workers())
    assert capacity >= settings.max_replicas * settings.cpus_per_replica
    # A replica cannot span pods: count whole replicas per pod.
    per_pod = [_ray_cpus(g) // settings.cpus_per_replica for g in _workers()]
    assert all(n >= 1 for n in per_pod), "cpus_per_replica is more than a worker pod offers"
    assert sum(g["maxReplicas"] * n for g, n in zip(_workers(), per_pod)) >= settings.max_replicas
    # The minimum pods hold the minimum replicas, so a deploy does not wait on the autoscaler.
    assert sum(g["minReplicas"] * n for g, n in zip(_workers(), per_pod)) >= settings.replicas


def test_workers_offer_no_more_than_the_pod_has(pod_env):
    settings = _settings()
    for group in _workers():
        resources = _ray_container(group)["resources"]
        for key in ("cpu", "memory"):
            assert parse_quantity(resources["requests"][key]) == parse_quantity(resources["limits"][key])
        assert _ray_cpus(group) <= parse_quantity(resources["limits"]["cpu"])
        per_pod = int(_ray_cpus(group) // settings.cpus_per_replica)
        # memory_budget bounds a replica's weights, activations and KV cache (otherwise sized
        # from what the pod's cgroup has free at start); Ray's own processes need the rest.
        assert settings.memory_budget is not None and settings.kv_cache_memory is not None
        assert settings.kv_cache_memory < settings.memory_budget
        assert per_pod * settings.memory_budget < parse_quantity(resources["limits"]["memory"])


def test_container_ports_match_http_options():
    http = _serve_config()["http_options"]
    assert http["host"] == "0.0.0.0"
    for _, group in _groups():
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
        assert ports["serve"] == http["port"]
    assert _args().get("port", http["port"]) == http["port"]


def test_inferd_env_is_the_same_on_every_pod():
    envs = [
        {k: v for k, v in container_env(_ray_container(g)).items() if k.startswith("INFERD_")}
        for _, g in _groups()
    ]
    assert all(env == envs[0] for env in envs), "the builder and the replicas would read other settings"
    unknown = [n for n in envs[0] if n.removeprefix("INFERD_").lower() not in ServerSettings.model_fields]
    assert not unknown, f"not inferd settings: {unknown}"


def _volumes(group: dict) -> dict[str, dict]:
    return {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}


def test_every_mount_names_a_volume():
    for _, group in _groups():
        for mount in _ray_container(group).get("volumeMounts", []):
            assert mount["name"] in _volumes(group)


def test_api_key_file_comes_from_the_secret():
    secret = resource("Secret")
    for group in _workers():
        container = _ray_container(group)
        key_file = container_env(container)["INFERD_API_KEY_FILE"]
        found = [
            (mount, _volumes(group)[mount["name"]]["secret"])
            for mount in container["volumeMounts"]
            if "secret" in _volumes(group)[mount["name"]]
            and key_file.startswith(mount["mountPath"].rstrip("/") + "/")
        ]
        assert found, f"{key_file} is not on a mounted Secret"
        ((mount, source),) = found
        assert source["secretName"] == secret["metadata"]["name"]
        item = key_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
        keys = {i["key"] for i in source["items"] if i["path"] == item}
        assert keys and keys <= set(secret["stringData"])
        assert mount.get("readOnly") is True


def test_secret_references_name_the_secret():
    secret = resource("Secret")
    for _, group in _groups():
        for env in _ray_container(group).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"]
                # A key the example Secret leaves commented out must be optional.
                assert ref["key"] in secret["stringData"] or ref.get("optional") is True


def test_model_cache_is_on_the_pvc():
    pvc = resource("PersistentVolumeClaim")
    for group in _workers():
        container = _ray_container(group)
        (mount,) = [
            m
            for m in container["volumeMounts"]
            if _volumes(group)[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
            == pvc["metadata"]["name"]
        ]
        root = mount["mountPath"].rstrip("/") + "/"
        env = container_env(container)
        assert env["HF_HOME"].startswith(root)
        assert env["INFERD_CACHE_DIR"].startswith(root)


def test_plain_service_does_not_select_ray_pods():
    # deploy/kubernetes/service.yaml fronts the single-pod Deployment; Ray pods in the same
    # namespace must not join it (KubeRay's serve Service fronts them).
    selector = resource("Service", "inferd")["spec"]["selector"]
    for _, group in _groups():
        labels = group["template"]["metadata"]["labels"]
        assert not selector.items() <= labels.items()
