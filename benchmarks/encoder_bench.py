"""The served embedder's forward in process (no server, no HTTP): inferd's packed BERT on
all-MiniLM-L6-v2 at the dtype `serve --dtype auto` picks on this CPU, over passages of
embed_bench.py's corpus in batches of 32, with its attention in the native kernel
(encoder_attention.c) and, alternating, as two matrix products and a softmax per item.

Each timing runs every batch once; --repeats timings per way, the median kept. Attention's own
share is timed around its call in each layer.

    .venv/bin/python benchmarks/encoder_bench.py --json benchmarks/out/<dir>/encoder.json
    .venv/bin/python benchmarks/encoder_bench.py --from-json benchmarks/out/<dir>/encoder.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from embed_bench import build_corpus, model_dir
from harness import ROOT, add_report_args, render_from_json, save_and_render, timed
from ray_bench import cpu_model

from inferd.config import load_settings
from inferd.encoder.models import bert as bert_module
from inferd.encoder.models.base import prepare_batch, torch_dtype
from inferd.encoder.models.bert import _NativeLinear
from inferd.encoder.models.embedder import SentenceEmbedder
from inferd.encoder.request import Item


class AttentionClock:
    """Seconds spent in attention, whichever way it runs: wraps the per-item function and the
    kernel's method of ``native`` (when there is one)."""

    def __init__(self, native) -> None:
        self.seconds = 0.0
        bert_module._attend_within = timed(bert_module._attend_within, self.add)
        if native is not None:
            native.varlen_attention = timed(native.varlen_attention, self.add)

    def add(self, seconds: float) -> None:
        self.seconds += seconds


def run(passages: int, repeats: int) -> dict:
    from transformers import AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    corpus = build_corpus(tokenizer, passages)
    config = load_settings().encoder_config()
    model = SentenceEmbedder(path, config)
    if config.dtype != "float32":
        model.set_dtype(torch_dtype(config.dtype))
    bert = model.bert
    native = bert.native
    ids = tokenizer(corpus.passages)["input_ids"]
    items = [Item(None, i, row) for i, row in enumerate(ids)]
    batches = [prepare_batch(items[i : i + 32], 0, False, packed=True) for i in range(0, len(items), 32)]
    clock = AttentionClock(native)
    ways = {"native kernel": native, "per item": None} if native is not None else {"per item": None}
    samples: dict[str, list[dict]] = {way: [] for way in ways}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for way, ops in ways.items():
                bert.native = ops
                clock.seconds = 0.0
                start = time.perf_counter()
                for batch in batches:
                    model.forward(batch)
                wall = time.perf_counter() - start
                samples[way].append({"wall_s": wall, "attention_s": clock.seconds})
    for way in ways:
        samples[way] = samples[way][1:]
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": config.dtype,
        "kernel_variant": None if native is None else native.variant,
        # whether the bf16 products ran on inferd's linear kernel (else torch's; see bert.py)
        "native_linear": isinstance(bert.layers[0]["qkv"], _NativeLinear),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "passages": len(items),
        "tokens": sum(map(len, ids)),
        "batches": len(batches),
        "repeats": repeats,
        "samples": samples,
    }


def _products(report: dict) -> str:
    known = report.get("native_linear")  # reports from before the field: unknown
    return "unrecorded kernels" if known is None else "inferd's kernel" if known else "torch"


def render(report: dict) -> str:
    lines = [
        f"CPU: {report['cpu']}, {report['threads']} threads, {report['dtype']}, kernel variant "
        f"{report['kernel_variant']}, products on {_products(report)}, commit {report['commit']}; "
        f"{report['passages']} passages "
        f"({report['tokens'] / report['passages']:.1f} tokens on average) in {report['batches']} batches "
        f"of 32; median of {report['repeats']} rounds",
        "",
        "| attention | passages/s | ms a batch | attention ms a batch |",
        "|---|---|---|---|",
    ]
    for way, got in report["samples"].items():
        wall = statistics.median(s["wall_s"] for s in got)
        attention = statistics.median(s["attention_s"] for s in got)
        batches = report["batches"]
        lines.append(
            f"| {way} | {report['passages'] / wall:.1f} | {wall / batches * 1e3:.1f} | "
            f"{attention / batches * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    add_report_args(parser)
    args = parser.parse_args(argv)
    if render_from_json(args, render):
        return 0
    return save_and_render(run(args.passages, args.repeats), args.json, render)


if __name__ == "__main__":
    sys.exit(main())
