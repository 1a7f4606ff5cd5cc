"""The ``inferd`` command as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inferd import __version__
from tests.conftest import free_port

INFERD = [sys.executable, "-m", "inferd"]


def test_version_and_help():
    assert subprocess.run([*INFERD, "version"], capture_output=True, text=True).stdout.strip() == __version__
    help_text = subprocess.run(
        [*INFERD, "serve", "--help"], capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"}
    ).stdout
    for flag in ("--model", "--host", "--port", "--config", "--max-batch-tokens", "--max-queued-items"):
        assert flag in help_text
    assert "INFERD_MAX_BATCH_TOKENS" in help_text


def test_a_true_by_default_setting_can_be_turned_off_by_flag(monkeypatch):
    """Every boolean setting has --x/--no-x: a bare flag could only ever say true."""
    from typer.testing import CliRunner

    from inferd.cli import models, serve
    from inferd.cli.main import app

    seen = {}
    monkeypatch.setattr(models, "prepare_to_serve", lambda settings, check_only: None)
    monkeypatch.setattr(serve, "run", lambda settings: seen.update(settings=settings))
    for flags, expected in (([], True), (["--no-enable-prefix-caching"], False), (["--enable-prefix-caching"], True)):
        result = CliRunner().invoke(app, ["serve", "--model", "x", *flags])
        assert result.exit_code == 0, result.output
        assert seen.pop("settings").enable_prefix_caching is expected


def test_bad_settings_exit_with_a_message():
    result = subprocess.run([*INFERD, "serve", "--model", "x,kind=poem"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown model kind" in result.stderr


def test_serve_answers_then_exits_cleanly_on_sigterm(tiny_embedder: Path):
    port = free_port()
    process = subprocess.Popen(
        [*INFERD, "serve", "--model", f"{tiny_embedder}=tiny", "--port", str(port), "--num-threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "tiny", "input": "the cat"}
        )
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_a_model_that_cannot_load_stops_the_server(tmp_path):
    result = subprocess.run(
        [*INFERD, "serve", "--model", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no config.json" in result.stdout + result.stderr


def test_version_json_names_the_kernel_build_this_cpu_runs():
    from inferd.llm.runner.kernels import variants

    report = json.loads(subprocess.run([*INFERD, "version", "--json"], capture_output=True, text=True).stdout)
    assert report["version"] == __version__
    assert report["kernels"] == variants.runnable()[0].name  # every level is built by make install
