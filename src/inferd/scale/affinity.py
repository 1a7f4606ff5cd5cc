"""Prefix affinity without Ray: a request's prefix key, and which replica already holds it.

A generation request's prefix key is a chain of hashes over fixed-size chunks of its prompt, the
same idea as the engine's prefix-cache blocks: two requests whose prompts share their first k
chunks share their first k hashes. The ingress computes the key (bounded work: at most
``MAX_CHUNKS`` chunks), the router matches it against what each replica was sent before.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import orjson

# The engine replicas the router in this process last heard are running; the ingress reads it
# to reach each one (for /metrics).
LIVE_REPLICAS: list[str] = []

CHUNK_CHARS = 64
MAX_CHUNKS = 1024  # 64K characters: beyond that, one more matching chunk changes nothing
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def prefix_hashes(method: str, path: str, body: bytes) -> tuple[int, ...]:
    """The prefix key of a chat or completion request; () for anything else or a body we cannot
    read (the replica answers that one with its own 400)."""
    if method != "POST" or path not in GENERATION_PATHS:
        return ()
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(request, dict):
        return ()
    text = prompt_text(request)
    if not text:
        return ()
    # The model and cache_salt come first: the engine shares blocks only within both.
    head = f"{request.get('model')!s}\x00{request.get('cache_salt')!s}\x00"
    return _chain(head + text)


def prompt_text(request: dict) -> str:
    """A string that grows exactly when the chat-templated prompt grows: each message's role and
    text in order (a template only adds fixed markers between them), or the completion prompt."""
    messages = request.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages[: MAX_CHUNKS * 4]:
            if isinstance(message, dict):
                parts.append(f"{message.get('role')!s}\x1f{_content_text(message.get('content'))}\x1e")
        return "".join(parts)
    prompt = request.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]  # a batch of prompts: the first one decides
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # token ids
        return ",".join(str(t) for t in prompt[: MAX_CHUNKS * CHUNK_CHARS])
    return ""


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _chain(text: str) -> tuple[int, ...]:
    hashes, previous = [], 0
    num_chunks = min(len(text) // CHUNK_CHARS, MAX_CHUNKS)
    for i in range(num_chunks):
        previous = hash((previous, text[i * CHUNK_CHARS : (i + 1) * CHUNK_CHARS]))
        hashes.append(previous)
    return tuple(hashes)


@dataclass(frozen=True, slots=True)
class AffinityPolicy:
    """When affinity wins over load: ``min_match`` is the share of a request's key a replica
    must hold; ``max_imbalance`` the in-flight difference beyond which the least-loaded wins."""

    min_match: float = 0.1
    max_imbalance: int = 8
    max_entries_per_replica: int = 1 << 16


class PrefixIndex:
    """Which chunk hashes each replica was sent, LRU-bounded per replica; single-threaded (the
    router's event loop)."""

    def __init__(self, policy: AffinityPolicy) -> None:
        self.policy = policy
        self._held: dict[Hashable, OrderedDict[int, None]] = {}

    def record(self, replica: Hashable, hashes: Sequence[int]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.policy.max_entries_per_replica:
            held.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        self._held.pop(replica, None)

    def num_matching(self, replica: Hashable, hashes: Sequence[int]) -> int:
        """How many leading chunks of ``hashes`` the replica holds (a chain: the first miss ends it)."""
        held = self._held.get(replica)
        if not held:
            return 0
        count = 0
        for h in hashes:
            if h not in held:
                break
            count += 1
        return count

    def size(self, replica: Hashable) -> int:
        return len(self._held.get(replica, ()))

    def rank(self, replicas: Sequence[Hashable], hashes: Sequence[int], loads: dict) -> list[list[Hashable]]:
        """Replicas in order of preference, one per rank (the caller tries rank by rank).

        Balanced load and a long enough match: the replicas holding the longest match first.
        Otherwise least loaded first; among equals the one holding the least, so new prefixes
        spread over the replicas."""
        if not replicas:
            return []
        load = {r: loads.get(r, 0) for r in replicas}
        by_load = sorted(replicas, key=lambda r: (load[r], self.size(r)))
        is_imbalanced = max(load.values()) - min(load.values()) > self.policy.max_imbalance
        if hashes and not is_imbalanced:
            matches = {r: self.num_matching(r, hashes) for r in replicas}
            best = max(matches.values())
            if best > 0 and best / len(hashes) >= self.policy.min_match:
                preferred = [r for r in by_load if matches[r] == best]
                return [[r] for r in preferred] + [[r] for r in by_load if matches[r] != best]
        return [[r] for r in by_load]


class Choosing:
    """Requests being routed: chosen, not yet placed. Ray counts a request on its replica only
    once it is placed there, so requests arriving together would all see the same idle replica
    and, stuck there by affinity afterwards, never spread; each one counts where it is headed
    meanwhile.

    A request is the router's own object (held, so its id cannot be reused while it counts); it
    stops counting when ``placed``, when its ``future`` is done (placed, or cancelled while
    queued), or after ``ttl_s`` whatever happened to it."""

    def __init__(self, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._chosen: dict[int, tuple[object, Hashable, float]] = {}

    def chose(self, request: object, replica: Hashable) -> None:
        """``request`` is headed for ``replica`` (a retried choice replaces the last one: the
        replica that refused it no longer counts it)."""
        self._chosen[id(request)] = (request, replica, self._clock())

    def placed(self, request: object) -> None:
        entry = self._chosen.get(id(request))
        if entry is not None and entry[0] is request:
            del self._chosen[id(request)]

    def loads(self) -> Counter:
        """Requests headed to each replica."""
        deadline = self._clock() - self._ttl_s
        for key, (request, _, at) in list(self._chosen.items()):
            if at < deadline or _is_done(request):
                del self._chosen[key]
        return Counter(replica for _, replica, _ in self._chosen.values())


def _is_done(request: object) -> bool:
    future = getattr(request, "future", None)
    return future is not None and future.done()
