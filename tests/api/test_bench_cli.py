"""``inferd bench`` run through the CLI against a live server of tiny random models.

The chat model spells any text byte by byte (tests.models.build_byte_llama), so each cold marker
really is a different token sequence, and its template adds a default system prompt, as SmolLM2's
does: the part of every prompt a prefix cache may share. (The word-level tiny_llama would turn every
hex marker into the same <unk> tokens.)
"""

import json

import httpx
import pytest
from typer.testing import CliRunner

from inferd.bench.prompts import cold_marker
from inferd.cli.main import app
from inferd.config import load_settings
from tests.conftest import free_port, live_server
from tests.models import build_byte_llama

BLOCK = 8  # the server's KV block size: only whole blocks come from the prefix cache
TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant that "
    "answers briefly.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = [
    "the cat sat on the mat",
    "paris is the capital of france",
    "dogs bark at the moon",
    "rain falls on the sea",
]
TEXTS = ["the cat purr", "dogs bark at the moon", "paris is the capital", "rain", "the sun and the sea"]


@pytest.fixture(scope="module")
def chat_model(model_root):
    return build_byte_llama(model_root, "bench-chat", TEMPLATE)


@pytest.fixture(scope="module")
def tokenize(chat_model):
    """The chat prompt's token ids as the server renders them (its chat template, read by transformers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)

    def ids(content):
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    return ids


@pytest.fixture(scope="module")
def server(chat_model, tiny_embedder, tiny_cross_encoder):
    chat = chat_model
    settings = load_settings(
        {
            "model": [
                f"{chat}=bench-chat",
                f"{tiny_embedder}=tiny-embed",
                f"{tiny_cross_encoder}=tiny-rerank",
            ],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 4 * 2**20,
            "block_size": BLOCK,
        }
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (root / "queries.txt").write_text("the cat\nthe moon\n")
    return root


def bench(*args):
    return CliRunner().invoke(app, ["bench", *args], catch_exceptions=False)


def common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def whole_blocks(n):
    return n // BLOCK * BLOCK


@pytest.fixture(scope="module")
def cold_run(server, files):
    out = files / "cold.json"
    result = bench(
        "chat", "--url", server, "--model", "bench-chat", "--concurrency", "1,4", "--requests", "8",
        "--max-tokens", "8", "--ignore-eos", "--warmup", "2", "--prompts", str(files / "prompts.txt"),
        "--slo-ttft-ms", "60000", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text()), out


def test_chat_report_counts_every_request_and_token(cold_run):
    result, report, _ = cold_run
    assert report["format"] == "inferd-bench/1" and report["kind"] == "chat"
    assert report["route"] == "/v1/chat/completions" and report["model"] == "bench-chat"
    assert report["settings"]["max_tokens"] == 8 and report["settings"]["ignore_eos"] is True
    assert report["command"].startswith("inferd bench chat --url ")
    assert "--ignore-eos" in report["command"] and "--concurrency 1,4" in report["command"]
    assert report["warmup"]["requests"] == 2 and report["warmup"]["errors"] == 0
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        samples = level["samples"]
        assert len(samples) == level["requests"] == 8
        assert all(s["error"] is None and s["status"] == 200 for s in samples)
        assert [s["output_tokens"] for s in samples] == [8] * 8  # ignore_eos: max_tokens each
        assert [s["finish_reason"] for s in samples] == ["length"] * 8
        for s in samples:
            assert s["ttft_ms"] == s["deltas_ms"][0]
            assert 0 < s["ttft_ms"] <= s["e2e_ms"]
            assert s["deltas_ms"] == sorted(s["deltas_ms"]) and s["deltas_ms"][-1] <= s["e2e_ms"]
            assert s["start_ms"] + s["e2e_ms"] <= level["wall_s"] * 1000 + 0.01
        summary = level["summary"]
        assert (summary["requests"], summary["errors"], summary["output_tokens"]) == (8, 0, 64)
        assert summary["tokens_from"] == "usage" and summary["short_answers"] == 0
        assert summary["output_tokens_per_s"] == round(64 / level["wall_s"], 4)
        assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
        # Every request started within the generous SLO: goodput is the whole throughput.
        assert summary["goodput"]["share"] == 1.0
        assert summary["goodput"]["output_tokens_per_s"] == summary["output_tokens_per_s"]
    assert "TTFT ms p50/p90/p99" in result.stdout and "goodput" in result.stdout


def test_cold_markers_leave_the_prefix_cache_only_the_shared_template_part(cold_run, tokenize):
    _, report, _ = cold_run
    run_id = report["run_id"]
    samples = [s for level in report["levels"] for s in level["samples"]]
    warmup = [cold_marker(run_id, "warmup", i) + " " + PROMPTS[i] for i in range(2)]
    measured = [s["marker"] + " " + PROMPTS[s["prompt"]] for s in samples]
    assert len(set(measured + warmup)) == 18
    ids = [tokenize(text) for text in warmup + measured]
    shared = min(common(ids[0], other) for other in ids[1:])  # the system prompt, "<|im_start|>user\n["
    assert whole_blocks(shared) >= BLOCK  # the template's shared part spans whole blocks
    for k, s in enumerate(samples):
        mine = ids[len(warmup) + k]
        closest = max(common(mine, other) for j, other in enumerate(ids) if j != len(warmup) + k)
        assert closest < shared + BLOCK  # markers part within a block past the shared part
        assert s["prompt_tokens"] == len(mine)
        # Hits: the template's shared part (warmed up), never the request's own text.
        assert whole_blocks(shared) <= s["cached_tokens"] <= whole_blocks(closest)


def test_without_cold_markers_repeated_prompts_hit_the_prefix_cache(server, files, tokenize):
    out = files / "warm.json"
    result = bench(
        "chat", "--url", server, "--model", "bench-chat", "-c", "1", "-n", "6", "--max-tokens", "2",
        "--warmup", "1", "--no-cold", "--prompts", str(files / "prompts.txt"), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = json.loads(out.read_text())["levels"][0]["samples"]
    assert [s["marker"] for s in samples] == [None] * 6
    assert [s["prompt"] for s in samples] == [0, 1, 2, 3, 0, 1]
    shared = common(tokenize(PROMPTS[0]), tokenize(PROMPTS[1]))
    for s in samples[:4]:  # first seen: only the template's part
        assert s["cached_tokens"] <= whole_blocks(shared + BLOCK)
    for s in samples[4:]:  # seen before: every whole block of the prompt but the last token's
        assert s["cached_tokens"] == whole_blocks(s["prompt_tokens"] - 1) > whole_blocks(shared + BLOCK)


def test_render_reproduces_the_table(cold_run):
    result, _, path = cold_run
    rendered = bench("render", str(path))
    assert rendered.exit_code == 0, rendered.output
    assert rendered.stdout == result.stdout
    stricter = bench("render", str(path), "--slo-ttft-ms", "0.001")
    assert "SLO TTFT <= 0.001 ms" in stricter.stdout and "0%, 0.000" in stricter.stdout


def test_wrong_model_is_reported_as_errors_and_exit_code_1(server, files):
    out = files / "wrong.json"
    result = bench(
        "chat", "--url", server, "--model", "no-such-model", "-c", "2", "-n", "3", "--warmup", "0",
        "--max-tokens", "2", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 1
    level = json.loads(out.read_text())["levels"][0]
    assert level["summary"]["errors"] == 3 and level["summary"]["ok"] == 0
    for s in level["samples"]:
        assert s["status"] == 404 and s["error"].startswith("HTTP 404: {")
        assert "no-such-model" in s["error"]
    assert "3 x HTTP 404" in result.stdout
    # With a warm-up, the run stops at once with the server's message.
    early = bench("chat", "--url", server, "--model", "no-such-model", "-c", "1", "-n", "3", "--warmup", "1")
    assert early.exit_code == 1 and "every warm-up request failed: HTTP 404" in early.output


def http_requests(url, route):
    """inferd's own count of answered requests to ``route`` (its /metrics)."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("inferd:http_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_embed_tei_and_rerank_cohere_use_their_routes(server, files):
    before = {r: http_requests(server, r) for r in ("/embed", "/v1/embeddings", "/v1/rerank", "/rerank")}
    out = files / "embed.json"
    result = bench(
        "embed", "--url", server + "/v1", "--api", "tei", "-c", "1,2", "-n", "4", "--batch", "3",
        "--warmup", "1", "--texts", str(files / "texts.txt"), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["route"] == "/embed" and report["model"] is None  # TEI's routes take no model
    assert [lv["summary"]["passages"] for lv in report["levels"]] == [12, 12]

    out = files / "rerank.json"
    result = bench(
        "rerank", "--url", server, "--api", "cohere", "-c", "2", "-n", "3", "--documents", "4", "--top-n", "2",
        "--warmup", "0", "--texts", str(files / "texts.txt"), "--queries", str(files / "queries.txt"),
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["route"] == "/v1/rerank" and report["model"] == "tiny-rerank"  # first rerank model listed
    assert report["levels"][0]["summary"]["pairs"] == 12
    after = {r: http_requests(server, r) for r in before}
    assert after["/embed"] - before["/embed"] == 1 + 8
    assert after["/v1/rerank"] - before["/v1/rerank"] == 3
    assert after["/v1/embeddings"] == before["/v1/embeddings"] and after["/rerank"] == before["/rerank"]


def test_api_key_is_sent_but_never_written(server, files, monkeypatch):
    monkeypatch.setenv("INFERD_API_KEY", "sk-secret-value")
    out = files / "key.json"
    result = bench(
        "embed", "--url", server, "-c", "1", "-n", "1", "--warmup", "0", "--texts", str(files / "texts.txt"),
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output  # the server has no keys: it ignores the header
    assert "sk-secret" not in out.read_text()
    assert json.loads(out.read_text())["model"] == "tiny-embed"
