"""int8 weights and KV cache by default, served only where they stay faithful to the model.

When the server makes the int8 choices itself (``--quantization auto``, ``--kv-cache-dtype auto``
on the CPU's native bf16 path, see ``LLMConfig.auto_precision``), those the model cannot run are
reverted from its config alone; then the model is loaded without the rest, into a cache just big
enough, and scores a fixed text (the log-probability of each of its tokens given the ones before,
as completions' ``echo`` with ``logprobs`` reports them); then it is loaded as it will serve, with
the int8 choices, and scores the same text. The int8 model serves if its perplexity is at most
``PERPLEXITY_GATE`` above the unquantised model's (issue 17's gate for every reduced default, there
against float32: the bf16 path itself stays within 0.2 % of float32 on the bundled model,
tests/integration/test_served_dtype_quality.py). Where both int8 choices were the server's and
together they fail, the int8 weights alone are tried the same way. Otherwise, or if the probe cannot
run, the model is loaded again without them and the server says why. Choices made by name are
served as asked, unchecked.

The probe costs at least a second load and two prefills of up to 512 tokens (about a second for
SmolLM2-135M on a 2-core EPYC; for a 7B model, tens of seconds), so its verdict is kept in the
cache folder, keyed by the model's files, the choices, the dtype, this inferd and its kernel build:
a restart or a reload after keep-alive loads once. Its text was written for this check.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from inferd import __version__
from inferd.config.engine import LLMConfig
from inferd.hub.gguf import DEFAULT_CACHE_DIR
from inferd.llm.engine import LLMEngine
from inferd.llm.models.loader import load_causal_lm, settled_config
from inferd.llm.params import SamplingParams
from inferd.llm.runner.kernels import native_ops
from inferd.memory.profile import release_freed_memory

log = logging.getLogger(__name__)

PERPLEXITY_GATE = 0.01  # the int8 model's perplexity at most 1 % above the unquantised model's
MAX_PROBE_TOKENS = 512
MIN_PROBE_TOKENS = 64
_PROBE_ID = "inferd-precision-probe"

# Prose, a dialogue, figures, a list and a little code: what chat models are asked about.
PROBE_TEXT = """\
The library on Harbour Street opens at nine on weekdays and at ten on Saturdays. Last spring it \
moved its reading room to the first floor, where the windows face the canal, and the old room \
downstairs became a workshop in which volunteers repair bicycles, radios and the occasional toaster.

"Can you fix a kettle that switches itself off too early?" a woman asked on the first morning.
"Probably," said the volunteer behind the bench. "Leave it with us and come back on Thursday."

The workshop keeps a simple record. In its first twelve weeks it received 214 items, returned 167 \
of them working, and sent 31 to a specialist; the rest were beyond saving. The most common faults \
were loose connections (58), worn belts and cables (41) and broken switches (27).

To count the items by fault, the volunteers use a short script:

    from collections import Counter

    def faults_by_kind(records):
        counts = Counter(record["fault"] for record in records)
        return counts.most_common()

Visitors are asked to bring three things: the item itself, any parts that have fallen off, and a \
description of what happened before it stopped working. A note such as "it smelled of smoke and \
then went quiet" saves more time than any tool on the bench.

In the autumn the library plans to add a second evening, run a course on soldering for beginners, \
and publish the workshop's figures every month, so that the town can see how much is kept out of \
the bins.
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    detail: str  # what was compared and how close it came, for the log
    kept: bool = True  # a verdict on the model (not on a probe that could not run): kept for later loads


