"""The one memory planner: every served model against one budget per device, before any loads.

Each encoder gets what it needs (weights, activations, runtime); the LLM's KV cache gets a share of
the rest (``kv_cache_fraction``, capped on the CPU) or exactly ``kv_cache_memory`` when the user
sets it. A plan that cannot work says why, with the numbers, and which flags would make it fit.
The same function sizes the KV cache again after loading, from the memory measured free then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# On the CPU the cache shares RAM with everything else; without an explicit size it takes at most
# this much: 17k tokens of a 135M model in bf16 (32 streams of ~540 tokens, a 400-token prompt and
# its answer). Pages are committed as blocks are first used, but the block pool hands out its least
# recently freed block (to keep prefix-cache entries longest), so sustained load touches every block:
# this budget is the cache's resident memory, and it keeps the default trio of models (chat,
# embeddings, rerank) under 1.5 GB under load. Raise --kv-cache-memory for long contexts at high
# concurrency.
CPU_DEFAULT_KV_CACHE_BYTES = 384 * 2**20


@dataclass(frozen=True, slots=True)
class ModelNeed:
    """What one loaded model needs besides its KV cache; LLMs also say what a token of cache costs."""

    name: str
    device: str
    dtype: str
    weight_bytes: int
    activation_bytes: int
    runtime_bytes: int
    kv_bytes_per_token: int = 0  # 0: an encoder, no cache
    max_model_len: int = 0
    # Held only while the model loads, before its weights and KV cache: converting a GGUF file at
    # the first start (later starts reuse the conversion). Not part of the steady state.
    load_peak_bytes: int = 0

    @property
    def is_llm(self) -> bool:
        return self.kv_bytes_per_token > 0

    @property
    def fixed_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.runtime_bytes


@dataclass(frozen=True, slots=True)
class KVPolicy:
    """How the rest of the budget goes to the KV cache (from the server settings)."""

    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.5
    block_size: int = 16
    max_num_seqs: int = 32


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """One device's plan. ``problems`` is empty when it fits."""

    device: str
    budget_bytes: int
    needs: tuple[ModelNeed, ...]
    kv_cache_bytes: int  # each LLM's cache
    problems: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def num_llms(self) -> int:
        return sum(n.is_llm for n in self.needs)

    @property
    def total_bytes(self) -> int:
        return sum(n.fixed_bytes for n in self.needs) + self.kv_cache_bytes * self.num_llms

    def kv_tokens(self, need: ModelNeed) -> int:
        return self.kv_cache_bytes // need.kv_bytes_per_token if need.is_llm else 0


def kv_cache_budget(rest_bytes: int, policy: KVPolicy, device: str, most_useful_bytes: int) -> int:
    """Bytes for one LLM's KV cache out of ``rest_bytes`` (what is left after every model's needs)."""
    if policy.kv_cache_memory is not None:
        return policy.kv_cache_memory
    budget = int(max(rest_bytes, 0) * policy.kv_cache_fraction)
    if not device.startswith("cuda"):
        # ... but always room for one sequence at full length, as the planner requires.
        one_sequence = most_useful_bytes // max(policy.max_num_seqs, 1)
        budget = min(budget, max(CPU_DEFAULT_KV_CACHE_BYTES, one_sequence))
    return min(budget, most_useful_bytes)


def most_useful_kv_bytes(need: ModelNeed, policy: KVPolicy) -> int:
    """Every sequence at full length: more cache than this is never used."""
    blocks_per_seq = math.ceil(need.max_model_len / policy.block_size)
    return blocks_per_seq * policy.block_size * policy.max_num_seqs * need.kv_bytes_per_token


def plan_device(needs: list[ModelNeed], budget_bytes: int, policy: KVPolicy, device: str) -> MemoryPlan:
    """Split ``budget_bytes`` between ``needs`` (all on ``device``); never raises."""
    llms = [n for n in needs if n.is_llm]
    rest = budget_bytes - sum(n.fixed_bytes for n in needs)
    per_llm_rest = rest // max(len(llms), 1)
    kv = min((kv_cache_budget(per_llm_rest, policy, device, most_useful_kv_bytes(n, policy)) for n in llms),
             default=0)  # fmt: skip
    plan = MemoryPlan(device, budget_bytes, tuple(needs), kv)
    return replace(plan, problems=tuple(_problems(plan, policy, rest)))


def plan_memory(needs: list[ModelNeed], budgets: dict[str, int], policy: KVPolicy) -> tuple[MemoryPlan, ...]:
    """One plan per device that has models; ``budgets`` maps each such device to its bytes."""
    devices = list(dict.fromkeys(n.device for n in needs))
    return tuple(
        plan_device([n for n in needs if n.device == d], budgets[d], policy, d) for d in devices
    )


def _problems(plan: MemoryPlan, policy: KVPolicy, rest: int) -> list[str]:
    fixed = sum(n.fixed_bytes for n in plan.needs)
    if rest < 0:
        return [_too_big_message(plan, fixed)]
    problems = [_load_peak_message(plan, n) for n in plan.needs if _load_peak_overflow(plan, n) > 0]
    for need in (n for n in plan.needs if n.is_llm):
        if policy.kv_cache_memory is not None and policy.kv_cache_memory * plan.num_llms > rest:
            problems.append(
                f"--kv-cache-memory {policy.kv_cache_memory} ({gib(policy.kv_cache_memory)}) does not fit: "
                f"{gib(rest)} of the {gib(plan.budget_bytes)} budget is left after the models' "
                f"{gib(fixed)}; use --kv-cache-memory {rest // max(plan.num_llms, 1)} or less"
            )
        elif plan.kv_tokens(need) < need.max_model_len:
            problems.append(_short_cache_message(plan, need, policy, rest))
    return problems


