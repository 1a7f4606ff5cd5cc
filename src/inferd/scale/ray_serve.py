"""``inferd serve --replicas N``: inferd's app as N Ray Serve replicas behind one thin ingress.

Each engine replica runs the whole single-server app (``create_app``: its lifespan loads the
models; middleware, auth, limits, routes, errors and SSE are that app's code), so the API is the
same by construction. The ingress only reads the request (bounded), computes its prefix key, and
forwards it through a ``DeploymentHandle`` whose ``PrefixAffinityRouter`` picks the replica; the
response streams back chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from inferd.api.errors import domain_error_response
from inferd.api.streaming import DONE, error_event
from inferd.config.settings import ServerSettings, load_settings
from inferd.errors import BodyTimeoutError, EngineUnavailableError
from inferd.scale.affinity import LIVE_REPLICAS, prefix_hashes
from inferd.scale.bridge import ForwardedRequest, ResponseStart, run_asgi
from inferd.scale.exposition import merge_expositions

log = logging.getLogger("inferd.scale")

APP_NAME = "inferd"
REPLICA_HEADER = b"x-inferd-replica"
_OFF_LOOP_BYTES = 256 * 1024  # parsing a body this large would stall the ingress's loop
_ATTEMPTS = 3  # replicas a request may try, when each one dies before answering
_METRICS_WAIT_S = 10.0  # a replica too busy to answer a scrape in this long is left out of it
# A replica that died (killed, OOM-killed, its node gone): a request it had not answered is
# retried elsewhere.
REPLICA_DIED = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
)
# Also a replica out of reach (ActorUnavailableError: it may still be running the request, so
# that one is not retried, and answered 503).
REPLICA_GONE = (*REPLICA_DIED, ray.exceptions.RayActorError)


class EngineReplica:
    """One replica: the single-server app with its engines, driven over ASGI in this process."""

    async def __init__(self, settings: ServerSettings) -> None:
        from inferd.api.app import create_app
        from inferd.api.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        self._app = create_app(settings)
        self._stack = AsyncExitStack()
        await self._stack.enter_async_context(self._app.router.lifespan_context(self._app))
        self._name = serve.get_replica_context().replica_id.unique_id.encode()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Any]:
        """The response to ``request``: a ``ResponseStart``, then body chunks."""
        async for item in run_asgi(self._app, request, [(REPLICA_HEADER, self._name)]):
            yield item

    async def __del__(self) -> None:
        await self._stack.aclose()  # the lifespan's exit: engines stop, weights are freed


class Ingress:
    """Ray's HTTP proxy hands every request here; it reads and forwards it, nothing more."""

    def __init__(self, engine: DeploymentHandle, settings: ServerSettings) -> None:
        self._engine = engine.options(stream=True)
        self._max_bytes = settings.max_request_bytes
        self._body_timeout = settings.body_timeout

    async def __call__(self, request: Request) -> Response:
        body = await self._read_body(request)
        if body is None:
            late = BodyTimeoutError(f"the request body did not arrive within {self._body_timeout:g}s")
            return domain_error_response(request.url.path, late)
        forwarded = await self._forwarded(request, body)
        if forwarded.method == "GET" and forwarded.path == "/metrics":
            return await self._metrics(forwarded)
        return await self._send(forwarded)

    async def _send(self, forwarded: ForwardedRequest) -> Response:
        """Forward to a replica. Nothing reaches the client until the replica's first body chunk
        is here, so a replica that dies before it (mid-prefill, say) costs a retry on another
        replica, not the request; once bytes are out, an event stream ends with an error event."""
        for attempt in range(1, _ATTEMPTS + 1):
            stream: DeploymentResponseGenerator = self._engine.forward.remote(forwarded)
            try:
                start = await stream.__anext__()
                first = await anext(stream, b"")
            except REPLICA_DIED as exc:
                stream.cancel()
                log.warning(
                    "a replica died before answering %s (try %d of %d): %s",
                    forwarded.path,
                    attempt,
                    _ATTEMPTS,
                    type(exc).__name__,
                )
                continue
            except REPLICA_GONE as exc:
                stream.cancel()
                unreachable = EngineUnavailableError(
                    f"the replica is unreachable ({type(exc).__name__}); retry"
                )
                return domain_error_response(forwarded.path, unreachable)
            except BaseException:
                stream.cancel()
                raise
            assert isinstance(start, ResponseStart)
            sse = _header(start.headers, b"content-type").startswith(b"text/event-stream")
            return _with_headers(
                StreamingResponse(_body(first, stream, sse), status_code=start.status), start
            )
        gone = EngineUnavailableError(f"{_ATTEMPTS} replicas in a row stopped before answering; retry later")
        return domain_error_response(forwarded.path, gone)

    async def _metrics(self, forwarded: ForwardedRequest) -> Response:
        """Every replica's metrics in one exposition, each sample labelled with its replica."""
        targets = list(LIVE_REPLICAS) or [None]  # none known yet: whichever replica the router picks
        texts: dict[str, str] = {}
        media_type = ""
        # One after another: Ray's router matches a routed replica to its call by the HTTP
        # request's id, which calls made at once from one request would share.
        for target in targets:
            try:
                answer = await asyncio.wait_for(
                    self._collect(replace(forwarded, target_replica=target)), _METRICS_WAIT_S
                )
            except (*REPLICA_GONE, TimeoutError) as exc:
                # Gone since the router last heard, or too busy: left out of this scrape.
                log.warning("replica %s left out of /metrics: %s", target, type(exc).__name__)
                continue
            if isinstance(answer, Response):
                return answer  # a replica refused (no key, say): its answer is the answer
            replica, text, media_type = answer
            texts[replica] = text
        if not texts:
            return domain_error_response(forwarded.path, EngineUnavailableError("no replica answered"))
        merged = await asyncio.to_thread(merge_expositions, texts)  # N parses: off the ingress's loop
        return Response(merged, media_type=media_type)

    async def _collect(self, forwarded: ForwardedRequest) -> tuple[str, str, str] | Response:
        chunks: list[bytes] = []
        start = None
        stream: DeploymentResponseGenerator = self._engine.forward.remote(forwarded)
        try:
            async for item in stream:
                if isinstance(item, ResponseStart):
                    start = item
                else:
                    chunks.append(item)
        finally:
            stream.cancel()  # a no-op once it ended; a scrape given up on stops on the replica
        assert start is not None
        body = b"".join(chunks)
        if start.status != 200:
            return _with_headers(Response(body, status_code=start.status), start)
        replica = _header(start.headers, REPLICA_HEADER).decode()
        return replica, body.decode(), _header(start.headers, b"content-type").decode()

    async def _read_body(self, request: Request) -> bytes | None:
        """At most one byte over the limit (the replica answers that with its own 413), or None
        when the body is slower than ``body_timeout``."""
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                chunks.append(chunk)
                size += len(chunk)
                if size > self._max_bytes:
                    break

        try:
            await asyncio.wait_for(read(), self._body_timeout)
        except TimeoutError:
            return None
        return b"".join(chunks)[: self._max_bytes + 1]

    async def _forwarded(self, request: Request, body: bytes) -> ForwardedRequest:
        scope = request.scope
        method, path = scope["method"], scope["path"]
        if len(body) > _OFF_LOOP_BYTES:
            hashes = await asyncio.to_thread(prefix_hashes, method, path, body)
        else:
            hashes = prefix_hashes(method, path, body)
        client = scope.get("client")
        return ForwardedRequest(
            method=method,
            path=path,
            query_string=scope.get("query_string", b""),
            headers=list(scope["headers"]),
            body=body,
            client=tuple(client) if client else None,
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
            prefix_hashes=hashes,
        )