def load_engine(path: Path, config: LLMConfig) -> LLMEngine:
    """The engine for ``config``; where the server chose int8 itself, checked first (module docstring)."""
    if config.auto_precision:
        config = settled_config(path, config)
    if not _int8_choices(config):
        return _engine(path, config)
    reference: list[float] | None = None  # the model without int8 on the probe text, scored once
    tried: set[tuple[str, ...]] = set()  # the int8 choices probed so far, as loaded
    for candidate in _candidates(config):
        choices = tuple(_int8_choices(candidate))
        if choices in tried:
            continue  # the loader took the same choice back from an earlier candidate
        what = " and ".join(_DESCRIPTIONS[name] for name in choices)
        record = _verdict_file(path, candidate)
        verdict = _kept(record)
        if verdict is not None:
            log.log(
                _level(verdict),
                "%s: %s %s (checked before: %s)",
                path,
                _serving(verdict),
                what,
                verdict.detail,
            )
            if verdict.passed:
                return _engine(path, candidate)
            continue
        if reference is None:
            reference = _reference(path, config, what)
            if reference is None:
                break
        engine = _engine(path, candidate)
        if not _int8_choices(engine.config):
            return engine  # layers found only in the weights took back every choice (the loader said so)
        tried.add(tuple(_int8_choices(engine.config)))
        verdict = _verdict_on(engine, reference)
        if verdict.kept:
            _keep(record, verdict)
        log.log(_level(verdict), "%s: %s %s (%s)", path, _serving(verdict), what, verdict.detail)
        if verdict.passed:
            return engine
        del engine
        _release()
    return _engine(path, config.fallback())


_DESCRIPTIONS = {"quantization": "int8 weights", "kv_cache_dtype": "an int8 KV cache"}


def _serving(verdict: Verdict) -> str:
    return "serving" if verdict.passed else "not serving"


def _level(verdict: Verdict) -> int:
    return logging.INFO if verdict.passed else logging.WARNING


def _candidates(config: LLMConfig) -> list[LLMConfig]:
    """What to try, best first: every int8 choice; where that fails and the server chose both, the
    int8 weights alone (half the bytes a token reads; the cache's int8 mostly pays at many streams)."""
    if set(_int8_choices(config)) == {"quantization", "kv_cache_dtype"}:
        return [config, config.reverted("kv_cache_dtype")]
    return [config]


def _int8_choices(config: LLMConfig) -> list[str]:
    return [name for name in config.auto_precision if getattr(config, name) == "int8"]


def _engine(path: Path, config: LLMConfig) -> LLMEngine:
    loaded = load_causal_lm(path, config)
    return LLMEngine(loaded, loaded.config)


def _reference(path: Path, config: LLMConfig, what: str) -> list[float] | None:
    """The model without int8 on the probe text, or None (and why, in the log) where that fails."""
    log.info("%s: scoring a probe text without int8 first, to check the int8 model against", path)
    try:
        return probe_logprobs(_probe_engine(path, config.fallback()))
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run keeps the model's precision
        log.warning(
            "%s: not serving %s (the probe could not run on the model without int8: %r)", path, what, exc
        )
        return None
    finally:
        _release()  # the probe engine, held by its own cycles (and a failure's)


def _verdict_on(engine: LLMEngine, reference: list[float]) -> Verdict:
    """The probe's verdict on ``engine`` against ``reference``; where the probe fails on it, a failed
    verdict that says why and is not kept (the next start tries again)."""
    try:
        candidate = probe_logprobs(engine)
    except Exception as exc:  # noqa: BLE001 - a failing int8 model falls back, the server lives
        return Verdict(False, f"the probe failed on the int8 model: {exc!r}", kept=False)
    _forget_probe(engine)
    return compare(reference, candidate)


