"""Scoring script of the Azure ML managed online endpoint: ``init()`` once, ``run(raw_data)`` per request.

Models are loaded **on demand**: ``init()`` opens the production registry's index (a few MB) and,
when the scoring chain goes past production (the default), the development registry's index; a request's partition is looked up in the index (one primary-key read), its model
loaded on first use and kept in the core's bounded LRU cache (:class:`shared.forecasts.model_cache.ModelCache`:
by count and by bytes held), so memory stays flat while requests cycle through 10,000 partitions.
Concurrent first requests for one model load it once (single-flight). A newly promoted version is
noticed through the registry's change counter, read at most every ``MM_SERVING_REFRESH_SECONDS``
(the registry pulls the new index when the lake's ``HEAD`` moved), never by reloading per request.

Request and response are the contract of every real-time front end — the local server
(``manymodels serve``), the Functions route ``POST /api/predict`` and this endpoint — parsed and
answered by one module, :class:`shared.serving.Predictor`::

    {"keys": {"store": "S01", "item": "I7"}, "horizon": 8}
    {"partition_id": "p...", "rows": [{"date": "2025-01-05", "price": 3.2, "promo": 0}, ...]}

Errors carry their HTTP status and the JSON body the other front ends give (``error``,
``status``, ``field``...): 400, 404, 413, 503. The body is returned as a dict to the inference
server's ``AMLResponse(..., json_str=True)``, which encodes it once (an already-encoded string
would be encoded a second time: a JSON string holding JSON).

Environment: ``MM_SERVING_STORAGE_URL`` (blob endpoint of the registry's storage; identity via
``AZURE_CLIENT_ID``, the endpoint's user-assigned identity) or ``MM_SERVING_LAKE_DIR`` (a local
lake folder, to run this script on a laptop), ``MM_SERVING_REGISTRY_PREFIX``,
``MM_SERVING_DEV_REGISTRY_PREFIX``, ``MM_SERVING_CONFIG`` (the project config as JSON: key
columns, time column, covariates, horizon, the scoring chain; else the defaults with
``MM_PARTITION_KEYS``): a partition without a production model is answered along the chain
(its latest model when it beat its baseline, the run's global model, the baseline), as in batch
scoring, ``MM_SERVING_REFRESH_SECONDS`` and the
``MM_SERVING_*`` limits of :class:`shared.serving.ServingOptions`.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # The inference server loads this file by path; the snapshot root holds the ``shared`` package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.serving import Predictor, ServingOptions, ServingResponse  # noqa: E402

# The inference server passes nothing from init() to run() but module state: this one holder.
_predictor: Predictor | None = None


def open_registry(environ: dict[str, str] | None = None, name: str = "prod") -> Any:
    """A registry (production, or ``name="dev"`` for the scoring chain's fallbacks), read-only,
    from blob storage or (offline) a local lake folder."""
    from shared.azureml.registry import DEV_PREFIX, PROD_PREFIX, AzureMLRegistry

    env = os.environ if environ is None else environ
    if env.get("MM_SERVING_STORAGE_URL"):
        from shared.azureml.blob_lake import BlobLake

        lake = BlobLake.from_account_url(env["MM_SERVING_STORAGE_URL"],
                                         managed_identity_client_id=env.get("AZURE_CLIENT_ID") or None)
    elif env.get("MM_SERVING_LAKE_DIR"):
        from shared.lake import LocalLake

        lake = LocalLake(env["MM_SERVING_LAKE_DIR"])
    else:
        raise RuntimeError("online_score needs MM_SERVING_STORAGE_URL (Azure) or MM_SERVING_LAKE_DIR (local)")
    cache_dir = Path(env.get("MM_SERVING_CACHE_DIR") or Path(tempfile.gettempdir()) / "manymodels-serving")
    if name == "dev":
        prefix = env.get("MM_SERVING_DEV_REGISTRY_PREFIX") or DEV_PREFIX
    else:
        prefix = env.get("MM_SERVING_REGISTRY_PREFIX") or PROD_PREFIX
    return AzureMLRegistry(name, lake, cache_dir, publisher=None, prefix=prefix,
                           refresh_seconds=float(env.get("MM_SERVING_REFRESH_SECONDS") or 30))


def serving_config(environ: dict[str, str] | None = None) -> Any:
    """The project config the models were trained with: ``MM_SERVING_CONFIG`` (JSON), else the
    defaults with the key columns of ``MM_PARTITION_KEYS``."""
    from shared.config import ProjectConfig

    env = os.environ if environ is None else environ
    if env.get("MM_SERVING_CONFIG"):
        return ProjectConfig.from_dict(json.loads(env["MM_SERVING_CONFIG"]))
    keys = [k for k in (env.get("MM_PARTITION_KEYS") or "").split(",") if k]
    return ProjectConfig().with_overrides({"data.keys": keys} if keys else {})


def init() -> None:
    """Open the production index (no model is loaded) and the shared predictor."""
    global _predictor
    cfg = serving_config()
    chain = cfg.scoring_chain  # the same chain as batch scoring and the local server
    registry = open_registry()
    registry.refresh(force=True)
    dev = None
    if chain != ["production"]:
        dev = open_registry(name="dev")  # the latest trained models and the run's global model
        dev.refresh(force=True)
    refresh_ms = float(os.environ.get("MM_SERVING_REFRESH_SECONDS") or 30) * 1000.0
    defaults = {"check_interval_ms": refresh_ms} if not os.environ.get("MM_SERVING_CHECK_MS") else {}
    options = ServingOptions.from_env(**defaults)
    for opened in (registry, dev):
        if opened is not None:  # models may be built from the project's estimator packages
            opened.packages = tuple(cfg.training.estimator_packages)
    _predictor = Predictor(cfg, options.make_cache(registry, dev, chain), options)


def run(raw_data: str | bytes | dict[str, Any]) -> Any:
    """Answer one request through the shared Predictor; errors are HTTP responses, never a crash."""
    if _predictor is None:
        raise RuntimeError("run() called before init()")
    return _respond(_predictor.handle(raw_data))


def cache_stats() -> dict[str, Any]:
    if _predictor is None:
        raise RuntimeError("cache_stats() called before init()")
    stats = _predictor.cache.stats()
    # this endpoint's own counting (kept from before the core cache): a miss is a request that
    # performed a load, a hit any other answered request (waiters on a concurrent load included)
    answered = stats["hits"] + stats["misses"]
    misses = stats["loads"] + stats["load_failures"]
    return {**stats, "models": stats["entries"], "hits": answered - stats["loads"], "misses": misses}


def _respond(result: ServingResponse) -> Any:
    """The inference server's AMLResponse (status and headers kept), encoding the body once; a
    plain dict outside the server (tests, a laptop)."""
    try:
        from azureml_inference_server_http.api.aml_response import AMLResponse
    except ImportError:  # running outside the inference server
        return result.body
    return AMLResponse(result.body, result.status, dict(result.headers), json_str=True)
