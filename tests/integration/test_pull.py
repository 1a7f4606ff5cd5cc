"""`inferd pull` (and estimate, serve --pull) as a user runs them, against a local fake hub.

Each command is a real subprocess with HF_ENDPOINT pointing at tests/fakehub.py, so the real
huggingface_hub download code runs: metadata API, HEAD/GET resolve, LFS redirects, Range resumes.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from tests.fakehub import FakeHub, FakeHubServer

INFERD = [sys.executable, "-m", "inferd"]
BIG = "model.safetensors"


def big_weights() -> bytes:
    """A valid safetensors file of 24 MiB: more than huggingface_hub's 10 MiB download chunk, so a
    connection dropped half-way leaves whole chunks on disk to resume after."""
    rng = np.random.default_rng(0)
    return save({"padding": rng.standard_normal(6 * 2**20, dtype=np.float32)})


@pytest.fixture(scope="module")
def hub(tiny_llama):
    llama_files = {p.name: p.read_bytes() for p in tiny_llama.iterdir() if p.is_file()}
    config = llama_files["config.json"]
    fake = FakeHub()
    fake.add_repo("acme/tiny-llama", llama_files)
    fake.add_repo("acme/big", {"config.json": config, BIG: big_weights(), "README.md": b"# big"})
    fake.add_repo("acme/no-weights", {"config.json": config, "README.md": b"# nothing here"})
    fake.add_repo("acme/broken", {"config.json": b"{oops", BIG: llama_files[BIG]})
    fake.add_repo(
        "acme/tiny-GGUF",
        {"tiny.Q4_K_M.gguf": b"GGUF" + bytes(1000), "tiny.Q8_0.gguf": b"GGUF" + bytes(2000), "README.md": b"#"},
    )
    index = {"metadata": {"total_size": 8 * 10**9}, "weight_map": {}}
    fake.add_repo(
        "acme/sharded",
        {"config.json": config, "model.safetensors.index.json": json.dumps(index).encode(),
         "model-00001-of-00002.safetensors": b"x" * 100, "model-00002-of-00002.safetensors": b"y" * 100},
    )  # fmt: skip
    with FakeHubServer(fake) as running:
        yield running


@pytest.fixture
def env(hub, tmp_path):
    hub.requests.clear()
    return os.environ | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "INFERD_CACHE_DIR": str(tmp_path / "inferd"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "COLUMNS": "200",
    }


def inferd(env, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*INFERD, *args], env=env, capture_output=True, text=True, timeout=120, **kwargs)


def registered(env) -> list[str]:
    registry = Path(env["INFERD_CACHE_DIR"]) / "models.json"
    return [m["name"] for m in json.loads(registry.read_text())["models"]] if registry.exists() else []


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".incomplete")]


def test_an_interrupted_transfer_resumes_and_the_file_is_verified(hub, env, tmp_path):
    # No INFERD_CACHE_DIR: the registry goes under HOME and the files into the Hugging Face cache.
    env = {k: v for k, v in env.items() if k != "INFERD_CACHE_DIR"} | {"HOME": str(tmp_path / "home")}
    hub.drop_once.add(BIG)
    result = inferd(env, "pull", "acme/big")
    assert result.returncode == 0, result.stderr
    gets = hub.fetched(BIG)
    assert len(gets) == 2
    assert gets[0][2] is None
    assert gets[1][2].startswith("bytes=") and int(gets[1][2].split("=")[1].rstrip("-")) > 0
    assert "Trying to resume download" in result.stderr
    snapshot = next((tmp_path / "hf" / "hub" / "models--acme--big" / "snapshots").iterdir())
    expected = hashlib.sha256(hub.repos["acme/big"][BIG]).hexdigest()
    assert hashlib.sha256((snapshot / BIG).read_bytes()).hexdigest() == expected
    registry = json.loads((tmp_path / "home" / ".cache" / "inferd" / "models.json").read_text())
    (entry,) = registry["models"]
    assert (entry["name"], entry["kind"], entry["path"]) == ("acme/big", "chat", str(snapshot))
    assert "total" in result.stderr and "model.safetensors" in result.stderr  # the progress bars


def test_list_show_and_rm_of_a_pulled_model(hub, env, tmp_path):
    result = inferd(env | {"HF_TOKEN": "hf_secret"}, "pull", "acme/tiny-llama", "--quiet", "--exclude", "generation_*")
    assert result.returncode == 0, result.stderr
    assert hub.fetched("generation_config.json") == [] and hub.fetched("/config.json") != []
    assert "Bearer hf_secret" in hub.authorizations
    rows = {row["name"]: row for row in json.loads(inferd(env, "list", "--json").stdout)}
    pulled = rows["acme/tiny-llama"]
    assert (pulled["kind"], pulled["architecture"], pulled["origin"]) == ("chat", "LlamaForCausalLM", "huggingface")
    assert pulled["num_params"] > 0 and pulled["size_bytes"] > 0
    assert "all-minilm-l6-v2" in rows  # bundled models are listed too
    shown = json.loads(inferd(env, "show", "acme/tiny-llama", "--json").stdout)
    assert (shown["layers"], shown["kv_heads"], shown["chat_template"]) == (2, 2, True)
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    assert any((repo / "blobs").iterdir())
    assert inferd(env, "rm", "acme/tiny-llama").returncode == 1  # no --yes, no terminal to confirm
    assert registered(env) == ["acme/tiny-llama"]
    result = inferd(env, "rm", "acme/tiny-llama", "--yes")
    assert result.returncode == 0, result.stderr
    assert not repo.exists()
    assert registered(env) == []


def test_unknown_repo_is_a_clear_error_and_nothing_is_registered(env):
    result = inferd(env, "pull", "acme/does-not-exist")
    assert result.returncode == 1
    assert "repository 'acme/does-not-exist' was not found on http://127.0.0.1" in result.stderr
    assert registered(env) == []


def test_unknown_revision_is_a_clear_error(env):
    result = inferd(env, "pull", "acme/tiny-llama@v9")
    assert result.returncode == 1
    assert "revision 'v9' of acme/tiny-llama was not found" in result.stderr


def test_a_repo_without_weights_is_refused_before_downloading(hub, env):
    result = inferd(env, "pull", "acme/no-weights")
    assert result.returncode == 1
    assert "acme/no-weights has no weight files to pull (it holds: config.json, README.md)" in result.stderr
    assert hub.fetched("") == []
    assert registered(env) == []


def test_a_corrupt_config_is_not_registered(env):
    result = inferd(env, "pull", "acme/broken")
    assert result.returncode == 1
    assert "config.json is not valid JSON" in result.stderr
    assert registered(env) == []


def test_a_quantisation_tag_picks_one_gguf_file(hub, env):
    result = inferd(env, "pull", "acme/tiny-GGUF:q4_k_m")
    assert result.returncode == 0, result.stderr
    assert [path for _, path, _ in hub.fetched(".gguf")] == ["tiny.Q4_K_M.gguf"]
    assert result.stdout.strip().endswith("tiny.Q4_K_M.gguf")
    missing = inferd(env, "pull", "acme/tiny-GGUF:Q2_K")
    assert missing.returncode == 1
    assert "no GGUF file in acme/tiny-GGUF matches 'Q2_K'; GGUF files: tiny.Q4_K_M.gguf, tiny.Q8_0.gguf" in missing.stderr
    assert registered(env) == ["acme/tiny-GGUF:q4_k_m"]


def test_a_file_whose_hash_differs_from_the_hub_listing_is_removed(hub, env, tmp_path):
    hub.corrupt.add("tiny.Q8_0.gguf")
    try:
        result = inferd(env, "pull", "acme/tiny-GGUF:tiny.Q8_0.gguf", "--quiet")
    finally:
        hub.corrupt.clear()
    assert result.returncode == 1
    assert "downloaded tiny.Q8_0.gguf is corrupt (its sha256 differs from the hub's); it was removed" in result.stderr
    assert list((tmp_path / "hf" / "hub" / "models--acme--tiny-GGUF" / "blobs").iterdir()) == []
    assert registered(env) == []


def test_malformed_name_is_refused(env):
    result = inferd(env, "pull", "not a/model name")
    assert result.returncode == 1
    assert "is neither a bundled name" in result.stderr


def test_offline_without_the_model_cached_says_what_to_do(env):
    result = inferd(env | {"HF_HUB_OFFLINE": "1"}, "pull", "acme/tiny-llama")
    assert result.returncode == 1
    assert "is not in the local cache" in result.stderr and "HF_ENDPOINT" in result.stderr
    serve = inferd(env, "serve", "--model", "acme/tiny-llama", "--check")
    assert serve.returncode == 1
    assert "run `inferd pull acme/tiny-llama` or serve with --pull" in serve.stderr
    assert "set HF_ENDPOINT to use a mirror" in serve.stderr


def test_a_full_disk_fails_cleanly_and_removes_the_partial_file(env, tmp_path):
    limit = 4 * 2**20  # files may not grow past 4 MiB: the 24 MiB weights cannot be written

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = inferd(env, "pull", "acme/big", "--quiet", preexec_fn=small_disk)
    assert result.returncode == 1
    assert "no space left to download acme/big (File too large); the partial file was removed" in result.stderr
    assert leftovers(tmp_path) == []
    blobs = tmp_path / "hf" / "hub" / "models--acme--big" / "blobs"
    assert all(p.stat().st_size < limit for p in blobs.iterdir())
    assert registered(env) == []


def test_ctrl_c_leaves_no_half_registered_model(hub, env, tmp_path):
    hub.stall.add(BIG)
    hub.stalled.clear()
    hub.release.clear()
    # A suite started in the background (`make test &`) has SIGINT ignored, and a child inherits
    # that: Python then installs no KeyboardInterrupt handler. Give the child the default back.
    process = subprocess.Popen(
        [*INFERD, "pull", "acme/big", "--quiet"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert hub.stalled.wait(60)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        hub.stall.clear()
        hub.release.set()
    assert process.returncode == 130, stderr
    assert "interrupted; nothing was registered" in stderr
    assert leftovers(tmp_path) == []
    assert registered(env) == []


def test_estimate_of_a_hub_id_fetches_config_and_index_only(hub, env):
    result = inferd(env, "estimate", "acme/sharded", "--json", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_params"] == 2 * 10**9  # total_size 8e9 bytes of float32 (the tiny config's dtype)
    assert report["params_from"] == "safetensors index"
    assert report["weight_bytes"] == 4 * 10**9
    fetched = [path for _, path, _ in hub.fetched("")]
    assert sorted(fetched, key=len)[-2:] != [] and all(not p.endswith(".safetensors") for p in fetched)
    assert {p.rsplit("/", 1)[-1] for p in fetched} == {"config.json", "model.safetensors.index.json"}


def test_serve_pull_fetches_what_is_missing_then_plans(env):
    result = inferd(env, "serve", "--model", "acme/tiny-llama=tiny", "--pull", "--check", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "pulling acme/tiny-llama" in result.stderr
    # JSON logs (the default) hold only JSON lines: no progress bars before logging was set up.
    assert all(json.loads(line) for line in result.stderr.replace("\r", "\n").splitlines() if line.strip())
    assert "memory plan on cpu" in result.stdout and "tiny: weights" in result.stdout
    assert registered(env) == ["acme/tiny-llama"]


def test_offline_error_needs_no_http_client_beyond_the_runtime_dependencies(env, tmp_path):
    """``httpx`` comes with the dev extras only (huggingface_hub 2.x uses ``httpx2``): a runtime
    install printed ModuleNotFoundError instead of the offline message."""
    blocker = tmp_path / "no_httpx"
    blocker.mkdir()
    (blocker / "httpx.py").write_text("raise ImportError('httpx is not installed here')\n")
    runtime_only = env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(blocker)}
    result = inferd(runtime_only, "pull", "no-such-org/no-such-model")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "is not in the local cache" in result.stderr


def test_an_unreachable_hub_is_one_clear_error():
    import httpx2

    from inferd.hub.download import map_hub_error
    from inferd.hub.names import parse_model_name

    mapped = map_hub_error(parse_model_name("acme/tiny"), httpx2.ConnectError("connection refused"))
    assert "cannot reach the model hub" in str(mapped)
