"""Real-time scoring: one request contract for every HTTP front end.

A request names one partition by its key values and asks for rows or a horizon::

    {"keys": {"store": "S001", "item": "I0001"},
     "rows": [{"date": "2025-01-05", "price": 3.2, "promo": 0}, ...]}
    {"keys": {"store": "S001", "item": "I0001"}, "horizon": 4}

(``"partition_id": "p..."`` may replace ``keys``; with neither rows nor horizon the trained
``forecast.horizon`` is used). The answer carries the model's name, version and run id, its
``source`` in the scoring chain (production | unpromoted | global | baseline; ``is_fallback`` when
not production), and ``predictions`` as ``[{<time column>: ..., "prediction": ..., "lower": ...,
"upper": ...}]`` (the bounds of the ``forecast.interval_level`` prediction interval). Predictions
equal batch scoring's for the same rows.

Errors are :class:`ServingError` subclasses with an HTTP status: 400 names the bad field, 404 names
the partition, 413 gives the limit, 503 gives the reason a model failed to load (it is not cached;
other partitions go on).

Modules, in the order a request meets them:

- :mod:`~shared.serving.request` — the body checked and parsed (:class:`RequestParser`);
- :mod:`~shared.serving.cache` — the limits and the bounded model cache over the registries;
- :mod:`~shared.serving.predictor` — :class:`Predictor`: parse, look up, predict, answer;
- :mod:`~shared.serving.app` — the Starlette app and :func:`serve` (``manymodels serve``);
- :mod:`~shared.serving.connections` — ``serve``'s connection limits (cap, read deadline, keep-alive);
- :mod:`~shared.serving.readonly` — registries read without writing (``serve`` on a read-only workdir);
- :mod:`~shared.serving.errors` — the errors and their statuses.

The Functions route (``function_app/serving.py``) and the Azure ML scoring script
(``shared/azureml/online_score.py``) call the same :class:`Predictor`.
"""
from shared.serving.app import GcKeeper, create_app, serve
from shared.serving.cache import ServingOptions, open_cache
from shared.serving.errors import BadRequest, ModelUnavailable, PartitionNotFound, PayloadTooLarge, ServingError
from shared.serving.predictor import Predictor, open_predictor, process_memory
from shared.serving.request import PredictRequest, RequestParser, RequestRows, ServingResponse

__all__ = [
    "BadRequest", "GcKeeper", "ModelUnavailable", "PartitionNotFound", "PayloadTooLarge", "PredictRequest",
    "Predictor", "RequestParser", "RequestRows", "ServingError", "ServingOptions", "ServingResponse",
    "create_app", "open_cache", "open_predictor", "process_memory", "serve",
]
