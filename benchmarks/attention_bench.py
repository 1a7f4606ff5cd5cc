"""The paged attention kernel (paged_decode.c) of this checkout against the same kernel at an earlier
commit, built the same way for this CPU, on SmolLM2-135M's attention shape (9 query heads, 3 kv
heads, head_dim 64, bf16 cache, 8-slot blocks as on the CPU), with every thread torch would use;
each library reads the key cache in the layout it keeps (packed by block where it can).

Shapes: decode batches (one row per sequence, each its own context), prefill runs (consecutive
rows of one sequence), a short chunk after a long cached context (chunked prefill, a prefix-cache
hit). Each shape is timed --repeats times after a warm-up, alternating the two libraries, and the
median is kept. With --layers N every call is made on N caches of their own in turn, as a step
of an N-layer model makes it: the caches then come from memory, not from the CPU's caches. The
earlier kernel is compiled from the kernel sources at REF (`git show`) with the flags of this
CPU's variant (kernels/variants.py). Where this checkout's kernel reads int8 caches
(--kv-cache-dtype int8), it is also timed over the same keys and values quantised, in the same
alternation: the last two columns.

    .venv/bin/python benchmarks/attention_bench.py --ref 1844958 --json benchmarks/out/<dir>/attention.json
    .venv/bin/python benchmarks/attention_bench.py --ref HEAD --layers 30   # a 30-layer step, cold caches
    .venv/bin/python benchmarks/attention_bench.py --from-json benchmarks/out/<dir>/attention.json
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import add_report_args, render_from_json, save_and_render
from ray_bench import cpu_model

from inferd.llm.runner.kernels import (
    kv_scale_cache,
    native_ops,
    packed_key_cache,
    prebuilt_library,
    quantise_vectors,
    variants,
)

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "src/inferd/llm/runner/kernels"
HEADS, KV_HEADS, HEAD_DIM, BLOCK, SCALE = 9, 3, 64, 8, 0.125
# name -> (context lengths of the call's rows, whether the rows are one sequence's run)
SHAPES = {
    "decode 32 x 1000 ctx": ([1000] * 32, False),
    "decode 32 x 500 ctx": ([500] * 32, False),
    "decode 32 x 200 ctx": ([200] * 32, False),
    "decode 1 x 500 ctx": ([500], False),
    "prefill run of 1500": (list(range(1, 1501)), True),
    "prefill run of 300": (list(range(1, 301)), True),
    "16-row chunk after 1000": (list(range(1001, 1017)), True),
}

INT8 = "this checkout, int8 cache"  # the label of this checkout's kernel over int8 caches


def this_variant() -> variants.Variant:
    """The kernel build native_ops loads on this CPU."""
    (variant,) = [v for v in variants.runnable() if v.name == native_ops().variant]
    return variant


def build_at(ref: str, out_dir: Path) -> Path:
    """This CPU's variant of the kernel library as its sources were at ``ref`` (all of them: a
    helper may have moved between paged_decode.c and common.h)."""
    variant = this_variant()
    src = out_dir / "src"
    src.mkdir()
    kernels = KERNELS.relative_to(ROOT).as_posix()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    for name in git("ls-tree", "--name-only", f"{ref}:{kernels}").split():
        if name.endswith((".c", ".h")):
            (src / name).write_text(git("show", f"{ref}:{kernels}/{name}"))
    library = out_dir / "paged_at_ref.so"
    subprocess.run(
        [
            "gcc",
            "-shared",
            *variants.COMMON_FLAGS,
            *variant.flags,
            variants.OPENMP_FLAG,
            *sorted(str(p) for p in src.glob("*.c")),
            "-o",
            str(library),
            "-lm",
        ],
        check=True,
    )
    return library


def kernel(library: Path, source: Path):
    """The library's kernel; whether it reads packed key caches (kernels.packed_key_cache; a
    library from before them takes no k_packed argument and reads plain caches: None); and
    whether it takes int8 caches' scales (a kv_scales argument: its paged_decode.c says so)."""
    lib = ctypes.CDLL(str(library))
    fn, flag = lib.paged_decode_attention, hasattr(lib, "packed_keys_take")
    scales = "const float *kv_scales)" in source.read_text()
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    fn.argtypes = [
        *(p, i, i64, p, p, i, *([i] if flag else []), p, i, p, i, i, i, i, i, f, i, f, p, i, i64),
        *([p] if scales else []),
    ]
    return fn, (bool(lib.packed_keys_take(HEAD_DIM, BLOCK)) if flag else None), scales


