"""HTTP: real-time predictions from the production models, loaded on demand into a bounded cache.

``POST /api/predict`` (function key) takes ``{"keys": {...}, "rows": [...]}`` or
``{"keys": {...}, "horizon": N}`` and answers like ``manymodels serve`` does: the same core
(:class:`shared.serving.Predictor` over :class:`shared.forecasts.model_cache.ModelCache`), the same errors
(400 naming the field, 404 naming the partition, 413, 503 with the reason). ``GET /api/health``
reads the production index once.

The predictor and its cache live as long as the worker process: made on the first request (never
at import, so indexing the app reads no setting), then shared by every invocation of the worker.
Cache limits come from the ``MM_SERVING_*`` variables (:class:`shared.serving.ServingOptions`).
"""

from __future__ import annotations

import asyncio
import threading

import azure.functions as func

from function_app.runtime import load_settings, open_workspace
from shared.serving import Predictor, ServingOptions, ServingResponse, open_predictor

bp = func.Blueprint()


class WorkerPredictor:
    """The worker's one predictor, made lazily under a lock; ``reset`` drops it (tests, redeploys)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._predictor: Predictor | None = None

    def get(self) -> Predictor:
        if self._predictor is None:
            with self._lock:
                if self._predictor is None:
                    workspace = open_workspace(settings=load_settings())
                    self._predictor = open_predictor(workspace, ServingOptions.from_env())
        return self._predictor

    async def aget(self) -> Predictor:
        if self._predictor is not None:
            return self._predictor
        return await asyncio.to_thread(self.get)  # opening the registries is I/O

    def reset(self) -> None:
        with self._lock:
            predictor, self._predictor = self._predictor, None
        if predictor is not None:
            predictor.close()


worker_predictor = WorkerPredictor()


@bp.route(route="predict", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def predict_partition(req: func.HttpRequest) -> func.HttpResponse:
    """POST /api/predict {keys | partition_id, rows | horizon}: one partition's predictions."""
    predictor = await worker_predictor.aget()
    return _http(await predictor.ahandle(req.get_body()))


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def serving_health(req: func.HttpRequest) -> func.HttpResponse:
    """GET /api/health: 200 when the production model index answers, else 503 with the reason."""
    predictor = await worker_predictor.aget()
    return _http(await asyncio.to_thread(predictor.health))


def _http(result: ServingResponse) -> func.HttpResponse:
    return func.HttpResponse(
        result.json_bytes(), status_code=result.status, headers=result.headers, mimetype="application/json"
    )
