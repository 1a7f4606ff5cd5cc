"""`inferd pull PATH / list / show / rm` on local models, and `serve`'s memory plan (--check, refusal).

No network is involved, so the commands run in-process (typer's runner) with their own cache dir.
"""

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from inferd.cli.main import app


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def env(tmp_path):
    return {"INFERD_CACHE_DIR": str(tmp_path / "inferd"), "COLUMNS": "200"}


def inferd(env, *args) -> Result:
    result = CliRunner().invoke(app, list(args), env=env)
    return Result(result.exit_code, result.stdout, result.stderr)


def test_a_local_folder_is_registered_in_place_and_rm_keeps_its_files(env, tiny_embedder):
    before = sorted(p.name for p in tiny_embedder.rglob("*"))
    result = inferd(env, "pull", str(tiny_embedder), "--name", "tiny")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tiny: embedding model at {tiny_embedder}"
    rows = {r["name"]: r for r in json.loads(inferd(env, "ls", "--json").stdout)}
    assert (rows["tiny"]["origin"], rows["tiny"]["kind"], rows["tiny"]["path"]) == ("local", "embedding", str(tiny_embedder))
    shown = json.loads(inferd(env, "show", "tiny", "--json").stdout)
    assert (shown["pooling"], shown["dimensions"], shown["layers"], shown["hidden_size"]) == ("mean", 16, 2, 32)
    check = inferd(env, "serve", "--model", "tiny", "--check", "--device", "cpu")
    assert check.returncode == 0, check.stderr
    assert "tiny: weights" in check.stdout
    assert inferd(env, "rm", "tiny", "--yes").returncode == 0
    assert sorted(p.name for p in tiny_embedder.rglob("*")) == before
    assert "tiny" not in {r["name"] for r in json.loads(inferd(env, "ls", "--json").stdout)}


def test_show_bundled_models(env):
    assert inferd(env, "pull", "all-minilm-l6-v2").stdout.strip() == "all-minilm-l6-v2 is bundled with inferd; nothing to pull"
    minilm = json.loads(inferd(env, "show", "all-minilm-l6-v2", "--json").stdout)
    assert (minilm["kind"], minilm["pooling"], minilm["dimensions"], minilm["parameters"]) == (
        "embedding", "mean", 384, 22_713_216,
    )  # fmt: skip
    smol = inferd(env, "show", "smollm2-135m-instruct")
    assert smol.returncode == 0
    for line in ("layers             30", "kv_heads           3", "head_dim           64", "context_length     8192",
                 "chat_template      True", "dtype              GGUF Q4_1"):  # fmt: skip
        assert line in smol.stdout


def test_bad_names_and_missing_models_exit_1(env, tmp_path):
    assert "not a pulled or registered model" in inferd(env, "rm", "nothing-here", "--yes").stderr
    assert "is bundled with inferd" in inferd(env, "rm", "all-minilm-l6-v2", "--yes").stderr
    shown = inferd(env, "show", "org/never-pulled")
    assert shown.returncode == 1 and "inferd pull org/never-pulled" in shown.stderr
    (tmp_path / "empty").mkdir()
    pulled = inferd(env, "pull", str(tmp_path / "empty"))
    assert pulled.returncode == 1 and "has no config.json" in pulled.stderr
    assert not (tmp_path / "inferd" / "models.json").exists()


def test_serve_refuses_with_exit_2_when_the_budget_is_too_small(env, tiny_llama, tiny_embedder):
    result = inferd(
        env, "serve", "--model", f"{tiny_llama}=chat", "--model", f"{tiny_embedder}=embed",
        "--device", "cpu", "--dtype", "float32", "--memory-budget", str(100 * 2**20),
    )  # fmt: skip
    assert result.returncode == 2
    assert "the models do not fit in memory" in result.stderr
    assert "but the budget is 100.0 MiB" in result.stderr
    assert "without embed" in result.stderr and "--dtype bfloat16" in result.stderr
    short = inferd(
        env, "serve", "--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32",
        "--kv-cache-memory", str(16 * 512),
    )  # fmt: skip
    assert short.returncode == 2
    assert "less than one sequence of --max-model-len 256" in short.stderr
    assert "--max-model-len 16" in short.stderr
