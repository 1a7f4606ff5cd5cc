"""Slow, idle and non-reading clients over real sockets: each is cut at its deadline, the connection
cap holds, and nobody else waits on them."""

import contextlib
import json
import socket
import threading
import time

import httpx
import psutil
import pytest

from inferd.config import load_settings
from tests.conftest import free_port, live_server, wait_for

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
WRITE_TIMEOUT = 1.0
MAX_CONNECTIONS = 300
SLACK = 4.0  # scheduling on a busy two-core machine; each deadline is far below it in production
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}], "ignore_eos": True}


@pytest.fixture(scope="module")
def server(long_llama):
    settings = load_settings(
        {
            "model": [f"{long_llama}=tiny-chat"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 64 * 2**20,
            "header_timeout": HEADER_TIMEOUT,
            "body_timeout": BODY_TIMEOUT,
            "stream_write_timeout": WRITE_TIMEOUT,
            "max_connections": MAX_CONNECTIONS,
        }
    )
    with live_server(settings) as url:
        # The first generation pays for one-time work (kernels, caches): not what is measured here.
        warm = httpx.post(url + "/v1/chat/completions", json=CHAT | {"max_tokens": 2}, timeout=60)
        assert warm.status_code == 200
        yield url


def _address(url: str) -> tuple[str, int]:
    return "127.0.0.1", int(url.rsplit(":", 1)[1])


def _post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is open at ``deadline``."""
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the connection is still open ({len(data)} bytes read)") from None
        if not chunk:
            return data
        data += chunk


def _timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def test_idle_sockets_and_trickled_bodies_are_cut_and_hold_nobody_up(server):
    address = _address(server)
    idle = [socket.create_connection(address) for _ in range(200)]
    trickled = [socket.create_connection(address) for _ in range(20)]
    for sock in trickled:
        sock.sendall(_post_head("/v1/chat/completions", 10_000) + b"{")
    endless_headers = [socket.create_connection(address) for _ in range(10)]  # slowloris
    for sock in endless_headers:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
    opened = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:  # every 0.2 s: a header line, never the last; a body byte, never the last
        while not stop.wait(0.2):
            if time.monotonic() - opened < BODY_TIMEOUT - 0.5:  # stopping before the deadline
                for sock in trickled:
                    sock.send(b" ")
            for sock in endless_headers:
                with contextlib.suppress(OSError):  # cut already, as it should be
                    sock.send(b"X-More: 1\r\n")

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        health, health_s = _timed(lambda: httpx.get(server + "/health", timeout=10))
        chat, chat_s = _timed(
            lambda: httpx.post(server + "/v1/chat/completions", json=CHAT | {"max_tokens": 2}, timeout=10)
        )
        assert health.status_code == 200 and health_s < 1.0
        assert chat.status_code == 200 and chat_s < 1.0
        for sock in idle + endless_headers:
            assert _read_until_closed(sock, opened + HEADER_TIMEOUT + SLACK) == b""
        for sock in trickled:
            reply = _read_until_closed(sock, opened + BODY_TIMEOUT + SLACK)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), reply[:200]
            assert json.loads(body)["error"]["code"] == "body_timeout"
    finally:
        stop.set()
        feeder.join(5)
        for sock in idle + trickled + endless_headers:
            sock.close()


def test_connections_past_the_cap_get_503(server):
    held = [socket.create_connection(_address(server)) for _ in range(MAX_CONNECTIONS)]
    try:
        refused = httpx.get(server + "/health", timeout=10)
    finally:
        for sock in held:
            sock.close()
    assert refused.status_code == 503
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health", timeout=10).status_code != 200:  # the cap counts open sockets only
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_stream_nobody_reads_is_cut_and_buffers_little(server):
    client = next(iter(server.app.state.models)).client
    lifecycle = server.app.state.lifecycle
    process = psutil.Process()
    baseline = process.memory_info().rss
    body = json.dumps(
        CHAT | {"stream": True, "max_tokens": 16_000, "n": 4, "logprobs": True, "top_logprobs": 20}
    ).encode()  # ~7 KB of events per step: about 3 minutes of output at this model's speed
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.connect(_address(server))
    try:
        sock.sendall(_post_head("/v1/chat/completions", len(body)) + body)
        sock.settimeout(30)
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        stopped = time.monotonic()  # from here on the client reads nothing
        peak = baseline
        while lifecycle.num_in_flight or client.stats().num_running or client.stats().num_waiting:
            assert time.monotonic() - stopped < 30, "the stream nobody reads was not cut"
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.1)
        rest = _read_until_closed(sock, time.monotonic() + 10)
    finally:
        sock.close()
    # Closed, not finished: a full stream would end with [DONE] (or an error event and [DONE]).
    assert b"data: [DONE]" not in head + rest
    assert peak - baseline < 50 * 2**20, f"the server grew by {(peak - baseline) / 2**20:.0f} MB"


def test_an_unread_stream_is_aborted_by_its_output_bound_before_any_socket_deadline(long_llama):
    """The engine-side bound (--max-buffered-outputs) holds for a real chat stream: the deltas a
    client leaves unread must wait in the request's own bounded buffer, not in a queue in front of
    it, so the request is aborted long before the write deadline would cut the socket."""
    settings = load_settings(
        {
            "model": [f"{long_llama}=tiny-chat"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 64 * 2**20,
            "max_buffered_outputs": 16,
            "stream_write_timeout": 600,  # the socket side never fires in this test
        }
    )
    body = json.dumps(CHAT | {"stream": True, "max_tokens": 16_000, "n": 2, "top_logprobs": 20, "logprobs": True})
    with live_server(settings) as url:
        client = next(iter(url.app.state.models)).client
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(_address(url))
        try:
            sock.sendall(_post_head("/v1/chat/completions", len(body)) + body.encode())
            sock.settimeout(30)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            stopped = time.monotonic()  # from here on the client reads nothing
            wait_for(lambda: len(client.engine.scheduler.running) == 2, timeout=30)
            wait_for(lambda: not client.engine.has_work and not client._collectors, timeout=60)
            assert time.monotonic() - stopped < 60
        finally:
            sock.close()