async def _body(first: bytes, stream: DeploymentResponseGenerator, sse: bool) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in stream:
            yield chunk
    except REPLICA_GONE:
        if not sse:
            raise  # half a body is out: closing the connection is the only honest answer
        log.warning("the replica serving a stream died; the stream ends with an error event")
        yield error_event(EngineUnavailableError("the replica serving this stream stopped")) + DONE
    finally:
        stream.cancel()  # the client left mid-stream: the replica's request is aborted


def _with_headers(response: Response, start: ResponseStart) -> Response:
    """The replica's headers on the ingress's response. Ray's proxy adds its own X-Request-ID (the
    one the replica was given): one copy stays."""
    response.raw_headers = [(k, v) for k, v in start.headers if k.lower() != b"x-request-id"]
    return response


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next((v for k, v in headers if k.lower() == name), b"")


def build_app(settings: ServerSettings, min_match: float = 0.1, max_imbalance: int = 8) -> Any:
    """The Ray Serve application: ``settings.replicas`` engine replicas behind one ingress."""
    per_replica = settings.max_num_seqs + settings.max_queued_requests  # its own 429s still apply
    threads = settings.num_threads or max(1, int(settings.cpus_per_replica))
    replica_settings = settings.model_copy(update={"num_threads": threads})
    engine = serve.deployment(
        EngineReplica,
        name="engine",
        **_replica_count(settings),
        ray_actor_options={"num_cpus": settings.cpus_per_replica},
        max_ongoing_requests=per_replica,
        health_check_period_s=10,
        # Ray's stop of a replica (scale-down, redeploy, shutdown) is inferd's drain: requests
        # in flight get drain_timeout to finish before the replica's lifespan exits.
        graceful_shutdown_timeout_s=settings.drain_timeout,
        **_routing(settings, min_match, max_imbalance),
    ).bind(replica_settings)
    ingress = serve.deployment(
        Ingress,
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},  # I/O only: the cores belong to the engines
        max_ongoing_requests=per_replica * (settings.max_replicas or settings.replicas),
    )
    return ingress.bind(engine, settings)


