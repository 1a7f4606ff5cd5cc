"""The chat engine in process (no HTTP, no server): llm_bench.py's 64 prompts through C workers
(default 32), 128 greedy tokens each with EOS ignored, on the bundled SmolLM2-135M-Instruct as
`serve` loads it. What llm_bench's served figure would be with no event loop, no load generator
and nothing else on the cores: the gap between the two is what the rest of the machine costs.

Rounds alternate "quiet" and, with --busy, "busy": another process spinning 1.2 ms of every 10 ms
(12 % of one core) while the round runs. Every round sends prompts no earlier round sent (each
opens with inferd bench's cold marker), after one untimed warm-up round. Per round: output tokens
over the wall time, and the mean time of a step and of its native decoder call (the layers' one
call into the kernels, timed around it).

With --ttft, each round instead prefills --ttft prompts one at a time, spec_bench's ~1,600-token
RAG prompts (chat-templated, cold), and records each one's time to its first token (max_tokens 1):
the prefill of a long retrieved context, alone on the engine.

    .venv/bin/python benchmarks/engine_bench.py --quantization int8 --busy --json benchmarks/out/<dir>/engine.json
    .venv/bin/python benchmarks/engine_bench.py --ttft 8 --json benchmarks/out/<dir>/ttft.json
    .venv/bin/python benchmarks/engine_bench.py --from-json benchmarks/out/<dir>/engine.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import add_report_args, render_from_json, save_and_render, timed
from llm_bench import CHATS
from ray_bench import cpu_model

import inferd
from inferd.bench.prompts import cold_marker, with_marker
from inferd.config.settings import load_settings
from inferd.hub.bundled import bundled_model_path
from inferd.llm import engine as engine_module
from inferd.llm.client import LLMClient
from inferd.llm.params import SamplingParams
from inferd.llm.runner import kernels

BUSY = """
import time
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.0012:
        pass
    time.sleep(0.0088)
