"""Prompt-lookup speculative decoding on a RAG-shaped load, through `inferd bench chat`.

Each RAG prompt is a retrieved context of ~1,500 tokens (council-report notes: short factual
sentences about places and services, drawn per prompt from a seeded generator) and a question whose
answer quotes it ("Copy, word for word, the sentence about ..."). A control load is `inferd bench`'s
built-in chats (notes to summarise, questions, code), whose answers quote little.

Two fresh servers on the bundled SmolLM2-135M-Instruct (the CPU's default dtype, bf16 where it has
AVX512-BF16 or AMX): drafts off (`--speculative-tokens 0`) and on (`--speculative-tokens K
--speculative-max-running 8`, so that the 8-stream level drafts too). Each level is one `inferd bench
chat` run (its own cold-prompt markers: no prompt is in the prefix cache, except the shared chat
template), greedy, `--max-tokens 128` without ignore_eos: answers end where the model ends them.
The markers differ between the two servers' runs, so their answers may differ a little (drafts
themselves change no greedy output on the batch-invariant path: tests/integration/test_speculative.py).
The server's draft counters are scraped around each level for its acceptance rate.

    .venv/bin/python benchmarks/spec_bench.py --json benchmarks/out/<dir>/spec.json
    .venv/bin/python benchmarks/spec_bench.py --from-json benchmarks/out/<dir>/spec.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from harness import ROOT, Running, free_port, percentile, save_and_render
from prometheus_client.parser import text_string_to_metric_families
from ray_bench import Server, cpu_model

from inferd.bench.report import add_summaries

MODEL = "smollm2-135m-instruct"
PLACES = (
    "Orin Valley",
    "Maple Ridge",
    "Karsk Harbour",
    "Elm Point",
    "Stonebridge",
    "Lake Venn",
    "Hollow Creek",
    "Brightwater",
    "Fenwick",
    "Ashford Mill",
    "Corran Bay",
    "Dunmore",
    "Greyfield",
    "Halden",
    "Ivywood",
)
SERVICES = (
    "the weather station",
    "the library",
    "the ferry service",
    "the water plant",
    "the school",
    "the clinic",
    "the bakery",
    "the railway depot",
    "the museum",
    "the market",
)
VERBS = ("reported", "recorded", "announced", "counted", "measured", "noted")
FACTS = (
    "{n} visitors in the first week of {m}",
    "{n} centimetres of snow on the third of {m}",
    "a budget of {n} thousand crowns for {m}",
    "{n} new members by the end of {m}",
    "repairs lasting {n} days in {m}",
    "{n} late departures during {m}",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")


def rag_prompt(seed: int, words: int = 1100) -> str:
    """A ~1,500-token context of report sentences and a question quoting one of them."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        place, service = rng.choice(PLACES), rng.choice(SERVICES)
        fact = rng.choice(FACTS).format(n=rng.randint(3, 900), m=rng.choice(MONTHS))
        sentence = (
            f"In {place}, {service} {rng.choice(VERBS)} {fact}, according to the council's yearly report."
        )
        sentences.append((place, service, sentence))
        count += len(sentence.split())
    place, service, _ = rng.choice(sentences)
    question = rng.choice(
        [
            f"Copy, word for word, the sentence about {service} in {place}.",
            f"What did {service} in {place} report? Quote the report's sentence exactly.",
            f"Quote every sentence about {place} from the text.",
        ]
    )
    notes = " ".join(sentence for _, _, sentence in sentences)
    return f"Here are notes from the council's yearly report:\n\n{notes}\n\n{question}"


def draft_counters(url: str) -> tuple[float, float]:
    """(draft tokens, accepted tokens) the server has counted so far."""
    text = httpx.get(url + "/metrics", timeout=30, trust_env=False).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "inferd:spec_decode_num_draft_tokens_total",
                "inferd:spec_decode_num_accepted_tokens_total",
            ):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return (
        values.get("inferd:spec_decode_num_draft_tokens_total", 0.0),
        values.get("inferd:spec_decode_num_accepted_tokens_total", 0.0),
    )


def bench_level(
    url: str, prompts: Path | None, concurrency: int, requests: int, max_tokens: int, out: Path
) -> dict:
    exe = str(ROOT / ".venv" / "bin" / "inferd")
    cmd = [
        exe,
        "bench",
        "chat",
        "--url",
        url,
        "--model",
        MODEL,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--warmup",
        "0",
        "--max-tokens",
        str(max_tokens),
        "--json",
        str(out),
    ]
    if prompts is not None:
        cmd += ["--prompts", str(prompts)]
    before = draft_counters(url)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = draft_counters(url)
    report = json.loads(out.read_text())
    return {
        "command": " ".join(["inferd", *cmd[1:-2]]),
        "draft_tokens": after[0] - before[0],
        "accepted_tokens": after[1] - before[1],
        "report": report,
    }


