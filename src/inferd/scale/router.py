"""The request router of the engine deployment: prefix affinity on Ray Serve's public router API.

Ray's own ``PrefixCacheAffinityRouter`` lives in ``ray.serve.llm``, which needs the ``ray[llm]``
extra (pyarrow, and vLLM to be useful) and reads raw message text; this one keeps inferd's
chained chunk hashes (``affinity.prefix_hashes``) in the ingress process, where it runs.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from inferd.scale.affinity import AffinityPolicy, PrefixIndex
from inferd.scale.bridge import ForwardedRequest


class PrefixAffinityRouter(RequestRouter):
    """Generation requests go where their prompt's prefix went before, unless the load is
    imbalanced; everything else (encoders, admin, probes) goes to the least-loaded replica."""

    def initialize_state(self, min_match: float = 0.1, max_imbalance: int = 8, **_: Any) -> None:
        self._index = PrefixIndex(AffinityPolicy(min_match=min_match, max_imbalance=max_imbalance))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {rid: self.replica_queue_len_cache.get(rid) or 0 for rid in by_id}
        ranks = self._index.rank(list(by_id), _hashes(pending_request), loads)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = _hashes(pending_request)
        if hashes:
            self._index.record(replica_id, hashes)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id)


def _hashes(pending_request: PendingRequest | None) -> tuple[int, ...]:
    if pending_request is None:
        return ()
    for arg in pending_request.args:
        if isinstance(arg, ForwardedRequest):
            return arg.prefix_hashes
    return ()
