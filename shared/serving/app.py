"""The local real-time server: the predictor in a Starlette app, run by uvicorn.

``POST /predict``, ``GET /health``, ``GET /stats`` (also under ``/api/``, the Functions routes).
uvicorn is a well-kept, production-grade ASGI server (under FastAPI deployments everywhere): one
asyncio process, no thread per connection, so cached hits are answered on the event loop and only
model loads go to a thread pool.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

from shared.serving.cache import ServingOptions
from shared.serving.connections import ConnectionStats, ensure_descriptors, uvicorn_settings
from shared.serving.errors import BadRequest, PayloadTooLarge, ServingError
from shared.serving.predictor import Predictor, open_predictor
from shared.serving.request import ServingResponse

logger = logging.getLogger(__name__)
GRACEFUL_SECONDS = 2


class GcKeeper:
    """Keeps Python's cyclic garbage collector from pausing requests to re-scan every cached model.

    A full collection walks every tracked object: the libraries (~140,000 objects) plus ~130 per
    cached model, so 50-200 ms with thousands of models, several times a minute while the cache
    churns (measured: 92 ms with 1,000 models). Loaded models are long-lived and acyclic (eviction
    frees them by reference counting), so every ``interval`` seconds in which models were loaded,
    everything alive is moved to the permanent generation (``gc.freeze()``: O(1), a list splice)
    and collections only ever scan what is young. Every ``full_every`` seconds everything is
    unfrozen and collected once, reclaiming cyclic garbage that was frozen along the way.
    Process-wide: :func:`serve` uses it; an app embedded in another process does not.
    """

    def __init__(self, predictor: Predictor, interval: float = 1.0, full_every: float = 600.0) -> None:
        self.predictor = predictor
        self.interval = interval
        self.full_every = full_every
        self.freezes = 0
        self.full_collections = 0
        self.last_full_ms = 0.0
        self._loads = -1
        self._last_full = time.monotonic()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._last_full >= self.full_every:
            started = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.last_full_ms = (time.perf_counter() - started) * 1000.0
            self.full_collections += 1
            self._last_full = now
            return
        loads = self.predictor.cache.stats()["loads"]
        if loads != self._loads:
            gc.freeze()
            self.freezes += 1
            self._loads = loads

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()

    def stats(self) -> dict[str, Any]:
        return {
            "freezes": self.freezes,
            "full_collections": self.full_collections,
            "last_full_ms": round(self.last_full_ms, 3),
            "frozen_objects": gc.get_freeze_count(),
            "collections": [g["collections"] for g in gc.get_stats()],
        }


class RequestTimedOut(ServingError):
    """The body did not arrive within ``read_seconds`` (408; the connection is closed)."""

    status = 408


def create_app(predictor: Predictor, gc_keeper: GcKeeper | None = None,
               connections: ConnectionStats | None = None) -> Any:
    """A Starlette app over ``predictor``: POST /predict, GET /health, GET /stats (also under /api/).

    A body must arrive within ``options.read_seconds`` (else 408, connection closed); a client that
    disconnects before sending its whole body costs one log line."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route

    def respond(result: ServingResponse) -> Response:
        return Response(
            result.json_bytes(),
            status_code=result.status,
            headers=result.headers,
            media_type="application/json",
        )

    async def predict(request: Request) -> Response:
        options = predictor.options
        try:
            body = await asyncio.wait_for(_read_body(request, options.max_body_bytes), options.read_seconds)
        except ClientDisconnect:  # nobody to answer: one line, not uvicorn's 45-line traceback
            logger.info("predict: the client %s disconnected before sending its whole body (%s bytes declared)",
                        _client(request), request.headers.get("content-length", "?"))
            return Response(status_code=400)
        except (asyncio.TimeoutError, TimeoutError):
            slow = RequestTimedOut(
                f"the body did not arrive within {options.read_seconds:g} s (MM_SERVING_READ_SECONDS)",
                "body", headers={"Connection": "close"})
            return respond(predictor._counted(predictor.error(slow)))
        except ServingError as exc:
            return respond(predictor._counted(predictor.error(exc)))
        return respond(await predictor.ahandle(body))

    async def health(request: Request) -> Response:
        return respond(await asyncio.to_thread(predictor.health))

    async def stats(request: Request) -> Response:
        body = predictor.stats()
        if gc_keeper is not None:
            body["gc"] = gc_keeper.stats()
        if connections is not None:
            body["connections"] = connections.snapshot()
        return respond(ServingResponse(200, body))

    @asynccontextmanager
    async def lifespan(app: Any):
        keeper = asyncio.create_task(gc_keeper.run()) if gc_keeper is not None else None
        try:
            yield
        finally:
            if keeper is not None:
                keeper.cancel()
            await asyncio.to_thread(predictor.close)

    routes = []
    for prefix in ("", "/api"):
        routes += [
            Route(f"{prefix}/predict", predict, methods=["POST"]),
            Route(f"{prefix}/health", health, methods=["GET"]),
            Route(f"{prefix}/stats", stats, methods=["GET"]),
        ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.predictor = predictor
    return app


def _client(request: Any) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "?"


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (header or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise BadRequest(f"bad Content-Length header {declared!r}", "content-length") from exc
        if size > limit:
            raise PayloadTooLarge(f"the body has {size} bytes; the limit is {limit}", "body", limit=limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", "body", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def serve(
    workdir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8080,
    cache_mb: float | None = None,
    options: ServingOptions | None = None,
    log_level: str = "info",
) -> None:
    """Serve a workdir's production models over HTTP with uvicorn until interrupted.

    Nothing is written to the workdir: local registries are opened read-only
    (:mod:`shared.serving.readonly`), so the server's account needs only read access. Settings come
    from the ``MM_SERVING_*`` variables; ``cache_mb`` (the ``--cache-mb`` flag) wins when given.
    Connections are bounded (:mod:`shared.serving.connections`)."""
    import uvicorn

    from shared.runs.backends import LOCAL, registry_backend, registry_exists
    from shared.config import ConfigError
    from shared.runs.pipeline import PipelineError
    from shared.runs.workspace import Workspace

    try:
        options = options or ServingOptions.from_env(cache_mb=cache_mb)
        ensure_descriptors(options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    workspace = Workspace.open(workdir, remember=False)
    if not registry_exists(workspace, "prod"):
        raise PipelineError(
            f"no production registry in {workspace.root}: run 'manymodels run' (or train and promote) first"
        )
    root = workspace.root
    if registry_backend(workspace.settings) == LOCAL:
        from shared.config import chain_reads_dev
        from shared.serving.readonly import read_only_registries

        chain = workspace.config.scoring_chain
        prod, dev = read_only_registries(workspace, chain_reads_dev(chain))
        predictor = Predictor(workspace.config, options.make_cache(prod, dev, chain), options)
    else:
        predictor = open_predictor(workspace, options)
    _log_like_uvicorn(log_level)
    predictor.warm_up()
    gc.collect()
    gc.freeze()  # the libraries' objects: never worth scanning again
    # the event loop answers hits while loader threads unpickle: hand the GIL over sooner (default 5 ms)
    sys.setswitchinterval(0.001)
    logger.info("serving %s with a %s MB model cache, at most %d connections", root, options.cache_mb,
                options.max_connections)
    connections = ConnectionStats(options)
    config = uvicorn.Config(
        create_app(predictor, GcKeeper(predictor), connections),
        host=host,
        port=int(port),
        log_level=log_level,
        access_log=False,
        # SIGTERM stops the server within seconds: in-flight requests get this long to finish, and
        # forecasts run on daemon threads that never hold the process (Predictor.pool)
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        **uvicorn_settings(options, connections),
    )
    uvicorn.Server(config).run()


def _log_like_uvicorn(log_level: str) -> None:
    """The library's log lines (``shared.*``: a disconnect, a failed request, the connection summary)
    beside uvicorn's, at its level and in its format, unless the embedding program set logging up."""
    from uvicorn.logging import DefaultFormatter

    log = logging.getLogger("shared")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(log_level.upper())
