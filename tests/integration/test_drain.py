"""SIGTERM drains `inferd serve`: accepted streams all finish with [DONE], later requests get 503,
then the process exits 0; a body still uploading counts as in flight; a stream still running when the
drain's time is up ends with an error event and [DONE]."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inferd.config import load_settings
from tests.conftest import free_port, live_server

NUM_STREAMS = 16
MAX_TOKENS = 120
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}], "ignore_eos": True}


def _start(tiny_llama: Path, port: int, log: Path) -> subprocess.Popen:
    command = [
        *(sys.executable, "-m", "inferd", "serve"),
        *("--model", f"{tiny_llama}=tiny-chat", "--port", str(port), "--num-threads", "1"),
        *("--kv-cache-memory", str(4 * 2**20), "--max-num-seqs", "8", "--drain-timeout", "60"),
    ]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> bool:
    """True once ready; False if the port was taken meanwhile (the server exits, the caller retries)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text()
            assert "address already in use" in text, f"the server exited while starting:\n{text[-3000:]}"
            return False
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not get ready")


def _serve(tiny_llama: Path, log: Path) -> tuple[str, subprocess.Popen]:
    # The port is free when picked, but an outgoing connection may take it before the server binds.
    for _ in range(3):
        port = free_port()
        process = _start(tiny_llama, port, log)
        if _wait_ready(f"http://127.0.0.1:{port}", process, log):
            return f"http://127.0.0.1:{port}", process
    raise AssertionError("no free port three times in a row")


async def _stream(client: httpx.AsyncClient, accepted: asyncio.Event) -> tuple[int, list[str]]:
    body = CHAT | {"stream": True, "max_tokens": MAX_TOKENS}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = []
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                accepted.set()
        accepted.set()
        return response.status_code, lines


async def _drain_scenario(url: str, process: subprocess.Popen):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        accepted = [asyncio.Event() for _ in range(NUM_STREAMS)]
        streams = [asyncio.create_task(_stream(client, event)) for event in accepted]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in accepted)), 60)
        process.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=url, timeout=30) as fresh:
            while (await fresh.get("/ready")).status_code != 503:
                await asyncio.sleep(0.01)
            late = await fresh.post("/v1/chat/completions", json=CHAT | {"max_tokens": 2})
        in_flight = sum(not task.done() for task in streams)
        return await asyncio.gather(*streams), late, in_flight


def test_sigterm_drains_streams_then_exits_cleanly(tiny_llama: Path, tmp_path: Path):
    log = tmp_path / "server.log"
    url, process = _serve(tiny_llama, log)
    try:
        results, late, in_flight = asyncio.run(_drain_scenario(url, process))
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert in_flight > 0, "the streams ended before the late request: the drain was not exercised"
    assert late.status_code == 503, late.text
    assert late.json()["error"]["code"] == "service_unavailable" and "retry-after" in late.headers
    for status, lines in results:
        assert status == 200
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert not any("error" in event for event in events)
        assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert "draining" in log.read_text()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _read_until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_body_still_uploading_is_drained_like_any_request(tiny_llama: Path):
    settings = load_settings(
        {"model": [f"{tiny_llama}=tiny-chat"], "port": free_port(), "num_threads": 1}
        | {"kv_cache_memory": 4 * 2**20, "drain_timeout": 30}
    )
    with live_server(settings) as url:
        body = json.dumps(CHAT | {"max_tokens": 2}).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", settings.port)) as sock:
            sock.sendall(head.encode() + body[:10])
            time.sleep(0.5)  # the server has the headers and is reading the body
            url.server.handle_exit(signal.SIGTERM, None)
            _wait_for(lambda: url.app.state.lifecycle.is_draining)
            # Past uvicorn's own grace period (2 s): only the drain can still be waiting for it.
            time.sleep(3)
            sock.sendall(body[10:])
            reply = _read_until_closed(sock)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b'"finish_reason":"length"' in payload


def test_a_stream_past_the_drain_timeout_ends_with_an_error_event_and_done(long_llama: Path):
    settings = load_settings(
        {"model": [f"{long_llama}=tiny-chat"], "port": free_port(), "num_threads": 1}
        | {"kv_cache_memory": 16 * 2**20, "drain_timeout": 1}
    )
    with live_server(settings) as url:
        body = CHAT | {"stream": True, "max_tokens": 10_000}  # about two minutes of tokens
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            url.server.handle_exit(signal.SIGTERM, None)
            rest = [line for line in lines if line]
    assert first.startswith("data: {") and len(rest) >= 2
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert "drain timeout 1s" in error["message"] and error["type"] == "server_error"
    assert not any("error" in json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-2]])
