"""Optional tracing: with the otel extra, spans reach the OTLP endpoint; without it, a clear refusal."""

import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from inferd.api.app import create_app
from inferd.config import load_settings
from tests.conftest import free_port, live_server


def _has(name: str) -> bool:
    """Whether a module can be imported; find_spec raises when a parent package is missing (Ray
    installs opentelemetry.sdk but not opentelemetry.instrumentation)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


HAS_OTEL = all(
    _has(name) for name in ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation.fastapi")
)


@pytest.mark.skipif(HAS_OTEL, reason="the otel extra is installed")
def test_tracing_without_the_extra_is_refused(tiny_embedder):
    settings = load_settings({"model": [str(tiny_embedder)], "otlp_endpoint": "http://127.0.0.1:1/v1/traces"})
    with pytest.raises(ValueError, match=r"inferd\[otel\]"):
        create_app(settings)


@pytest.mark.skipif(not HAS_OTEL, reason="needs the otel extra: pip install 'inferd[otel]'")
def test_spans_reach_the_otlp_endpoint(tiny_embedder):
    received: list[str] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            received.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
    settings = load_settings(
        {"model": [f"{tiny_embedder}=tiny"], "port": free_port(), "num_threads": 1, "otlp_endpoint": endpoint}
    )
    try:
        with live_server(settings) as url:
            assert httpx.post(url + "/embed", json={"inputs": "the cat"}).status_code == 200
        # Stopping the server shuts the tracer provider down, which flushes the spans.
        assert "/v1/traces" in received
    finally:
        collector.shutdown()
