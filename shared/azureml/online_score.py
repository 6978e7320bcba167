"""Scoring script of the Azure ML managed online endpoint: ``init()`` once, ``run(raw_data)`` per request.

Models are loaded **on demand**: ``init()`` opens the production registry's index (a few MB) and
nothing else; a request's partition is looked up in the index (one primary-key read), its model
loaded on first use and kept in the core's bounded LRU cache (:class:`shared.model_cache.ModelCache`:
by count and by bytes held), so memory stays flat while requests cycle through 10,000 partitions.
Concurrent first requests for one model load it once (single-flight). A newly promoted version is
noticed through the registry's change counter, read at most every ``MM_SERVING_REFRESH_SECONDS``
(the registry pulls the new index when the lake's ``HEAD`` moved), never by reloading per request.

Request (JSON): ``{"partition": {"store": "s1", "item": "i7"}}`` or ``{"partition_id": "p..."}``,
plus ``"horizon": 8`` or ``"rows": [{"date": "2025-01-05", "price": 3.2, "promo": 0}, ...]``
(neither: the trained horizon). Response: the partition, model name, version and run id, and
``predictions`` as ``[{<time column>: ..., "prediction": ...}]``. Errors: 400 (bad request, names
the field), 404 (no production model for the partition), 503 (the model failed to load; not
cached, other partitions unaffected).

Environment: ``MM_SERVING_STORAGE_URL`` (blob endpoint of the registry's storage; identity via
``AZURE_CLIENT_ID``) or ``MM_SERVING_LAKE_DIR`` (a local lake folder, to run this script on a
laptop), ``MM_SERVING_REGISTRY_PREFIX``, ``MM_PARTITION_KEYS``, ``MM_SERVING_CACHE_MB``,
``MM_SERVING_CACHE_MODELS``, ``MM_SERVING_REFRESH_SECONDS``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # The inference server loads this file by path; the snapshot root holds the ``shared`` package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.errors import ManyModelsError  # noqa: E402
from shared.keys import PARTITION_ID, partition_id  # noqa: E402
from shared.model_cache import ModelCache, ModelLoadError, ModelNotFoundError  # noqa: E402


class RequestError(ManyModelsError, ValueError):
    """A request the endpoint answers with an HTTP error: ``status`` and a message naming the cause."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _State:
    registry: Any
    cache: ModelCache
    keys: list[str]


# The inference server passes nothing from init() to run() but module state: this one holder.
_state: _State | None = None


def open_registry(environ: dict[str, str] | None = None) -> Any:
    """The production registry, read-only, from blob storage or (offline) a local lake folder."""
    from shared.azureml.registry import PROD_PREFIX, AzureMLRegistry

    env = os.environ if environ is None else environ
    if env.get("MM_SERVING_STORAGE_URL"):
        from shared.lake_blob import BlobLake

        lake = BlobLake.from_account_url(env["MM_SERVING_STORAGE_URL"],
                                         managed_identity_client_id=env.get("AZURE_CLIENT_ID") or None)
    elif env.get("MM_SERVING_LAKE_DIR"):
        from shared.lake import LocalLake

        lake = LocalLake(env["MM_SERVING_LAKE_DIR"])
    else:
        raise RuntimeError("online_score needs MM_SERVING_STORAGE_URL (Azure) or MM_SERVING_LAKE_DIR (local)")
    cache_dir = Path(env.get("MM_SERVING_CACHE_DIR") or Path(tempfile.gettempdir()) / "manymodels-serving")
    return AzureMLRegistry("prod", lake, cache_dir, publisher=None,
                           prefix=env.get("MM_SERVING_REGISTRY_PREFIX") or PROD_PREFIX,
                           refresh_seconds=float(env.get("MM_SERVING_REFRESH_SECONDS") or 30))


def init() -> None:
    global _state
    registry = open_registry()
    registry.refresh(force=True)
    refresh_seconds = float(os.environ.get("MM_SERVING_REFRESH_SECONDS") or 30)
    cache = ModelCache(registry, None, fallback="none",
                       max_bytes=int(float(os.environ.get("MM_SERVING_CACHE_MB") or 512) * 2**20),
                       max_entries=int(os.environ.get("MM_SERVING_CACHE_MODELS") or 20_000),
                       check_interval_ms=refresh_seconds * 1000.0)
    keys = [k for k in (os.environ.get("MM_PARTITION_KEYS") or "").split(",") if k]
    _state = _State(registry=registry, cache=cache, keys=keys)


