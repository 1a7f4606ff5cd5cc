"""The Grafana dashboard: every query is valid PromQL (promql-parser) over metric names from the one
list in metric_names.py, each name spelt once (the hidden m_* constant variables), and the panels
the issue asks for are there."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest

from tests.deploy.assets import DEPLOY
from tests.deploy.metric_names import COUNTER, GAUGE, HISTOGRAM, METRICS, series_kind

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inferd.json"
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
# Values Grafana substitutes for its built-in and multi-value variables when it runs a query.
_BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h", "model": ".*"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _constants() -> dict[str, str]:
    return {v["name"]: v["query"] for v in _dashboard()["templating"]["list"] if v["type"] == "constant"}


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in _panels() for target in panel["targets"]]


def _expand(expr: str) -> str:
    values = {**_BUILTINS, **_constants()}

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"undefined dashboard variable ${name}"
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _selectors(node) -> list[promql_parser.VectorSelector]:
    found = []
    promql_parser.walk(
        node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None
    )
    return found


def test_metric_names_are_spelt_once_as_constants():
    constants = _constants()
    assert constants, "no m_* constant variables"
    assert all(name.startswith("m_") for name in constants)
    assert set(constants.values()) <= set(METRICS), set(constants.values()) - set(METRICS)
    assert len(set(constants.values())) == len(constants), "a metric name has two variables"
    for title, expr in _queries():
        assert "inferd:" not in expr, f"{title}: literal metric name instead of a ${{m_*}} variable"


@pytest.mark.parametrize("title,expr", _queries(), ids=[q[0] for q in _queries()])
def test_query_is_valid_promql_over_known_series(title, expr):
    ast = promql_parser.parse(_expand(expr))
    names = [s.name for s in _selectors(ast)]
    assert names
    for name in names:
        assert series_kind(name), f"{title}: {name} is not in metric_names.METRICS"


def test_quantiles_read_histogram_buckets_by_le():
    quantile_queries = [(t, e) for t, e in _queries() if "histogram_quantile" in e]
    assert quantile_queries
    for title, expr in quantile_queries:
        for selector in _selectors(promql_parser.parse(_expand(expr))):
            assert series_kind(selector.name)[1] == f"{HISTOGRAM}_bucket", title
        assert re.search(r"by \(le\b", expr), f"{title}: histogram_quantile must aggregate by le"


def test_rate_is_taken_of_counters_and_never_of_gauges():
    for title, expr in _queries():
        rated = {_expand(v) for v in re.findall(r"rate\((\$\{m_\w+\})", expr)}
        for variable in re.findall(r"\$\{m_\w+\}", expr):
            metric = _expand(variable)
            if METRICS[metric] == GAUGE:
                assert metric not in rated, f"{title}: rate() of gauge {metric}"
            else:
                assert metric in rated, f"{title}: {METRICS[metric]} {metric} shown without rate()"


@pytest.mark.parametrize(
    "metric",
    [
        "inferd:time_to_first_token_seconds",
        "inferd:inter_token_latency_seconds",
        "inferd:generation_tokens_total",
        "inferd:num_requests_waiting",
        "inferd:num_requests_running",
        "inferd:kv_cache_usage_perc",
        "inferd:encoder_batch_size",
        "inferd:encoder_queue_size",
        "inferd:http_requests_total",
    ],
)
def test_required_metric_has_a_panel(metric):
    used = {s.name for _, e in _queries() for s in _selectors(promql_parser.parse(_expand(e)))}
    assert {series_kind(s)[0] for s in used} >= {metric}


def test_http_requests_are_split_by_status():
    assert any("${m_http_requests}" in e and "by (status)" in e for _, e in _queries())


def test_panels_use_the_datasource_variable_and_have_unique_ids():
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_panels_fit_the_grid_without_overlap():
    cells = set()
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        area = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


def test_metric_list_matches_what_the_server_exports():
    from prometheus_client.parser import text_string_to_metric_families

    from inferd.api.metrics import Metrics

    exported = {f.name: f.type for f in text_string_to_metric_families(Metrics().render().decode())}
    # The exposition names a counter family without its _total suffix.
    listed = {
        (name.removesuffix("_total") if kind == COUNTER else name): kind for name, kind in METRICS.items()
    }
    assert listed == exported
