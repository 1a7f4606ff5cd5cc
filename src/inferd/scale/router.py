"""The request router of the engine deployment: prefix affinity on Ray Serve's public router API.

Ray's own ``PrefixCacheAffinityRouter`` lives in ``ray.serve.llm``, which needs the ``ray[llm]``
extra (pyarrow, and vLLM to be useful) and reads raw message text; this one keeps inferd's
chained chunk hashes (``affinity.prefix_hashes``) in the ingress process, where it runs.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from inferd.scale import affinity
from inferd.scale.affinity import AffinityPolicy, Choosing, PrefixIndex
from inferd.scale.bridge import ForwardedRequest


class PrefixAffinityRouter(RequestRouter):
    """Generation requests go where their prompt's prefix went before, unless the load is
    imbalanced; everything else (encoders, admin, probes) goes to the least-loaded replica."""

    def initialize_state(self, min_match: float = 0.1, max_imbalance: int = 8, **_: Any) -> None:
        self._index = PrefixIndex(AffinityPolicy(min_match=min_match, max_imbalance=max_imbalance))
        self._choosing = Choosing()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # Through the module: Ray ships this class by value, with copies of the globals it names.
        affinity.LIVE_REPLICAS[:] = [r.replica_id.unique_id for r in replicas]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        request = _forwarded(pending_request)
        if request is not None and request.target_replica is not None:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == request.target_replica]
            if chosen:
                return [chosen]
            # Gone meanwhile: routed as usual below, and its answer says where it ran.
        by_id = {r.replica_id: r for r in candidate_replicas}
        headed = self._choosing.loads()
        loads = {rid: (self.replica_queue_len_cache.get(rid) or 0) + headed[rid] for rid in by_id}
        hashes = _hashes(pending_request)
        ranks = self._index.rank(list(by_id), hashes, loads)
        if ranks and pending_request is not None:
            first = ranks[0][0]
            self._choosing.chose(pending_request, first)
            if hashes:  # a request with the same prefix arriving meanwhile follows this one
                self._index.record(first, hashes)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._choosing.placed(pending_request)
        hashes = _hashes(pending_request)
        if hashes:
            self._index.record(replica_id, hashes)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id)
        if replica_id.unique_id in affinity.LIVE_REPLICAS:
            affinity.LIVE_REPLICAS.remove(replica_id.unique_id)


def _forwarded(pending_request: PendingRequest | None) -> ForwardedRequest | None:
    if pending_request is None:
        return None
    return next((a for a in pending_request.args if isinstance(a, ForwardedRequest)), None)


def _hashes(pending_request: PendingRequest | None) -> tuple[int, ...]:
    request = _forwarded(pending_request)
    return request.prefix_hashes if request is not None else ()