def run(raw_data: str | bytes | dict[str, Any]) -> Any:
    """Answer one request; errors become HTTP responses with their status, never a crash."""
    if _state is None:
        raise RuntimeError("run() called before init()")
    try:
        return predict(raw_data, _state)
    except RequestError as exc:
        return _error_response(exc.status, str(exc))


def predict(raw_data: str | bytes | dict[str, Any], state: _State) -> dict[str, Any]:
    import pandas as pd

    body = _parse(raw_data)
    pid = _partition_of(body, state.keys)
    try:
        cached = state.cache.get(pid)
    except ModelNotFoundError as exc:
        raise RequestError(404, f"no production model for partition {pid}") from exc
    except ModelLoadError as exc:  # reported as 503 with its reason; the cache keeps nothing
        raise RequestError(503, f"model of partition {pid} v{exc.version} failed to load: {exc.reason}") from exc
    record, bundle = cached.record, cached.bundle
    horizon = body.get("horizon")
    rows = body.get("rows")
    if horizon is not None and rows is not None:
        raise RequestError(400, "give 'horizon' or 'rows', not both")
    if horizon is not None and (not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1):
        raise RequestError(400, f"'horizon' must be a whole number >= 1, got {horizon!r}")
    if rows is not None and (not isinstance(rows, list) or not rows
                             or not all(isinstance(r, dict) for r in rows)):
        raise RequestError(400, "'rows' must be a non-empty list of objects")
    try:
        out = bundle.predict(future=pd.DataFrame(rows) if rows is not None else None, horizon=horizon)
    except ValueError as exc:
        raise RequestError(400, f"rows: {exc}") from exc
    time_col = bundle.time_column
    times = out[time_col]
    if pd.api.types.is_datetime64_any_dtype(times):
        times = times.dt.strftime("%Y-%m-%d")
    return {
        PARTITION_ID: pid,
        "keys": dict(getattr(bundle, "keys", {}) or record.keys),
        "model": record.model_type,
        "model_version": record.version,
        "run_id": record.run_id,
        "predictions": [{time_col: t, "prediction": float(p)}
                        for t, p in zip(times.tolist(), out["prediction"].tolist())],
    }


def cache_stats() -> dict[str, Any]:
    if _state is None:
        raise RuntimeError("cache_stats() called before init()")
    stats = _state.cache.stats()
    # this endpoint's own counting (kept from before the core cache): a miss is a request that
    # performed a load, a hit any other answered request (waiters on a concurrent load included)
    answered = stats["hits"] + stats["misses"]
    misses = stats["loads"] + stats["load_failures"]
    return {**stats, "models": stats["entries"], "hits": answered - stats["loads"], "misses": misses}


def _parse(raw_data: str | bytes | dict[str, Any]) -> dict[str, Any]:
    if isinstance(raw_data, dict):
        return raw_data
    try:
        body = json.loads(raw_data)
    except (TypeError, ValueError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "body: expected a JSON object")
    return body


def _partition_of(body: dict[str, Any], keys: list[str]) -> str:
    if body.get(PARTITION_ID):
        return str(body[PARTITION_ID])
    partition = body.get("partition")
    if not isinstance(partition, dict):
        raise RequestError(400, "'partition' (an object of key values) or 'partition_id' is required")
    if not keys:
        raise RequestError(400, "'partition_id' is required: the endpoint has no MM_PARTITION_KEYS")
    missing = [k for k in keys if k not in partition]
    if missing:
        raise RequestError(400, f"partition: missing key(s) {missing}")
    return partition_id([partition[k] for k in keys])


def _error_response(status: int, message: str) -> Any:
    """The inference server's AMLResponse when it is there (in Azure); a plain dict elsewhere."""
    body = {"error": message, "status": status}
    try:
        from azureml_inference_server_http.api.aml_response import AMLResponse
    except ImportError:  # running outside the inference server (tests, a laptop)
        return body
    return AMLResponse(json.dumps(body), status, json_str=True)