def _beside_bytes(plan: MemoryPlan, need: ModelNeed) -> int:
    """Everything else in the plan, as if every other model were loaded first."""
    return plan.total_bytes - need.fixed_bytes - (plan.kv_cache_bytes if need.is_llm else 0)


def _load_peak_overflow(plan: MemoryPlan, need: ModelNeed) -> int:
    if not need.load_peak_bytes:
        return 0
    return _beside_bytes(plan, need) + need.load_peak_bytes - plan.budget_bytes


def _load_peak_message(plan: MemoryPlan, need: ModelNeed) -> str:
    free = plan.budget_bytes - _beside_bytes(plan, need)
    return (
        f"converting the GGUF file of {need.name} at start needs {gib(need.load_peak_bytes)} while it runs, "
        f"but {gib(free)} of the {gib(plan.budget_bytes)} budget is left beside the other models; start once "
        f"with {need.name} alone or a larger --memory-budget (later starts reuse the conversion)"
    )


def _too_big_message(plan: MemoryPlan, fixed: int) -> str:
    lines = [
        f"the models need {gib(fixed)} on {plan.device} before any KV cache but the budget is "
        f"{gib(plan.budget_bytes)}:"
    ]
    lines += [f"  {n.name}: {gib(n.fixed_bytes)} ({_parts(n)})" for n in plan.needs]
    lines += ["to fit:", *_shrink_options(plan, fixed)]
    return "\n".join(lines)


def _shrink_options(plan: MemoryPlan, fixed: int) -> list[str]:
    options = []
    fp32 = [n for n in plan.needs if n.dtype == "float32"]
    if fp32:
        halved = fixed - sum((n.weight_bytes + n.activation_bytes) // 2 for n in fp32)
        verdict = "fits" if halved <= plan.budget_bytes else "still too much"
        options.append(f"  --dtype bfloat16: {gib(halved)} ({verdict})")
    for need in plan.needs if len(plan.needs) > 1 else ():
        without = fixed - need.fixed_bytes
        verdict = "fits" if without <= plan.budget_bytes else "still too much"
        options.append(f"  serve fewer models, e.g. without {need.name}: {gib(without)} ({verdict})")
    options.append(f"  a larger --memory-budget (at least {fixed} bytes) on a machine that has it")
    return options


def _short_cache_message(plan: MemoryPlan, need: ModelNeed, policy: KVPolicy, rest: int) -> str:
    tokens = plan.kv_tokens(need)
    full = need.kv_bytes_per_token * need.max_model_len
    fitting_len = tokens // policy.block_size * policy.block_size
    lines = [
        f"the KV cache of {need.name} gets {gib(plan.kv_cache_bytes)} ({tokens} tokens at "
        f"{need.kv_bytes_per_token} bytes a token), less than one sequence of --max-model-len "
        f"{need.max_model_len} ({gib(full)}); {gib(rest)} of the {gib(plan.budget_bytes)} budget is left "
        "after the models' weights, activations and runtime.",
        "to fit:",
    ]
    if fitting_len >= policy.block_size:
        lines.append(f"  --max-model-len {fitting_len}")
    if full <= rest:
        lines.append(f"  --kv-cache-memory {full} (or a --kv-cache-fraction of at least {full / rest:.2f})")
    if need.dtype == "float32":
        lines.append("  --dtype bfloat16 (halves the weights and every token of cache)")
    lines.append(f"  a lower --max-num-seqs (now {policy.max_num_seqs}) shrinks the activations "
                 f"({gib(need.activation_bytes)})")  # fmt: skip
    lines.append("  serve fewer models beside it")
    return "\n".join(lines)


def _parts(need: ModelNeed) -> str:
    return (
        f"weights {gib(need.weight_bytes)} {need.dtype}, activations {gib(need.activation_bytes)}, "
        f"runtime {gib(need.runtime_bytes)}"
    )


def describe(plans: tuple[MemoryPlan, ...]) -> list[str]:
    """The plan as log lines: per device, each model's share, the KV cache, total and budget."""
    lines = []
    for plan in plans:
        lines.append(f"memory plan on {plan.device}: budget {gib(plan.budget_bytes)}")
        for need in plan.needs:
            line = f"  {need.name}: {_parts(need)}"
            if need.load_peak_bytes:
                line += f", GGUF conversion first {gib(need.load_peak_bytes)} (once, freed before loading)"
            if need.is_llm:
                line += (
                    f", KV cache {gib(plan.kv_cache_bytes)} = {plan.kv_tokens(need)} tokens "
                    f"({need.kv_bytes_per_token} bytes a token, max_model_len {need.max_model_len})"
                )
            lines.append(line)
        lines.append(f"  total {gib(plan.total_bytes)} of {gib(plan.budget_bytes)}"
                     f" ({'fits' if plan.fits else 'does not fit'})")  # fmt: skip
    return lines


def gib(num_bytes: float) -> str:
    """Bytes for people: GiB above one, else MiB."""
    if abs(num_bytes) >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"
