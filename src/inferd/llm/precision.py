"""int8 weights and KV cache by default, served only where they stay faithful to the model.

When the server makes the int8 choices itself (``--quantization auto``, ``--kv-cache-dtype auto``
on the CPU's native bf16 path, see ``LLMConfig.auto_precision``), the model is first loaded without
them, into a cache just big enough, and scores a fixed text (the log-probability of each of its
tokens given the ones before, as completions' ``echo`` with ``logprobs`` reports them); then it is
loaded as it will serve, with the int8 choices, and scores the same text. The int8 model serves if
its perplexity is at most ``PERPLEXITY_GATE`` above the unquantised model's (issue 17's gate for
every reduced default, there against float32: the bf16 path itself stays within 0.2 % of float32 on
the bundled model, tests/integration/test_served_dtype_quality.py). Otherwise the model is loaded
again without them and the server says why. Choices made by name are served as asked, unchecked.

The probe costs a second load and two prefills of about 400 tokens at start (about a second for
SmolLM2-135M on a 2-core EPYC). Its text was written for this check.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from inferd.config.engine import LLMConfig
from inferd.llm.engine import LLMEngine
from inferd.llm.models.loader import load_causal_lm
from inferd.llm.params import SamplingParams
from inferd.memory.profile import release_freed_memory

log = logging.getLogger(__name__)

PERPLEXITY_GATE = 0.01  # the int8 model's perplexity at most 1 % above the unquantised model's
MAX_PROBE_TOKENS = 512
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


def load_engine(path: Path, config: LLMConfig) -> LLMEngine:
    """The engine for ``config``; where the server chose int8 itself, probed first (module docstring)."""
    if not config.auto_precision:
        loaded = load_causal_lm(path, config)
        return LLMEngine(loaded, loaded.config)
    log.info("%s: scoring a probe text without int8 first, to check the int8 model against", path)
    reference = _probe_engine(path, config.fallback())
    reference_logprobs = probe_logprobs(reference)
    del reference
    _release()
    loaded = load_causal_lm(path, config)
    engine = LLMEngine(loaded, loaded.config)
    chosen = [name for name in loaded.config.auto_precision if _is_int8(loaded.config, name)]
    if not chosen:  # the model can run none of them: it is loaded as the fallback already
        return engine
    verdict = compare(reference_logprobs, probe_logprobs(engine))
    _forget_probe(engine)
    what = " and ".join(_DESCRIPTIONS[name] for name in chosen)
    if verdict.passed:
        log.info("%s: serving %s (%s)", path, what, verdict.detail)
        return engine
    log.warning(
        "%s: not serving %s, which is not faithful enough to the model: %s", path, what, verdict.detail
    )
    del engine, loaded
    _release()
    fallback = load_causal_lm(path, config.fallback())
    return LLMEngine(fallback, fallback.config)


_DESCRIPTIONS = {"quantization": "int8 weights", "kv_cache_dtype": "an int8 KV cache"}


def _is_int8(config: LLMConfig, name: str) -> bool:
    return getattr(config, name) == "int8"


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
    if n == 0:
        return Verdict(False, "the probe scored no tokens")
    ref = -sum(reference[:n]) / n
    cand = -sum(candidate[:n]) / n
    if not (math.isfinite(ref) and math.isfinite(cand)):
        return Verdict(False, f"non-finite log-probabilities on the probe text ({ref}, {cand})")
    change = math.exp(cand - ref) - 1
    detail = (
        f"perplexity of the probe text {math.exp(cand):.3f} against {math.exp(ref):.3f} without int8 "
        f"({change * 100:+.2f} %, gate +{PERPLEXITY_GATE * 100:g} %, {n} tokens)"
    )
    return Verdict(change <= PERPLEXITY_GATE, detail)


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
    loaded = load_causal_lm(path, small)
    return LLMEngine(loaded, loaded.config)


def _forget_probe(engine: LLMEngine) -> None:
    """Leave no trace of the probe in the engine that serves: its cached prefix and its counts."""
    kv = engine.kv_cache
    kv.reset_prefix_cache()
    kv.num_prefix_queries = kv.num_prefix_hits = 0


def _release() -> None:
    gc.collect()  # the engine's cycles hold the weights and the cache
    release_freed_memory()