def call_args(lens: list[int], run: bool, layers: int = 1, scales: bool = False) -> tuple[tuple, dict]:
    """The tensors to keep alive and one call's arguments per layer (each layer its own caches),
    for plain key caches (False; None: a library from before packed keys), the same keys packed
    (True) and the same keys and values in int8 ("int8"); with ``scales`` each call passes a
    kv_scales argument (None but for the int8 caches)."""
    torch.manual_seed(0)
    n, width = len(lens), max(lens) // BLOCK + 1
    blocks = width if run else n * width  # a run's rows share one sequence's blocks
    tables = torch.randperm(blocks).view(-1, width)
    if run:
        tables = tables.expand(n, width)
    tables, ctx = tables.contiguous(), torch.tensor(lens)
    q = torch.randn(n, HEADS * HEAD_DIM).bfloat16()
    out = torch.empty_like(q)
    caches = [torch.randn(2, blocks * BLOCK, KV_HEADS, HEAD_DIM).bfloat16().unbind(0) for _ in range(layers)]
    packed = [
        packed_key_cache(blocks, KV_HEADS, HEAD_DIM, BLOCK).copy_(
            k.view(blocks, BLOCK, KV_HEADS, HEAD_DIM // 2, 2).permute(0, 2, 3, 1, 4)
        )
        for k, _ in caches
    ]
    int8 = [int8_caches(k, v, blocks) for k, v in caches] if scales else []
    keep = (caches, packed, int8, tables, ctx, q, out)
    tail = [None] if scales else []
    return keep, {
        None: [_args(q, k, v, None, tables, width, ctx, n, out, *tail) for k, v in caches],
        False: [_args(q, k, v, False, tables, width, ctx, n, out, *tail) for k, v in caches],
        True: [_args(q, pk, v, True, tables, width, ctx, n, out, *tail) for pk, (_, v) in zip(packed, caches)],
        "int8": [_args(q, k8, v8, True, tables, width, ctx, n, out, s.data_ptr()) for k8, v8, s in int8],
    }


def int8_caches(k: torch.Tensor, v: torch.Tensor, blocks: int) -> tuple:
    """Plain bf16 keys and values as an int8 cache holds them: packed keys, values, scales."""
    (kq, ks), (vq, vs) = quantise_vectors(k), quantise_vectors(v)
    packed = packed_key_cache(blocks, KV_HEADS, HEAD_DIM, BLOCK, dtype=torch.int8)
    packed.copy_(kq.view(blocks, BLOCK, KV_HEADS, HEAD_DIM // 2, 2).permute(0, 2, 3, 1, 4))
    scales = kv_scale_cache(blocks, KV_HEADS, BLOCK)
    scales[:, :, 0] = ks.view(blocks, BLOCK, KV_HEADS).transpose(1, 2)
    scales[:, :, 1] = vs.view(blocks, BLOCK, KV_HEADS).transpose(1, 2)
    return packed, vq, scales


def _args(q, k, v, packed: bool | None, tables, width, ctx, n, out, *scales) -> tuple:
    return (
        q.data_ptr(),
        1,
        HEADS * HEAD_DIM,
        k.data_ptr(),
        v.data_ptr(),
        1,
        *([] if packed is None else [int(packed)]),
        tables.data_ptr(),
        width,
        ctx.data_ptr(),
        n,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        BLOCK,
        SCALE,
        0,
        0.0,
        out.data_ptr(),
        1,
        HEADS * HEAD_DIM,
        *scales,
    )


def time_call(fn, layer_args: list[tuple], calls: int) -> float:
    """Seconds a call of every layer in turn (a step's attention) takes."""
    start = time.perf_counter()
    for _ in range(calls):
        for args in layer_args:
            assert fn(*args) == 0
    return (time.perf_counter() - start) / calls


def run(ref: str, repeats: int, layers: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        now = kernel(prebuilt_library(this_variant()), KERNELS / "paged_decode.c")
        libraries = {"this checkout": now, f"at {ref}": kernel(build_at(ref, Path(tmp)), Path(tmp) / "src/paged_decode.c")}
        if now[1] and now[2]:  # this checkout reads int8 caches where it packs keys
            libraries[INT8] = (now[0], "int8", True)
        rows = []
        for name, (lens, is_run) in SHAPES.items():
            keeps, args = {}, {}
            for scales in {s for _, _, s in libraries.values()}:
                keeps[scales], args[scales] = call_args(lens, is_run, layers, scales)
            calls = max(1, int(2e6 / sum(lens) / layers))  # about the same work per timing
            samples = {label: [] for label in libraries}
            for fn, packed, scales in libraries.values():
                time_call(fn, args[scales][packed], calls)
            for _ in range(repeats):
                for label, (fn, packed, scales) in libraries.items():
                    samples[label].append(time_call(fn, args[scales][packed], calls))
            rows.append(
                {
                    "shape": name,
                    "rows": len(lens),
                    "calls_per_sample": calls,
                    "us": {label: [s * 1e6 for s in got] for label, got in samples.items()},
                }
            )
            del keeps
    return {
        "cpu": cpu_model(),
        "variant": native_ops().variant,
        "threads": torch.get_num_threads(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "ref": ref,
        "repeats": repeats,
        "layers": layers,
        "shapes": rows,
    }


def render(report: dict) -> str:
    ref = f"at {report['ref']}"
    int8 = INT8 in report["shapes"][0]["us"]
    lines = [
        f"CPU: {report['cpu']}, kernel variant {report['variant']}, {report['threads']} threads, commit "
        f"{report['commit']}; median of {report['repeats']} samples, microseconds per call"
        + (f" of each of {report['layers']} layers' caches in turn" if report.get("layers", 1) > 1 else ""),
        "",
        f"| shape | this checkout | {ref} | ratio |" + (" int8 cache | int8 / bf16 |" if int8 else ""),
        "|---|---|---|---|" + ("---|---|" if int8 else ""),
    ]
    for row in report["shapes"]:
        now, then = (statistics.median(row["us"][k]) for k in ("this checkout", ref))
        line = f"| {row['shape']} | {now:.0f} | {then:.0f} | {now / then:.2f}x |"
        if int8:
            q8 = statistics.median(row["us"][INT8])
            line += f" {q8:.0f} | {q8 / now:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD~1", help="the earlier commit whose kernel sources to build")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=1, help="caches per call, each called in turn")
    add_report_args(parser)
    args = parser.parse_args(argv)
    if render_from_json(args, render):
        return 0
    if native_ops() is None:
        print("no native kernel library loads on this machine", file=sys.stderr)
        return 1
    return save_and_render(run(args.ref, args.repeats, args.layers), args.json, render)


if __name__ == "__main__":
    sys.exit(main())