def probe_logprobs(engine: LLMEngine) -> list[float]:
    """The log-probability of each token of PROBE_TEXT (but the first) given those before it, from
    one prefill through ``engine`` (called on the engine's own thread, before it serves)."""
    ids = engine.tokenizer(PROBE_TEXT)["input_ids"][: min(MAX_PROBE_TOKENS, engine.max_model_len - 1)]
    engine.add_request(_PROBE_ID, ids, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    scored = None
    while engine.has_work:
        for output in engine.step():
            if output.error is not None:
                raise output.error
            scored = output.prompt_logprobs or scored
    if scored is None:
        raise RuntimeError("the precision probe ended without its prompt logprobs")
    return [entry.logprob for entry in scored[1:]]


def compare(reference: list[float], candidate: list[float]) -> Verdict:
    """Whether ``candidate``'s perplexity over the tokens both scored is within the gate of ``reference``'s."""
    n = min(len(reference), len(candidate))
    if n < MIN_PROBE_TOKENS:  # a context too short to tell (--max-model-len)
        return Verdict(
            False, f"the probe could score only {n} tokens (at least {MIN_PROBE_TOKENS})", kept=False
        )
    ref = -sum(reference[:n]) / n
    cand = -sum(candidate[:n]) / n
    if not (math.isfinite(ref) and math.isfinite(cand)):
        return Verdict(False, f"non-finite log-probabilities on the probe text ({ref}, {cand})")
    change = math.exp(cand - ref) - 1
    passed = change <= PERPLEXITY_GATE
    detail = (
        f"perplexity of the probe text {math.exp(cand):.3f} against {math.exp(ref):.3f} without int8: "
        f"{change * 100:+.2f} %, {'within' if passed else 'over'} the gate of +{PERPLEXITY_GATE * 100:g} %, "
        f"{n} tokens"
    )
    return Verdict(passed, detail)


def _probe_engine(path: Path, config: LLMConfig) -> LLMEngine:
    """An engine for one request of the probe's length: a cache of a few blocks, no prefix cache,
    no drafts (a probe asks for no output)."""
    small = replace(
        config,
        max_num_seqs=1,
        max_model_len=min(config.max_model_len or MAX_PROBE_TOKENS + 1, MAX_PROBE_TOKENS + 1),
        kv_cache_memory=None,
        enable_prefix_caching=False,
        speculative_tokens=0,
    )
    return _engine(path, small)


def _forget_probe(engine: LLMEngine) -> None:
    """Leave no trace of the probe in the engine that serves: its cached prefix and its counts."""
    kv = engine.kv_cache
    kv.reset_prefix_cache()
    kv.num_prefix_queries = kv.num_prefix_hits = 0


def _release() -> None:
    gc.collect()  # the engine's cycles hold the weights and the cache
    release_freed_memory()


def _verdict_file(path: Path, config: LLMConfig) -> Path:
    """Where the verdict on ``path`` under ``config``'s int8 choices is kept: named by everything it
    depends on, so that changed weights, another choice, gate or probe, or another inferd or kernel
    build probes again."""
    ops = native_ops()
    library = getattr(ops, "library", None)
    key = {
        "model": _file_stamps(path),
        "dtype": config.dtype,
        "device": config.device,
        "choices": {name: getattr(config, name) for name in config.auto_precision},
        "named": {"quantization": config.quantization, "kv_cache_dtype": config.kv_cache_dtype},
        "block_size": config.block_size,
        "inferd": __version__,
        "kernels": None if ops is None else [ops.variant, *(_file_stamps(library) if library else [])],
        "gate": PERPLEXITY_GATE,
        "probe": hashlib.sha256(PROBE_TEXT.encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE_DIR
    return folder / "precision" / f"{path.name}-{digest}.json"


def _file_stamps(path: Path) -> list[list]:
    """Name, size and modification time of ``path``, or of every file directly in the folder."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in files]


def _kept(record: Path) -> Verdict | None:
    try:
        kept = json.loads(record.read_text())
        return Verdict(bool(kept["passed"]), str(kept["detail"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep(record: Path, verdict: Verdict) -> None:
    """Write the verdict for later loads; where the cache folder cannot be written, it is only lost."""
    body = {
        "passed": verdict.passed,
        "detail": verdict.detail,
        "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(body))
        partial.replace(record)
    except OSError as exc:
        log.debug("the precision verdict was not kept in %s: %s", record, exc)
