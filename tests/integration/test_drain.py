"""SIGTERM drains `inferd serve`: accepted streams all finish with [DONE], later requests get 503,
then the process exits 0."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

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