"""


class Clock:
    """Steps and seconds: LLMEngine.step and NativeOps.decoder_layers, timed around each call."""

    def __init__(self) -> None:
        self.reset()
        engine_module.LLMEngine.step = timed(engine_module.LLMEngine.step, self.recorder("step"))
        kernels.NativeOps.decoder_layers = timed(kernels.NativeOps.decoder_layers, self.recorder("native"))

    def reset(self) -> None:
        self.seconds = {"step": 0.0, "native": 0.0}
        self.calls = {"step": 0, "native": 0}

    def recorder(self, key: str):
        def record(seconds: float) -> None:
            self.seconds[key] += seconds
            self.calls[key] += 1

        return record


async def one_round(client: LLMClient, tag: str, concurrency: int, max_tokens: int) -> tuple[int, float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    queue = [
        client.render_chat(with_marker(chat, cold_marker("engine_bench", tag, i)))
        for i, chat in enumerate(CHATS)
    ]
    counts: list[int] = []

    async def answer(ids: list[int]) -> int:
        n = 0
        async for out in client.generate(ids, params):
            n += len(out.new_token_ids)
        return n

    async def worker() -> None:
        while queue:
            counts.append(await answer(queue.pop(0)))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(counts), time.perf_counter() - start


async def ttft_round(client: LLMClient, tag: str, prompts: int) -> list[float]:
    """Milliseconds to the first token of each of ``prompts`` cold RAG prompts, one after another."""
    from spec_bench import rag_prompt

    params = SamplingParams(temperature=0.0, max_tokens=1)
    times = []
    for i in range(prompts):
        chat = [{"role": "user", "content": rag_prompt(i)}]
        ids = client.render_chat(with_marker(chat, cold_marker("engine_bench", tag, i)))
        start = time.perf_counter()
        async for _ in client.generate(ids, params):
            break
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run(args) -> dict:
    overrides = {"device": "cpu", "dtype": args.dtype}
    # auto is left out: an older checkout (A/B) may not know it, or the setting
    for name in ("quantization", "kv_cache_dtype"):
        if getattr(args, name) != "auto":
            overrides[name] = getattr(args, name)
    llm = load_settings(overrides).llm_config()
    clock = Clock()
    loop = asyncio.new_event_loop()
    client = LLMClient.start(bundled_model_path("smollm2-135m-instruct"), llm, loop)
    served = client.engine.config
    # as serve does once its models are loaded (api/app.py): what lives as long as the process is
    # kept out of the collector's passes
    gc.collect()
    gc.freeze()
    run_id = str(time.time())
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rounds = []
    try:
        warm = (
            ttft_round(client, f"{run_id}/warm", 2)
            if args.ttft
            else one_round(client, f"{run_id}/warm", args.concurrency, args.max_tokens)
        )
        loop.run_until_complete(warm)
        for i in range(args.rounds):
            for mode in ("quiet", "busy") if args.busy else ("quiet",):
                busy = None
                try:
                    if mode == "busy":
                        busy = subprocess.Popen([sys.executable, "-c", BUSY])
                    clock.reset()
                    if args.ttft:
                        ttft = loop.run_until_complete(ttft_round(client, f"{run_id}/{i}/{mode}", args.ttft))
                        rounds.append({"mode": mode, "ttft_ms": ttft})
                        continue
                    tokens, wall = loop.run_until_complete(
                        one_round(client, f"{run_id}/{i}/{mode}", args.concurrency, args.max_tokens)
                    )
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                rounds.append({
                    "mode": mode, "tokens": tokens, "wall_s": wall, "steps": clock.calls["step"],
                    "step_s": clock.seconds["step"], "native_calls": clock.calls["native"],
                    "native_s": clock.seconds["native"],
                })  # fmt: skip
    finally:
        client.close()
        loop.close()
    return {
        "started": started,
        "cpu": cpu_model(),
        "threads": llm.num_threads,
        # the checkout the engine was imported from (an older one on PYTHONPATH, for an A/B)
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(inferd.__file__).parents[2],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "dtype": llm.dtype,
        # what the engine served (auto resolved at load; an older checkout: what was asked)
        "quantization": getattr(served, "quantization", args.quantization),
        "kv_cache_dtype": getattr(served, "kv_cache_dtype", args.kv_cache_dtype),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "concurrency": args.concurrency,
        "ttft_prompts": args.ttft,
        "prompts": len(CHATS),
        "max_tokens": args.max_tokens,
        "rounds": rounds,
    }


def render(report: dict) -> str:
    if report.get("ttft_prompts"):
        return render_ttft(report)
    lines = [
        f"CPU: {report['cpu']}, commit {report['commit']}, {report['dtype']}, quantization "
        f"{report['quantization']}, KV cache {report.get('kv_cache_dtype', 'auto')}, GOMP_SPINCOUNT {report['gomp_spincount'] or 'unset'}; "
        f"{report['prompts']} prompts x {report['max_tokens']} tokens through {report['concurrency']} workers",
        "",
        "| round | tok/s | ms a step | ms a native decoder call (decode steps) |",
        "|---|---|---|---|",
    ]
    by_mode: dict[str, list[float]] = {}
    for r in report["rounds"]:
        rate = r["tokens"] / r["wall_s"]
        by_mode.setdefault(r["mode"], []).append(rate)
        lines.append(
            f"| {r['mode']} | {rate:.1f} | {r['step_s'] / r['steps'] * 1e3:.2f} | "
            f"{r['native_s'] / r['native_calls'] * 1e3:.2f} |"
        )
    lines.append("")
    lines += [
        f"{mode}: median {statistics.median(v):.1f} tok/s over {len(v)} rounds" for mode, v in by_mode.items()
    ]
    return "\n".join(lines)


def render_ttft(report: dict) -> str:
    lines = [
        f"CPU: {report['cpu']}, commit {report['commit']}, {report['dtype']}, quantization "
        f"{report['quantization']}, KV cache {report.get('kv_cache_dtype', 'auto')}; {report['ttft_prompts']} cold "
        "RAG prompts (~1,600 tokens) a round, one at a time",
        "",
        "| round | TTFT ms, median | min | max |",
        "|---|---|---|---|",
    ]
    for r in report["rounds"]:
        t = r["ttft_ms"]
        lines.append(f"| {r['mode']} | {statistics.median(t):.0f} | {min(t):.0f} | {max(t):.0f} |")
    every = [t for r in report["rounds"] for t in r["ttft_ms"]]
    lines += ["", f"median over every round: {statistics.median(every):.0f} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto", help="as serve's --dtype (default: auto)")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "int8"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "model", "int8"])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="alternate each quiet round with a busy one")
    parser.add_argument(
        "--ttft",
        type=int,
        default=0,
        metavar="N",
        help="time to first token of N cold ~1,600-token RAG prompts a round instead",
    )
    add_report_args(parser)
    args = parser.parse_args(argv)
    if render_from_json(args, render):
        return 0
    return save_and_render(run(args), args.json, render)


if __name__ == "__main__":
    sys.exit(main())
