"""The scheduler: one rule for prefill, chunked prefill, decode and recompute.

Every request has ``num_computed_tokens`` that catches up with ``num_tokens``. Each step hands out at
most ``max_num_batched_tokens`` new tokens: first to running requests in arrival order (a decode
needs one, an unfinished prefill the rest of its prompt, cut to what the budget leaves), then to
waiting requests, whose cached prefix is skipped. While any request decodes, one prompt with more
than ``prefill_tokens_while_decoding`` tokens left to compute (a RAG context, a preempted request's
recompute) gets that many a step, the first in line: a long prompt then goes in a few chunks
between the decoders' tokens instead of stalling each of them for its whole prefill; the other
long ones wait without holding up shorter prompts, which go whole, as before. When blocks
run out, the most recently admitted running request is preempted: its blocks are freed and it
waits to be recomputed.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from inferd.config.engine import LLMConfig
from inferd.llm.kv_cache.manager import KVCacheManager
from inferd.llm.request import FinishReason, Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # the draft tokens included
    num_drafts: int = 0  # the request's draft tokens computed after its last known token

    @property
    def reaches_end(self) -> bool:
        """Whether this chunk computes the request's last known token, so a new one is sampled."""
        computed = self.request.num_computed_tokens + self.num_new_tokens - self.num_drafts
        return computed == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting and running queues and the KV cache manager's allocations."""

    def __init__(self, config: LLMConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_finished: Counter[str] = Counter()  # by finish reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        long = _LongPrompts(self.config.prefill_tokens_while_decoding, self.running)
        budget = self._schedule_running(output, budget, long)
        if not output.preempted:
            self._schedule_waiting(output, budget, long)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int, long: _LongPrompts) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = long.take(remaining, min(remaining, budget))
            if num_new == 0:  # a long prompt whose turn is not this step
                index += 1
                continue
            # A decode may take its drafts along, as far as the budget goes and as long as free
            # blocks hold them: guesses never preempt anyone.
            drafts = min(len(request.draft_token_ids), budget - 1) if num_new == 1 else 0
            if drafts and not self._allocate(request, num_new + drafts):
                drafts = 0  # a refused allocate changes nothing
            while not self._allocate(request, num_new + drafts):
                victim = self.running[-1]
                self._preempt(victim, output)
                if victim is request:
                    return budget
            output.scheduled.append(ScheduledRequest(request, num_new + drafts, drafts))
            budget -= num_new + drafts
            index += 1
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int, long: _LongPrompts) -> None:
        skipped: list[Request] = []  # long prompts whose turn is not this step: they keep their place
        try:
            self._admit(output, budget, long, skipped)
        finally:
            self.waiting.extendleft(reversed(skipped))

    def _admit(self, output: SchedulerOutput, budget: int, long: _LongPrompts, skipped: list[Request]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = None
            # Prompt logprobs need the logits of every prompt position: no skipping cached ones.
            if request.num_computed_tokens == 0 and not request.wants_prompt_logprobs:
                cached = self.kv_cache.find_cached_prefix(request.token_ids, request.cache_salt)
                if self._prefix_in_flight(request, cached.num_tokens):
                    return
            num_computed = cached.num_tokens if cached else request.num_computed_tokens
            remaining = request.num_tokens - num_computed
            num_new = long.take(remaining, min(remaining, budget))
            if num_new == 0:
                skipped.append(self.waiting.popleft())
                continue
            table = self.kv_cache.allocate(
                request.request_id, request.token_ids, num_computed, num_new, cached
            )
            if table is None:
                return
            self.waiting.popleft()
            if not request.is_prefix_checked:
                request.num_cached_tokens = num_computed
                request.is_prefix_checked = True
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _prefix_in_flight(self, request: Request, num_cached: int) -> bool:
        """Whether a running request still prefilling shares more full prompt blocks with this one
        than the cache already holds. Waiting one step for it turns those blocks into prefix-cache
        hits (n > 1 choices, many requests behind one system prompt) instead of computing them
        twice; requests whose shared part is already cached are admitted at once."""
        if not self.config.enable_prefix_caching:
            return False
        size = self.kv_cache.block_size
        prompt = request.prompt_token_ids
        for other in self.running:
            # Another salt's blocks are never shared: waiting for them would only tell the timing.
            if other.num_computed_tokens >= other.num_prompt_tokens or other.cache_salt != request.cache_salt:
                continue
            shared = _shared_full_blocks(prompt, other.prompt_token_ids, size, len(prompt) - 1)
            if shared * size > num_cached:
                return True
        return False

    def _allocate(self, request: Request, num_new: int) -> bool:
        table = self.kv_cache.allocate(
            request.request_id, request.token_ids, request.num_computed_tokens, num_new
        )
        return table is not None

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.draft_token_ids = []
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        output.preempted.append(request)
        self.num_preemptions += 1

    def update_computed(self, output: SchedulerOutput) -> None:
        """After a forward: advance each request and cache its newly full blocks. Draft tokens
        are not counted: the engine counts each one verification accepts as it appends it."""
        for item in output.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens - item.num_drafts
            self.kv_cache.commit(
                request.request_id, request.token_ids, request.num_computed_tokens, request.cache_salt
            )

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Remove a request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.num_finished[reason.value] += 1


class _LongPrompts:
    """While any of ``running`` decodes, one prompt with more than ``cap`` tokens left to compute
    (a RAG context, a preempted request's recompute) gets ``cap`` of them a step, the first in line;
    the others wait for a later step. Prompts with at most ``cap`` left go whole."""

    def __init__(self, cap: int | None, running: list[Request]) -> None:
        # a request that has computed its whole prompt is decoding (its drafts aside); no limit, no scan
        decoding = cap is not None and any(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        self.cap = cap if decoding else None  # None: no limit this step
        self.taken = False  # this step's long chunk went out

    def take(self, remaining: int, num_new: int) -> int:
        """Of ``num_new`` tokens for a prompt with ``remaining`` left, what this step gives it."""
        if self.cap is None or remaining <= self.cap:
            return num_new
        if self.taken:
            return 0
        self.taken = True
        return min(num_new, self.cap)


def _shared_full_blocks(a: list[int], b: list[int], size: int, limit: int) -> int:
    """How many leading full blocks of ``size`` tokens ``a`` and ``b`` share, within ``limit`` tokens."""
    count = 0
    end = min(len(a), len(b), limit)
    while (count + 1) * size <= end and a[count * size : (count + 1) * size] == b[
        count * size : (count + 1) * size
    ]:
        count += 1
    return count
