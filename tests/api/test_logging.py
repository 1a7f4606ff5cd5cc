"""Request ids and access logs: one JSON line per request, no prompt text unless asked."""

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from inferd.api.logs import JsonFormatter, configure_logging
from inferd.config import load_settings
from tests.conftest import free_port, live_server

KEY = {"Authorization": "Bearer sk-logs"}
SECRET = "zebra quokka"  # words a prompt holds and the logs must not


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def captured() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("inferd")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _access(lines: list[str], request_id: str) -> dict:
    entries = [json.loads(line) for line in lines]
    matching = [e for e in entries if e["logger"] == "inferd.access" and e["request_id"] == request_id]
    assert len(matching) == 1, entries
    return matching[0]


def test_request_ids_are_honoured_or_generated(secured_server):
    given = httpx.get(secured_server + "/v1/models", headers=KEY | {"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    generated = httpx.get(secured_server + "/v1/models", headers=KEY)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    refused = httpx.get(secured_server + "/v1/models", headers={"X-Request-ID": "bad\tid"})
    assert refused.status_code == 401 and re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])


def test_access_lines_carry_the_request_but_no_prompt_text(secured_server):
    with captured() as log:
        chat = httpx.post(
            secured_server + "/v1/chat/completions",
            headers=KEY | {"X-Request-ID": "chat-1"},
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 3},
        )
        embed = httpx.post(
            secured_server + "/embed", headers=KEY | {"X-Request-ID": "embed-1"}, json={"inputs": SECRET}
        )
    assert chat.status_code == embed.status_code == 200
    line = _access(log.lines, "chat-1")
    usage = chat.json()["usage"]
    assert line["route"] == "/v1/chat/completions" and line["status"] == 200 and line["key"] == "logs"
    assert line["model"] == "tiny-chat" and line["latency_ms"] > 0
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert _access(log.lines, "embed-1")["model"] == "tiny-embed"
    text = "\n".join(log.lines)
    assert "zebra" not in text and "quokka" not in text
    assert "request_body" not in text


@pytest.fixture(scope="module")
def logging_server(tiny_embedder):
    settings = load_settings(
        {
            "model": [f"{tiny_embedder}=tiny-embed"],
            "port": free_port(),
            "num_threads": 1,
            "log_requests": True,
        }
    )
    with live_server(settings) as url:
        yield url


def test_log_requests_puts_bodies_in_the_access_line(logging_server):
    with captured() as log:
        httpx.post(logging_server + "/embed", headers={"X-Request-ID": "with-body"}, json={"inputs": SECRET})
    line = _access(log.lines, "with-body")
    assert SECRET in line["request_body"] and line["response_body"].startswith("[[")


def test_text_and_json_formats(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "json")
        logging.getLogger("inferd.test").info("hello %s", "there", extra={"fields": {"status": 200}})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["message"] == "hello there" and line["status"] == 200 and line["level"] == "info"
        configure_logging("info", "text")
        logging.getLogger("inferd.test").info("plain")
        assert capsys.readouterr().err.strip().endswith("INFO inferd.test: plain")
        # A client's %0a in a logged path cannot start a forged line.
        logging.getLogger("inferd.access").info("POST %s 404", "/x\n2026-01-01 INFO inferd.access: forged\r")
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.endswith("POST /x\\n2026-01-01 INFO inferd.access: forged\\r 404")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_a_bug_is_one_500_logged_with_its_request_id(secured_server, monkeypatch):
    client = next(m.client for m in secured_server.app.state.models if m.name == "tiny-embed")

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(client, "embed", broken)
    with captured() as log:
        response = httpx.post(
            secured_server + "/embed", headers=KEY | {"X-Request-ID": "bug-1"}, json={"inputs": "x"}
        )
    assert response.status_code == 500 and response.json()["error_type"] == "Backend"
    assert response.headers["x-request-id"] == "bug-1"
    errors = [json.loads(line) for line in log.lines if '"level":"error"' in line]
    assert len(errors) == 1 and "bug-1" in errors[0]["message"] and "RuntimeError" in errors[0]["exception"]
    assert _access(log.lines, "bug-1")["status"] == 500


def test_json_logs_hold_only_json_lines_warnings_and_bars_included(capsys):
    import faulthandler
    import warnings

    from tqdm.auto import tqdm

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.captureWarnings(False)  # undo an earlier test's capture: pytest records warnings per test
    try:
        configure_logging("info", "json")
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
        records = [json.loads(line) for line in lines]  # raises on a bar or a raw warning
        assert [r["logger"] for r in records] == ["py.warnings"]
        assert "a library's warning" in records[0]["message"]
        assert faulthandler.is_enabled()  # a crash in native code leaves the threads' stacks
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.captureWarnings(False)
