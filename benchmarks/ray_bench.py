"""Scale-out on Ray: prefix-affinity routing against Ray Serve's default, and 2 x 1 core against 1 x 2.

A shared-prefix chat load, the shape retrieval and agent applications send: ``--groups`` groups of
requests, each group sharing a long system prompt (a role and a retrieved context, ~``--system-words``
words), each request its own short question; requests go out interleaved across groups (group 0's
first, group 1's first, ..., group 0's second, ...) through ``--concurrency`` workers, streamed,
temperature 0, ``max_tokens`` tokens with EOS ignored. Every system prompt opens with a marker of
this run, so no cache holds any of it at the start.

Configurations, each a fresh ``inferd serve`` on the bundled SmolLM2-135M-Instruct (fp32):
  single    one server, both cores (``--num-threads 2``)
  prefix    ``--replicas 2 --cpus-per-replica 1``: Ray Serve, inferd's prefix-affinity router
  pow2      the same with ``--ray-routing power-of-two``: Ray Serve's default router

Per configuration: the prefix-cache hit rate (cached prompt tokens over prompt tokens, from each
answer's ``usage.prompt_tokens_details.cached_tokens``), TTFT p50/p90 (request sent to first content),
output tokens/s over the wall time, and how requests spread over replicas (``x-inferd-replica``).

    .venv/bin/python benchmarks/ray_bench.py --json benchmarks/out/<dir>/ray.json
    .venv/bin/python benchmarks/ray_bench.py --from-json benchmarks/out/<dir>/ray.json   # re-render
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from harness import OUT_DIR, ROOT, Running, free_port, percentile

MODEL = "smollm2-135m-instruct"
CONFIGS = {
    "single": ["--num-threads", "2"],
    "prefix": ["--replicas", "2", "--cpus-per-replica", "1"],
    "pow2": ["--replicas", "2", "--cpus-per-replica", "1", "--ray-routing", "power-of-two"],
}
TOPICS = ("billing", "shipping", "returns", "warranty", "accounts", "security", "pricing", "support",
          "refunds", "delivery", "orders", "coupons", "privacy", "payments", "loyalty", "invoices")


@dataclass
class Server:
    name: str
    command: list[str]
    base_url: str
    ready_path: str = "/ready"
    env: dict[str, str] = field(default_factory=dict)
    venv: Path | None = None


@dataclass
class Answer:
    group: int
    ttft_s: float | None = None
    end_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    replica: str = ""
    error: str | None = None


def system_prompt(group: int, words: int, tag: str) -> str:
    topic = TOPICS[group % len(TOPICS)]
    facts = " ".join(f"Fact {i} about {topic}: item {group}-{i} applies to {topic} case {i}." for i in range(words // 10))
    return f"[{tag}] You are the {topic} assistant of shop {group}. Answer from this context only. {facts}"


def requests_for(groups: int, per_group: int, words: int, tag: str) -> list[tuple[int, list[dict]]]:
    systems = [system_prompt(g, words, tag) for g in range(groups)]
    return [
        (g, [{"role": "system", "content": systems[g]},
             {"role": "user", "content": f"Question {k}: what does fact {k * 3 + 1} say?"}])
        for k in range(per_group)
        for g in range(groups)
    ]


async def one(client: httpx.AsyncClient, url: str, group: int, messages: list[dict], max_tokens: int) -> Answer:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    answer = Answer(group)
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            answer.replica = response.headers.get("x-inferd-replica", "")
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("error"):
                    answer.error = str(event["error"])[:200]
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content") and answer.ttft_s is None:
                        answer.ttft_s = time.perf_counter() - t0
                usage = event.get("usage")
                if usage:
                    answer.prompt_tokens = usage["prompt_tokens"]
                    answer.completion_tokens = usage["completion_tokens"]
                    answer.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.end_s = time.perf_counter() - t0
    return answer


async def run_load(url: str, work: list[tuple[int, list[dict]]], concurrency: int, max_tokens: int) -> dict:
    queue = list(reversed(work))
    answers: list[Answer] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            group, messages = queue.pop()
            answers.append(await one(client, url, group, messages, max_tokens))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [a for a in answers if a.error is None]
    ttfts = [a.ttft_s for a in ok if a.ttft_s is not None]
    prompt = sum(a.prompt_tokens for a in ok)
    groups_per_replica: dict[str, set[int]] = {}
    for a in ok:
        groups_per_replica.setdefault(a.replica, set()).add(a.group)
    return {
        "requests": len(answers),
        "errors": [a.error for a in answers if a.error],
        "wall_s": wall,
        "output_tok_s": sum(a.completion_tokens for a in ok) / wall,
        "prefix_hit_rate": sum(a.cached_tokens for a in ok) / prompt if prompt else None,
        "prompt_tokens_mean": prompt / len(ok) if ok else None,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p90_s": percentile(ttfts, 0.9),
        "requests_per_replica": dict(Counter(a.replica for a in ok)),
        "groups_split_over_replicas": sum(
            1 for g in {a.group for a in ok} if sum(g in gs for gs in groups_per_replica.values()) > 1
        ),
        "answers": [asdict(a) for a in answers],
    }


def bench(config: str, args: argparse.Namespace, log_dir: Path) -> dict:
    port = free_port()
    exe = str(ROOT / ".venv" / "bin" / "inferd")
    cmd = [exe, "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--log-level", "warning", "--kv-cache-memory", args.kv_cache_memory, *CONFIGS[config]]
    server = Server(config, cmd, f"http://127.0.0.1:{port}")
    tag = f"{config}-{uuid.uuid4().hex[:8]}"  # cold: no cache holds this run's prompts
    with Running(server, log_dir, log_prefix="ray-") as running:
        ready_s = running.wait_ready()
        if "--replicas" in CONFIGS[config]:  # /ready answers once one replica does: wait for both
            ready_s += wait_replicas(server.base_url, 2)
        result = asyncio.run(run_load(server.base_url, requests_for(args.groups, args.per_group, args.system_words,
                                                                    tag), args.concurrency, args.max_tokens))
    result.update(config=config, command=" ".join(cmd[1:]), ready_s=ready_s)
    return result


def wait_replicas(url: str, count: int, timeout: float = 600) -> float:
    """Seconds until ``count`` replicas have answered /metrics (all in one scrape under prefix
    routing; across scrapes under power-of-two, whose router pins nothing)."""
    t0 = time.perf_counter()
    seen: set[str] = set()
    while time.perf_counter() - t0 < timeout:
        response = httpx.get(url + "/metrics", timeout=30, trust_env=False)
        seen.add(response.headers.get("x-inferd-replica", ""))
        seen.update(line.split('replica="', 1)[1].split('"', 1)[0] for line in response.text.splitlines()
                    if 'replica="' in line)
        if len(seen - {""}) >= count:
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise RuntimeError(f"{url} never had {count} replicas")


def render(report: dict) -> str:
    lines = [
        f"{report['workload']}; CPU: {report['cpu']}; commit {report['commit']}",
        "",
        "| configuration | prefix hit rate | TTFT p50 | TTFT p90 | output tok/s | groups split | requests per replica |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        spread = ", ".join(str(n) for n in sorted(r["requests_per_replica"].values(), reverse=True))
        lines.append(
            f"| {r['config']} (`{' '.join(CONFIGS[r['config']])}`) | {r['prefix_hit_rate']:.1%} | "
            f"{r['ttft_p50_s'] * 1000:.0f} ms | {r['ttft_p90_s'] * 1000:.0f} ms | {r['output_tok_s']:.1f} | "
            f"{r['groups_split_over_replicas']} of {report['groups']} | {spread} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="single,prefix,pow2")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=6)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory", default=str(2**30), help="bytes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="render a report written by --json")
    args = parser.parse_args(argv)
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    report = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "commit": commit.stdout.strip(),
        "groups": args.groups,
        "workload": (f"{args.groups} groups x {args.per_group} requests, ~{args.system_words}-word shared system "
                     f"prompt per group, interleaved, concurrency {args.concurrency}, {args.max_tokens} tokens "
                     f"each (EOS ignored), {MODEL} fp32"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [],
    }
    log_dir = (args.json.parent if args.json else OUT_DIR)
    for config in args.configs.split(","):
        report["results"].append(bench(config, args, log_dir))
        print(render(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