def _routing(settings: ServerSettings, min_match: float, max_imbalance: int) -> dict[str, Any]:
    if settings.ray_routing == "power-of-two":
        return {}  # Ray Serve's default router
    config = RequestRouterConfig(
        request_router_class="inferd.scale.router:PrefixAffinityRouter",
        request_router_kwargs={"min_match": min_match, "max_imbalance": max_imbalance},
    )
    return {"request_router_config": config}


def _replica_count(settings: ServerSettings) -> dict[str, Any]:
    """A fixed count, or Ray Serve's autoscaling on queue depth between replicas and max_replicas."""
    if not settings.max_replicas or settings.max_replicas == settings.replicas:
        return {"num_replicas": settings.replicas}
    target = settings.autoscale_target or settings.max_num_seqs
    return {
        "num_replicas": "auto",
        "autoscaling_config": {
            "min_replicas": settings.replicas,
            "initial_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": target,
        },
    }


def app(args: dict[str, Any]) -> Any:
    """The application builder Ray Serve's config files name (``import_path:
    inferd.scale.ray_serve:app``, as KubeRay's ``serveConfigV2`` does): ``args`` are inferd's
    settings under their config-file names; ``INFERD_*`` variables fill in the rest."""
    return build_app(load_settings(dict(args)))


def check_cluster(settings: ServerSettings) -> None:
    """Refuse before deploying what the cluster cannot place (Ray would wait forever)."""
    offered = ray.cluster_resources().get("CPU", 0)
    wanted = settings.replicas * settings.cpus_per_replica
    if wanted > offered:
        raise ValueError(
            f"{settings.replicas} replicas x {settings.cpus_per_replica:g} CPUs need {wanted:g} CPUs; "
            f"the Ray cluster offers {offered:g}"
        )


def connect(settings: ServerSettings) -> None:
    """Start or join the cluster (once per process)."""
    if not ray.is_initialized():
        ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=True)


def start(settings: ServerSettings, **router: Any) -> None:
    """Start or join the cluster and deploy; returns once every replica is ready."""
    connect(settings)
    check_cluster(settings)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, **router), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("serving on http://%s:%d: %d replicas on Ray", settings.host, settings.port, settings.replicas)


def serve_on_ray(settings: ServerSettings) -> None:
    """``inferd serve`` on Ray: deploy, then wait for SIGINT/SIGTERM and take the app down.

    The handlers go in after ``ray.init`` (which sets its own SIGTERM handler, an exit that would
    skip the drain) and before deploying, so a signal while the replicas load only asks to stop
    once they are up: as a KeyboardInterrupt it would land in Ray's own waiting loop, which
    swallows it and leaves the server running."""
    connect(settings)
    stop = threading.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda signum, frame: stop.set())
    try:
        start(settings)
        stop.wait()
        log.info("stopping: replicas get up to %gs to finish their requests", settings.drain_timeout)
        serve.delete(APP_NAME)
    finally:
        if settings.ray_address is None:  # a cluster we started: ours to stop
            serve.shutdown()
            ray.shutdown()