def run(args: argparse.Namespace) -> dict:
    log_dir = ROOT / "benchmarks" / "out" / "logs"
    configs = {
        "off": ["--speculative-tokens", "0"],
        "on": ["--speculative-tokens", str(args.tokens), "--speculative-max-running", "8"],
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        rag = Path(tmp) / "rag.jsonl"
        rag.write_text(
            "".join(
                json.dumps({"messages": [{"role": "user", "content": rag_prompt(seed)}]}) + "\n"
                for seed in range(64)
            )
        )
        loads = [
            ("rag", rag, 1, args.requests),
            ("rag", rag, 8, 2 * args.requests),
            ("built-in chats", None, 1, args.requests),
        ]
        for config, flags in configs.items():
            port = free_port()
            cmd = [
                str(ROOT / ".venv" / "bin" / "inferd"),
                "serve",
                "--model",
                MODEL,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *flags,
            ]
            server = Server(f"spec-{config}", cmd, f"http://127.0.0.1:{port}")
            with Running(server, log_dir) as running:
                running.wait_ready()
                bench_level(server.base_url, rag, 1, 2, args.max_tokens, Path(tmp) / "warmup.json")
                for load, prompts, concurrency, requests in loads:
                    level = bench_level(
                        server.base_url,
                        prompts,
                        concurrency,
                        requests,
                        args.max_tokens,
                        Path(tmp) / "level.json",
                    )
                    results.append(
                        {
                            "config": config,
                            "server": " ".join(cmd[1:]),
                            "load": load,
                            "concurrency": concurrency,
                            **level,
                        }
                    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu_model(),
        "commit": commit.stdout.strip(),
        "model": MODEL,
        "max_tokens": args.max_tokens,
        "speculative_tokens": args.tokens,
        "results": results,
    }


def tpot_p50(level: dict) -> float:
    """The median over requests of the time per output token after the first (ms): ITL pools the gaps
    between deltas, and drafts accepted in one step arrive in one read, as zero gaps."""
    per_request = sorted(
        (s["e2e_ms"] - s["ttft_ms"]) / (s["output_tokens"] - 1)
        for s in level["samples"]
        if s["error"] is None and s["ttft_ms"] is not None and (s["output_tokens"] or 0) > 1
    )
    return percentile(per_request, 0.5)


def render(report: dict) -> str:
    rows = {}
    for r in report["results"]:
        level = add_summaries(r["report"])["levels"][0]
        rows[r["load"], r["concurrency"], r["config"]] = (
            r,
            {**level["summary"], "tpot_p50": tpot_p50(level)},
        )
    lines = [
        f"CPU: {report['cpu']}; commit {report['commit']}; {report['model']}, greedy, max_tokens "
        f"{report['max_tokens']}; drafts on: --speculative-tokens {report['speculative_tokens']} "
        "--speculative-max-running 8",
        "",
        "| load | streams | tok/s off | tok/s on | on/off | TTFT p50 off / on | TPOT p50 off / on | drafts accepted | "
        "output tokens off / on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load, concurrency in dict.fromkeys((k[0], k[1]) for k in rows):
        (_, off), (on_run, on) = rows[load, concurrency, "off"], rows[load, concurrency, "on"]
        accepted = on_run["accepted_tokens"] / on_run["draft_tokens"] if on_run["draft_tokens"] else 0.0
        lines.append(
            f"| {load} | {concurrency} | {off['output_tokens_per_s']:.1f} | {on['output_tokens_per_s']:.1f} | "
            f"{on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}x | "
            f"{off['ttft_ms']['p50']:.0f} / {on['ttft_ms']['p50']:.0f} ms | "
            f"{off['tpot_p50']:.1f} / {on['tpot_p50']:.1f} ms | "
            f"{accepted:.0%} of {on_run['draft_tokens']:.0f} | {off['output_tokens']} / {on['output_tokens']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4, help="--speculative-tokens of the 'on' server")
    parser.add_argument(
        "--requests", type=int, default=8, help="requests of a 1-stream level (8 streams: twice)"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args(argv)
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return 0
    return save_and_render(run(args), args.json, render)


if __name__ == "__main__":
    sys.exit(main())
