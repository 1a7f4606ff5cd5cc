"""llguidance (as inferd drives it) against xgrammar: JSON-schema compile time and per-token mask time.

Both engines get the bundled SmolLM2-135M-Instruct tokenizer (49,152 tokens) and, per schema:

* tokenizer-info build: once per engine (llguidance through inferd's GuideManager, which wraps the
  tokenizer so text never becomes an added token; xgrammar's ``TokenizerInfo.from_huggingface``);
* compile: a fresh compilation of the schema with no cache, as for a tool client that sends a new
  schema with every request (llguidance: schema to grammar plus ``LLMatcher``; xgrammar:
  ``GrammarCompiler(cache_enabled=False).compile_json_schema``, which precomputes token masks);
* mask: walking one valid instance of the schema (its compact JSON, encoded by the tokenizer): per
  token, fill the next-token bitmask (the timed part), check the token is allowed, accept it; after
  the last token EOS must be allowed.

Both produce compact JSON (no whitespace, separators "," and ":"). Each schema is compiled and walked
--repeats times, each walk on the matcher its own compilation made, so llguidance's lazily built
lexer states are paid for in every walk, as for a new schema per request.

    .venv/bin/pip install --no-deps xgrammar apache-tvm-ffi   # torch stays the CPU build
    .venv/bin/python benchmarks/grammar_bench.py --json benchmarks/out/grammar-bench.json
    .venv/bin/python benchmarks/grammar_bench.py --from-json benchmarks/out/grammar-bench.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from harness import percentile

CHAT_MODEL = "smollm2-135m-instruct"
ENGINES = ("llguidance", "xgrammar")

SMALL = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "active": {"type": "boolean"}},
    "required": ["id", "name", "active"],
    "additionalProperties": False,
}
SMALL_INSTANCE = {"id": 4217, "name": "Ada Lovelace", "active": True}

# tests/unit/llm/test_structured.py's SCHEMA: nesting, an array, an enum, a pattern, bounds.
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
NESTED_INSTANCE = {
    "name": "Ada",
    "age": 36,
    "color": "green",
    "tags": ["math", "code"],
    "address": {"city": "London", "zip": "12345"},
}

# An OpenAI-style tool call as a guided tool_choice asks for it: the name fixed, the arguments the
# function's parameters.
TOOL = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather_forecast"},
        "arguments": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "include_hourly": {"type": "boolean"},
                "min_confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "fields": {"type": "array", "items": {"enum": ["temp", "wind", "rain", "uv", "humidity"]}},
            },
            "required": ["location", "unit", "days", "include_hourly", "min_confidence", "fields"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
TOOL_INSTANCE = {
    "name": "get_weather_forecast",
    "arguments": {
        "location": "Paris, France",
        "unit": "celsius",
        "days": 5,
        "include_hourly": False,
        "min_confidence": 0.75,
        "fields": ["temp", "rain", "wind"],
    },
}

LARGE_OBJECTS = 60
LARGE_FIELDS = 8
LARGE_CHOICES = ("pending", "approved", "rejected", "archived")


def large_schema() -> tuple[dict, dict]:
    """About 40 KB: an object of 60 objects, each of 8 required enum fields of 4 choices, and an
    instance that takes each choice in turn."""
    props, instance = {}, {}
    for i in range(LARGE_OBJECTS):
        fields = {f"f{j}": {"enum": [f"{c}_{j}" for c in LARGE_CHOICES]} for j in range(LARGE_FIELDS)}
        props[f"section_{i:02d}"] = {
            "type": "object",
            "properties": fields,
            "required": list(fields),
            "additionalProperties": False,
        }
        instance[f"section_{i:02d}"] = {
            f"f{j}": f"{LARGE_CHOICES[(i + j) % len(LARGE_CHOICES)]}_{j}" for j in range(LARGE_FIELDS)
        }
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return schema, instance


WARM_UP = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
WARM_UP_INSTANCE = {"ok": True}


def schemas() -> list[tuple[str, dict, dict]]:
    return [
        ("small (3 fields)", SMALL, SMALL_INSTANCE),
        ("nested+array+enum", NESTED, NESTED_INSTANCE),
        ("tool call (6 args)", TOOL, TOOL_INSTANCE),
        ("large (60x8 enums)", *large_schema()),
    ]


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def is_allowed(words: np.ndarray, token_id: int) -> bool:
    """Bit ``token_id`` of a row of 32-bit mask words (both engines' layout: little-endian bits)."""
    return bool((int(words[token_id >> 5]) >> (token_id & 31)) & 1)


class Llguidance:
    """llguidance as inferd uses it: GuideManager's tokenizer and its schema-to-grammar options."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        from inferd.llm.structured import GuideManager

        self.manager = GuideManager(tokenizer, vocab_size, eos_ids)
        self.eos_ids = eos_ids
        self.bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def build_tokenizer(self) -> None:
        self.manager._tokenizer()  # built lazily, on the first guided request

    def compile(self, schema: dict):
        from inferd.api.serving.structured import json_schema_grammar
        from inferd.llm.params import Guide

        # start() compiles any grammar check() has not: a fresh LLMatcher.
        return self.manager.start(Guide(json_schema_grammar(schema, is_compact=True))).matcher

    def fill(self, matcher) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(matcher, self.bitmask, 0)

    def words(self) -> np.ndarray:
        return self.bitmask[0]

    def accept(self, matcher, token_id: int) -> bool:
        return matcher.consume_token(token_id) and not matcher.is_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self.info = None
        self.compiler = None
        self.bitmask = None

    def build_tokenizer(self) -> None:
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids
        )
        # No cache: every schema compiles in full. Its mask precomputation runs on the cores there are.
        self.compiler = xgr.GrammarCompiler(
            self.info, max_threads=len(os.sched_getaffinity(0)), cache_enabled=False
        )
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)

    def compile(self, schema: dict):
        import xgrammar as xgr

        compiled = self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        return xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def words(self) -> np.ndarray:
        return self.bitmask[0].numpy()

    def accept(self, matcher, token_id: int) -> bool:
        return matcher.accept_token(token_id)


def walk(engine, matcher, token_ids: list[int]) -> list[float]:
    """Seconds to fill each mask along ``token_ids``, then the one EOS must be allowed in."""
    times = []
    for position, token_id in enumerate([*token_ids, None]):
        t0 = time.perf_counter()
        engine.fill(matcher)
        times.append(time.perf_counter() - t0)
        words = engine.words()
        if token_id is None:
            if not any(is_allowed(words, e) for e in engine.eos_ids):
                raise RuntimeError(f"{engine.name}: EOS not allowed after the instance")
            return times
        if not is_allowed(words, token_id):
            raise RuntimeError(f"{engine.name}: token {position} ({token_id}) not in the mask")
        if not engine.accept(matcher, token_id):
            raise RuntimeError(f"{engine.name}: token {position} ({token_id}) refused")
    return times


def run(repeats: int) -> dict:
    from transformers import AutoTokenizer

    from inferd.hub.bundled import bundled_model_path
    from inferd.hub.gguf import converted_gguf

    hf_dir = converted_gguf(bundled_model_path(CHAT_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    eos_ids = [tokenizer.eos_token_id]
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": _cpu_name(),
            "simd": _simd(),
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {p: _version(p) for p in ("inferd", "llguidance", "xgrammar", "transformers", "torch")},
        "tokenizer": {"dir": str(hf_dir), "vocab_size": vocab_size, "eos": eos_ids},
        "repeats": repeats,
        "engines": {},
        "schemas": [],
    }
    engines = [cls(tokenizer, vocab_size, eos_ids) for cls in (Llguidance, Xgrammar)]
    for engine in engines:
        t0 = time.perf_counter()
        engine.build_tokenizer()
        t1 = time.perf_counter()
        # The first compilation pays one-time set-up (llguidance: 0.15-0.3 s here) that no later schema
        # does: it is kept apart from the per-schema numbers.
        walk(
            engine,
            engine.compile(WARM_UP),
            tokenizer.encode(compact(WARM_UP_INSTANCE), add_special_tokens=False),
        )
        timings = {"tokenizer_build_s": t1 - t0, "warm_up_s": time.perf_counter() - t1}
        report["engines"][engine.name] = timings
        print(
            f"{engine.name}: tokenizer info {timings['tokenizer_build_s']:.2f}s, "
            f"first compilation and walk {timings['warm_up_s']:.2f}s",
            flush=True,
        )

    for name, schema, instance in schemas():
        token_ids = tokenizer.encode(compact(instance), add_special_tokens=False)
        entry = {"name": name, "schema_bytes": len(compact(schema)), "tokens": len(token_ids), "engines": {}}
        for engine in engines:
            # Milliseconds to 1 us and microseconds to 0.1 us: the JSON keeps every mask's time.
            compile_ms, mask_us, first_mask_us = [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                matcher = engine.compile(schema)
                compile_ms.append(round((time.perf_counter() - t0) * 1e3, 3))
                times = walk(engine, matcher, token_ids)
                first_mask_us.append(round(times[0] * 1e6, 1))
                mask_us.extend(round(t * 1e6, 1) for t in times)
            entry["engines"][engine.name] = {
                "compile_ms": compile_ms,
                "first_mask_us": first_mask_us,
                "mask_us": mask_us,
            }
            print(f"{name} / {engine.name}: {_row(entry['engines'][engine.name])}", flush=True)
        report["schemas"].append(entry)
    return report


def _summary(e: dict) -> dict:
    return {
        "compile_ms": statistics.median(e["compile_ms"]),
        "first_mask_ms": statistics.median(e["first_mask_us"]) / 1e3,
        "mask_p50_us": percentile(e["mask_us"], 0.5),
        "mask_p99_us": percentile(e["mask_us"], 0.99),
        "mask_mean_us": statistics.fmean(e["mask_us"]),
    }


def _row(e: dict) -> str:
    s = _summary(e)
    return (
        f"{s['compile_ms']:10.2f} {s['first_mask_ms']:10.3f} {s['mask_p50_us']:9.1f} "
        f"{s['mask_p99_us']:9.1f} {s['mask_mean_us']:9.1f}"
    )


def render_table(report: dict) -> str:
    head = (
        f"{'schema':<20} {'bytes':>6} {'tokens':>6} {'engine':<11} {'compile ms':>10} {'1st mask ms':>10} "
        f"{'p50 us':>9} {'p99 us':>9} {'mean us':>9}"
    )
    lines = [head, "-" * len(head)]
    for entry in report["schemas"]:
        labels = iter([(entry["name"], str(entry["schema_bytes"]), str(entry["tokens"]))])
        for engine, e in entry["engines"].items():
            name, size, tokens = next(labels, ("", "", ""))
            lines.append(f"{name:<20} {size:>6} {tokens:>6} {engine:<11} {_row(e)}")
    lines.append("")
    builds = ", ".join(f"{k} {v['tokenizer_build_s']:.2f}s" for k, v in report["engines"].items())
    warm = ", ".join(f"{k} {v['warm_up_s'] * 1e3:.0f} ms" for k, v in report["engines"].items())
    lines.append(
        f"tokenizer info, built once: {builds}; first compilation and walk (one-time set-up, "
        f"a 1-field schema): {warm}"
    )
    lines.append(
        "compile: median of fresh compilations (no cache); 1st mask: median of each walk's first "
        "mask; p50/p99/mean: every mask of every walk, the first and the final (EOS) one included"
    )
    return "\n".join(lines)


def _header(report: dict) -> str:
    m = report["machine"]
    versions = ", ".join(f"{p} {v}" for p, v in report["versions"].items() if v)
    return (
        f"{m['cpu']} ({', '.join(m.get('simd', [])) or 'no SIMD flags read'}); "
        f"{m['affinity']} of {m['cpus']} cpus; python {m['python']}; {report['started']}\n"
        f"versions: {versions}\n"
        f"tokenizer: vocab {report['tokenizer']['vocab_size']}; {report['repeats']} compilations and "
        f"walks per schema and engine\n"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _simd() -> list[str]:
    """The vector extensions the mask code can use here (both engines pick theirs at run time)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512bw") if f in flags]
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="fresh compilations and walks per schema and engine (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="write the raw numbers (every timing) here")
    parser.add_argument(
        "--from-json", type=Path, help="print the table of a report written by --json, run nothing"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
    else:
        report = run(args.repeats)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, separators=(",", ":")) + "\n")
    print(_header(report))
    print(render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
