"""Real-time scoring: the request logic shared by every HTTP front end, and the local ASGI server.

A request names one partition by its key values and asks for rows or a horizon::

    {"keys": {"store": "S001", "item": "I0001"},
     "rows": [{"date": "2025-01-05", "price": 3.2, "promo": 0}, ...]}
    {"keys": {"store": "S001", "item": "I0001"}, "horizon": 4}

(``"partition_id": "p..."`` may replace ``keys``; with neither rows nor horizon the trained
``forecast.horizon`` is used). The answer carries the model's name, version and run id, its
``source`` in the scoring chain (production | unpromoted | global | baseline; ``is_fallback`` when
not production), and ``predictions`` as ``[{<time column>: ..., "prediction": ..., "lower": ...,
"upper": ...}]`` (the bounds of the ``forecast.interval_level`` prediction interval).

Predictions equal batch scoring's for the same rows: times and text covariates are parsed by the
scoring file's own helpers (:mod:`shared.validation`), null covariates follow the same policy, and
the model is asked through ``ForecastBundle.predict_arrays`` (future rows, or a horizon): the same
forecasting step as the ``ForecastBundle.predict`` of batch scoring, without a frame in or out.
Predictions come back in request order. What repeats is remembered: a parsed time column (clients
keep asking for the same next weeks) and a model's horizon forecast (kept in the cache entry).

Errors are :class:`ServingError` subclasses with an HTTP status: 400 names the bad field
(``body``, ``keys.store``, ``rows[3].price``, ``horizon``), 404 names the partition, 413 gives the
limit, 503 gives the reason a model failed to load (it is not cached; other partitions go on).

:class:`Predictor` is framework-agnostic (the Functions blueprint uses it too); :func:`create_app`
wraps it in a Starlette app (``POST /predict``, ``GET /health``, ``GET /stats``, also under
``/api/``) and :func:`serve` runs that with uvicorn: a well-kept, production-grade ASGI server
(used under FastAPI deployments everywhere), one asyncio process, no threads per connection, so
cached hits are answered on the event loop and only model loads go to a thread pool.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from shared.config import ProjectConfig
from shared.errors import ManyModelsError
from shared.keys import PARTITION_ID, canonical_value, describe, partition_id
from shared.model_cache import CachedModel, Lookup, ModelCache, ModelLoadError, ModelNotFoundError
from shared.timegrid import PERIOD, from_periods, to_periods
from shared.validation import DataValidationError, parse_numeric, parse_time

logger = logging.getLogger(__name__)

PARTITION_ID_PATTERN = re.compile(r"^p[0-9a-f]{20}$")
REQUEST_FIELDS = ("keys", PARTITION_ID, "rows", "horizon")
INLINE_PERIODS = 64  # larger requests are predicted on a worker thread, not on the event loop
MEMO_HORIZONS = 4  # horizon forecasts kept per cached model
TIME_MEMO_SIZE = 4096  # parsed time columns kept (requests keep asking for the same next weeks)


# -- errors ------------------------------------------------------------------------------------
class ServingError(ManyModelsError):
    """A request answered with an HTTP error; ``body()`` is the JSON the client gets."""

    status = 500

    def __init__(
        self,
        message: str,
        field: str | None = None,
        partition: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.partition = dict(partition) if partition else None
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "status": self.status}
        if self.field is not None:
            out["field"] = self.field
        if self.partition is not None:
            out["partition"] = self.partition
        out.update(self.extra)
        return out


class BadRequest(ServingError):
    status = 400


class PartitionNotFound(ServingError):
    status = 404


class PayloadTooLarge(ServingError):
    status = 413


class ModelUnavailable(ServingError):
    status = 503


# -- options -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingOptions:
    """Limits and cache settings; :meth:`from_env` reads the ``MM_SERVING_*`` variables."""

    cache_mb: float = 512.0
    cache_models: int = 20_000
    check_interval_ms: float = 1000.0
    size_by: str = "memory"
    load_workers: int = 2
    max_body_bytes: int = 1 << 20
    max_rows: int = 1000
    max_horizon: int = 520

    ENV = {
        "cache_mb": "MM_SERVING_CACHE_MB",
        "cache_models": "MM_SERVING_CACHE_MODELS",
        "check_interval_ms": "MM_SERVING_CHECK_MS",
        "size_by": "MM_SERVING_SIZE_BY",
        "load_workers": "MM_SERVING_LOAD_WORKERS",
        "max_body_bytes": "MM_SERVING_MAX_BODY_BYTES",
        "max_rows": "MM_SERVING_MAX_ROWS",
        "max_horizon": "MM_SERVING_MAX_HORIZON",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServingOptions":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in cls.ENV.items():
            raw = (env.get(var) or "").strip()
            if not raw:
                continue
            kind = type(getattr(cls, name))
            try:
                values[name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def make_cache(self, prod: Any, dev: Any | None, fallback: str | list[str]) -> ModelCache:
        return ModelCache(
            prod,
            dev,
            fallback=fallback,
            max_bytes=int(self.cache_mb * 2**20),
            max_entries=self.cache_models,
            check_interval_ms=self.check_interval_ms,
            size_by=self.size_by,
            load_workers=self.load_workers,
        )


# -- requests and responses --------------------------------------------------------------------
@dataclass(frozen=True)
class RequestRows:
    """Explicit rows to predict: periods, the time stamps to answer with, covariates (rows x covariates)."""

    periods: np.ndarray
    times: list[Any]
    covariates: np.ndarray

    def __len__(self) -> int:
        return len(self.periods)


@dataclass(frozen=True)
class PredictRequest:
    """A parsed, checked request: the partition, and either request rows or a horizon."""

    partition_id: str
    keys: dict[str, str]
    rows: RequestRows | None = None
    horizon: int | None = None

    @property
    def periods(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.horizon or 0)


@dataclass
class ServingResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), allow_nan=False).encode("utf-8")


class Predictor:
    """Parse, resolve through the model cache, predict; count requests by status."""

    def __init__(
        self, config: ProjectConfig, cache: ModelCache, options: ServingOptions | None = None
    ) -> None:
        self.config = config
        self.cache = cache
        self.options = options or ServingOptions()
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._time_memo: dict[tuple[Any, ...], tuple[np.ndarray, list[Any]]] = {}

    # -- parsing ---------------------------------------------------------------------------------
    def parse(self, body: bytes | str | Mapping[str, Any]) -> PredictRequest:
        """Check a request body; raises BadRequest naming the field, or PayloadTooLarge."""
        data = self._load_json(body) if not isinstance(body, Mapping) else dict(body)
        unknown = [k for k in data if k not in REQUEST_FIELDS]
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0]!r}; a request has {list(REQUEST_FIELDS)}", unknown[0]
            )
        pid, keys = self._partition(data)
        rows, horizon = data.get("rows"), data.get("horizon")
        if rows is not None and horizon is not None:
            raise BadRequest("give 'rows' or 'horizon', not both", "horizon")
        if rows is not None:
            return PredictRequest(pid, keys, rows=self._rows(rows))
        if horizon is None:
            horizon = self.config.forecast.horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise BadRequest(f"'horizon' must be a whole number >= 1, got {horizon!r}", "horizon")
        if horizon > self.options.max_horizon:
            raise BadRequest(
                f"'horizon' must be at most {self.options.max_horizon}, got {horizon}", "horizon"
            )
        return PredictRequest(pid, keys, horizon=int(horizon))

    def _load_json(self, body: bytes | str) -> dict[str, Any]:
        if len(body) > self.options.max_body_bytes:
            raise PayloadTooLarge(
                f"the body has {len(body)} bytes; the limit is {self.options.max_body_bytes}",
                "body",
                limit=self.options.max_body_bytes,
            )
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", "body") from exc
        if not isinstance(data, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(data).__name__}", "body")
        return data

    def _partition(self, data: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
        names = self.config.data.keys
        if "keys" in data and PARTITION_ID in data:
            raise BadRequest("give 'keys' or 'partition_id', not both", PARTITION_ID)
        if PARTITION_ID in data:
            pid = data[PARTITION_ID]
            if not isinstance(pid, str) or not PARTITION_ID_PATTERN.match(pid):
                raise BadRequest(
                    f"'partition_id' must look like 'p' + 20 hex digits, got {pid!r}", PARTITION_ID
                )
            return pid, {}
        keys = data.get("keys")
        if keys is None:
            raise BadRequest(f"'keys' is required: an object with the partition key values {names}", "keys")
        if not isinstance(keys, dict):
            raise BadRequest(f"'keys' must be an object with the partition key values {names}", "keys")
        for name in names:
            if name not in keys:
                raise BadRequest(f"missing partition key {name!r}; the keys are {names}", f"keys.{name}")
            value = keys[name]
            if (
                value is None
                or isinstance(value, (dict, list))
                or (isinstance(value, float) and not math.isfinite(value))
            ):
                raise BadRequest(
                    f"partition key {name!r} must be a string or a number, got {value!r}", f"keys.{name}"
                )
        extra = [k for k in keys if k not in names]
        if extra:
            raise BadRequest(f"unknown partition key {extra[0]!r}; the keys are {names}", f"keys.{extra[0]}")
        values = [keys[n] for n in names]
        return partition_id(values), {n: canonical_value(v) for n, v in zip(names, values)}

    def _rows(self, rows: Any) -> RequestRows:
        """Check the rows and parse them as a scoring file's rows would be (same helpers, same policy)."""
        spec = self.config.data
        if not isinstance(rows, list) or not rows:
            raise BadRequest("'rows' must be a non-empty list of objects", "rows")
        if len(rows) > self.options.max_rows:
            raise PayloadTooLarge(
                f"{len(rows)} rows; the limit is {self.options.max_rows} per request",
                "rows",
                limit=self.options.max_rows,
            )
        allowed = {spec.time, *spec.covariates}
        times: list[Any] = []
        values: list[list[Any]] = [[] for _ in spec.covariates]
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise BadRequest(f"each row must be an object, got {type(row).__name__}", f"rows[{i}]")
            for name in row:
                if name not in allowed:
                    raise BadRequest(
                        f"unknown field {name!r}; a row has {spec.time!r} and the covariates "
                        f"{spec.covariates}",
                        f"rows[{i}].{name}",
                    )
            when = row.get(spec.time)
            if when is None or isinstance(when, (bool, dict, list, float)):
                raise BadRequest(
                    f"{spec.time!r} is required: "
                    + ("an integer period" if spec.freq == "int" else "a date string"),
                    f"rows[{i}].{spec.time}",
                )
            times.append(when)
            for j, cov in enumerate(spec.covariates):
                value = row.get(cov)
                if isinstance(value, (dict, list)):
                    raise BadRequest(
                        f"covariate {cov!r} must be a number, a boolean or null", f"rows[{i}].{cov}"
                    )
                values[j].append(value)
        periods, texts = self._times(tuple(times))
        if len(set(periods.tolist())) != len(periods):
            again = int(np.flatnonzero(pd.Series(periods).duplicated().to_numpy())[0])
            raise BadRequest(
                f"rows[{again}] asks for the same period as an earlier row", f"rows[{again}].{spec.time}"
            )
        covariates = np.empty((len(rows), len(spec.covariates)), dtype=np.float64)
        for j, cov in enumerate(spec.covariates):
            covariates[:, j] = self._covariate(values[j], cov)
        return RequestRows(periods=periods, times=texts, covariates=covariates)

    def _times(self, values: tuple[Any, ...]) -> tuple[np.ndarray, list[Any]]:
        """Periods and response time stamps of a time column, parsed as a scoring file's (whole column,
        so one format for all) and remembered: the same dates come back in request after request."""
        known = self._time_memo.get(values)
        if known is not None:
            return known
        spec = self.config.data
        source = pd.DataFrame({spec.time: list(values)})
        try:
            parsed = parse_time(source[spec.time], source, spec)
        except DataValidationError as exc:
            raise BadRequest(exc.rule, _row_field(exc)) from exc
        result = (to_periods(parsed, spec.freq), self._format_times(parsed))
        with self._lock:
            if len(self._time_memo) >= TIME_MEMO_SIZE:
                self._time_memo.clear()
            self._time_memo[values] = result
        return result

    def _covariate(self, values: list[Any], name: str) -> np.ndarray:
        """float64 values as :func:`shared.validation.parse_numeric` gives them, JSON numbers directly;
        nulls by the ingestion policy (``validation.null_covariates``), as batch scoring does."""
        if all(v is None or type(v) in (int, float, bool) for v in values):
            try:
                out = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
            except OverflowError as exc:
                raise BadRequest(f"covariate {name!r} is too large", f"rows.{name}") from exc
        else:  # text: the scoring file's own parser decides what is a number
            source = pd.DataFrame({name: values})
            try:
                out = parse_numeric(source[name], source, name, "covariate")
            except DataValidationError as exc:
                raise BadRequest(exc.rule, _row_field(exc)) from exc
        infinite = np.flatnonzero(np.isinf(out))
        if len(infinite):
            raise BadRequest("covariate is infinite", f"rows[{int(infinite[0])}].{name}")
        nulls = np.flatnonzero(np.isnan(out))
        policy = self.config.validation.null_covariates
        if len(nulls) and policy == "error":
            raise BadRequest(
                "covariate is null (validation.null_covariates=error)", f"rows[{int(nulls[0])}].{name}"
            )
        if len(nulls) and policy == "zero":
            out[nulls] = 0.0
        return out  # ffill: the model carries the previous value forward

    # -- predicting ------------------------------------------------------------------------------
    def answer(self, request: PredictRequest, found: Lookup) -> ServingResponse:
        """Predict a parsed request with its cached model (the same forecast as batch scoring)."""
        cached = found.model
        if request.rows is not None:
            predictions = self._predict_rows(request.rows, cached)
        else:
            predictions = self._predict_horizon(request.horizon or 1, cached)
        keys = request.keys or dict(cached.record.keys)
        body = {
            PARTITION_ID: request.partition_id,
            "keys": keys,
            "model": cached.model,
            "model_version": cached.version,
            "run_id": cached.run_id,
            "is_fallback": int(cached.is_fallback),
            "source": cached.source,
            "predictions": predictions,
        }
        return ServingResponse(
            200, body, {"X-Cache": "hit" if found.hit else "miss", "X-Model-Version": str(cached.version)}
        )

    def _predict_rows(self, rows: RequestRows, cached: CachedModel) -> list[dict[str, Any]]:
        """``ForecastBundle.predict(future)`` as batch scoring calls it (on arrays); in request order."""
        bundle = cached.bundle
        last = int(getattr(bundle, "last_period", -(2**62)))
        early = np.flatnonzero(rows.periods <= last)
        if len(early):
            i = int(early[0])
            when = self._format_times(
                from_periods(np.array([last]), self.config.data.freq, getattr(bundle, "anchor", None))
            )[0]
            raise BadRequest(
                f"rows[{i}] is not after the model's last trained period ({when})",
                f"rows[{i}].{self.config.data.time}",
            )
        if hasattr(bundle, "predict_arrays"):  # a ForecastBundle: its pandas-free path, same numbers
            got, predicted = bundle.predict_arrays(rows.periods, rows.covariates, source=cached.kind)
        else:
            future = pd.DataFrame(
                {
                    PERIOD: rows.periods,
                    **{c: rows.covariates[:, j] for j, c in enumerate(self.config.data.covariates)},
                }
            )
            out = bundle.predict(future=future, use_baseline=cached.kind == "baseline")
            got, predicted = out[PERIOD].to_numpy(dtype=np.int64), out["prediction"].to_numpy()
        got = np.asarray(got, dtype=np.int64)
        position = np.searchsorted(got, rows.periods) if len(got) == len(rows.periods) else None
        if position is None or not np.array_equal(got[np.minimum(position, len(got) - 1)], rows.periods):
            raise ValueError(
                f"the model returned {len(got)} predictions for {len(rows.periods)} requested periods"
            )
        values = np.asarray(predicted, dtype=np.float64)[position]
        if not np.isfinite(values).all():
            raise ValueError(
                f"the model returned {int((~np.isfinite(values)).sum())} non-finite prediction(s)"
            )
        time_col = self.config.data.time
        lower, upper = _bounds(bundle, rows.periods, values, cached.kind)
        return [{time_col: t, "prediction": p, "lower": lo, "upper": hi}
                for t, p, lo, hi in zip(rows.times, values.tolist(), lower, upper)]

    def _predict_horizon(self, horizon: int, cached: CachedModel) -> list[dict[str, Any]]:
        """The next ``horizon`` periods (``ForecastBundle.predict(horizon=...)``, as batch horizon mode);
        kept with the cached model, since they only change with the model."""
        memo_key = ("horizon", horizon)
        known = cached.memo.get(memo_key)
        if known is not None:
            return known
        bundle = cached.bundle
        time_col = self.config.data.time
        if hasattr(bundle, "predict_arrays"):  # a ForecastBundle: its pandas-free path, same numbers
            periods, predicted = bundle.predict_arrays(horizon=horizon, source=cached.kind)
            times = self._format_times(bundle.period_times(periods))
        else:
            out = bundle.predict(horizon=horizon, use_baseline=cached.kind == "baseline")
            times, predicted = self._format_times(out[time_col]), out["prediction"].to_numpy()
            periods = out[PERIOD].to_numpy(dtype=np.int64)
        lower, upper = _bounds(bundle, periods, np.asarray(predicted, dtype=np.float64), cached.kind)
        records = [{time_col: t, "prediction": float(p), "lower": lo, "upper": hi}
                   for t, p, lo, hi in zip(times, predicted.tolist(), lower, upper)]
        if len(cached.memo) < MEMO_HORIZONS:
            cached.memo[memo_key] = records
        return records

    def _format_times(self, times: pd.Series | np.ndarray) -> list[Any]:
        if self.config.data.freq == "int":
            return [int(t) for t in times.tolist()]
        stamps = pd.DatetimeIndex(times)
        if (stamps == stamps.normalize()).all():
            return stamps.strftime("%Y-%m-%d").tolist()
        return [t.isoformat() for t in stamps]

    # -- the whole request -------------------------------------------------------------------------
    def handle(self, body: bytes | str | Mapping[str, Any]) -> ServingResponse:
        """Answer one request body synchronously (loads block the calling thread)."""
        try:
            request = self.parse(body)
            found = self._lookup(request)
            response = self.answer(request, found)
        except ServingError as exc:
            response = self.error(exc)
        except Exception as exc:  # a bug or a broken model: logged with its traceback, answered 500
            response = self.failure(exc)
        return self._counted(response)

    async def ahandle(self, body: bytes | str | Mapping[str, Any]) -> ServingResponse:
        """Answer one request body in an event loop: loads and large predictions on threads.

        The response's ``Server-Timing`` header gives the time spent here (queueing excluded)."""
        started = time.perf_counter()
        response = await self._ahandle(body)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000.0:.3f}"
        return response

    async def _ahandle(self, body: bytes | str | Mapping[str, Any]) -> ServingResponse:
        try:
            request = self.parse(body)
            try:
                found = await self.cache.alookup(request.partition_id)
            except (ModelNotFoundError, ModelLoadError) as exc:
                raise self._cache_error(request, exc) from exc
            if request.periods > INLINE_PERIODS and request.rows is not None:
                response = await asyncio.to_thread(self.answer, request, found)
            else:
                response = self.answer(request, found)
        except ServingError as exc:
            response = self.error(exc)
        except Exception as exc:  # a bug or a broken model: logged with its traceback, answered 500
            response = self.failure(exc)
        return self._counted(response)

    def _lookup(self, request: PredictRequest) -> Lookup:
        try:
            return self.cache.lookup(request.partition_id)
        except (ModelNotFoundError, ModelLoadError) as exc:
            raise self._cache_error(request, exc) from exc

    def _cache_error(self, request: PredictRequest, exc: Exception) -> ServingError:
        partition = {PARTITION_ID: request.partition_id, "keys": request.keys}
        named = describe(request.keys) if request.keys else request.partition_id
        if isinstance(exc, ModelNotFoundError):
            return PartitionNotFound(f"no model for partition {named}: {exc.reason}", partition=partition)
        assert isinstance(exc, ModelLoadError)
        return ModelUnavailable(
            f"the model of partition {named} (v{exc.version}) failed to load: {exc.reason}",
            partition=partition,
            headers={"Retry-After": "10"},
            reason=exc.reason,
            model_version=exc.version,
        )

    def error(self, exc: ServingError) -> ServingResponse:
        if exc.status >= 500:
            logger.warning("predict: %s %s", exc.status, exc.message)
        return ServingResponse(exc.status, exc.body(), dict(exc.headers))

    def failure(self, exc: Exception) -> ServingResponse:
        logger.exception("predict failed")
        return ServingResponse(
            500, {"error": f"prediction failed: {type(exc).__name__}: {exc}", "status": 500}
        )

    def _counted(self, response: ServingResponse) -> ServingResponse:
        with self._lock:
            key = str(response.status)
            self._requests[key] = self._requests.get(key, 0) + 1
        return response

    # -- health and stats --------------------------------------------------------------------------
    def health(self) -> ServingResponse:
        """200 when the production index answers (one cheap read), else 503 with the reason."""
        try:
            index = int(self.cache.prod.index_version())
        except Exception as exc:  # the reason is the answer
            return ServingResponse(503, {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"})
        return ServingResponse(
            200,
            {
                "status": "ok",
                "prod_index_version": index,
                "cached_models": len(self.cache),
                "uptime_seconds": round(time.time() - self.started, 3),
            },
        )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            requests = dict(self._requests)
        return {
            "cache": self.cache.stats(),
            "requests": requests,
            "process": process_memory(),
            "uptime_seconds": round(time.time() - self.started, 3),
        }

    def warm_up(self) -> str | None:
        """Unpickle one production model outside the cache, so the first request does not pay for
        importing the model classes (over a second for scikit-learn's boosted trees)."""
        prod = self.cache.prod
        found = prod.find(limit=1) if hasattr(prod, "find") else []
        if not found:
            return None
        try:
            prod.load(found[0])
        except Exception as exc:  # that model will answer 503 when asked for; serving starts anyway
            logger.warning("warm-up: the model of %s failed to load: %s", found[0].partition_id, exc)
            return None
        return found[0].partition_id

    def close(self) -> None:
        self.cache.close()


def _bounds(bundle: Any, periods: np.ndarray, values: np.ndarray, kind: str) -> tuple[list[Any], list[Any]]:
    """The prediction interval of each row as JSON numbers (null where the bundle has none)."""
    if not hasattr(bundle, "bounds"):
        return [None] * len(values), [None] * len(values)
    lower, upper = bundle.bounds(periods, values, kind)
    as_json = lambda a: [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]  # noqa: E731
    return as_json(lower), as_json(upper)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _row_field(exc: DataValidationError) -> str:
    column = exc.column if isinstance(exc.column, str) else "rows"
    if len(exc.examples):
        return f"rows[{int(exc.examples.index[0])}].{column}"
    return f"rows.{column}"


def process_memory() -> dict[str, Any]:
    """This process's resident memory now and its peak (Linux: /proc and getrusage)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return {"pid": os.getpid(), "rss_bytes": None, "peak_rss_bytes": None}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rss = None
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = None
    return {"pid": os.getpid(), "rss_bytes": rss, "peak_rss_bytes": peak}


# -- opening a workdir -----------------------------------------------------------------------------
def open_predictor(workspace: Any, options: ServingOptions | None = None) -> Predictor:
    """A predictor over a workspace's production registry (and dev registry for the fallback)."""
    options = options or ServingOptions.from_env()
    cfg = workspace.config
    chain = cfg.scoring_chain
    dev = workspace.dev if chain != ["production"] else None
    return Predictor(cfg, options.make_cache(workspace.prod, dev, chain), options)


# -- the ASGI app ------------------------------------------------------------------------------------
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


def create_app(predictor: Predictor, gc_keeper: GcKeeper | None = None) -> Any:
    """A Starlette app over ``predictor``: POST /predict, GET /health, GET /stats (also under /api/)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
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
        try:
            body = await _read_body(request, predictor.options.max_body_bytes)
        except ServingError as exc:
            return respond(predictor._counted(predictor.error(exc)))
        return respond(await predictor.ahandle(body))

    async def health(request: Request) -> Response:
        return respond(await asyncio.to_thread(predictor.health))

    async def stats(request: Request) -> Response:
        body = predictor.stats()
        if gc_keeper is not None:
            body["gc"] = gc_keeper.stats()
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
    """Serve a workdir's production models over HTTP with uvicorn until interrupted."""
    import uvicorn

    from shared.backends import registry_exists
    from shared.pipeline import PipelineError
    from shared.workspace import Workspace

    workspace = Workspace.open(workdir, remember=False)
    if not registry_exists(workspace, "prod"):
        raise PipelineError(
            f"no production registry in {workspace.root}: run 'manymodels run' (or train and promote) first"
        )
    root = workspace.root
    options = options or ServingOptions.from_env(cache_mb=cache_mb)
    predictor = open_predictor(workspace, options)
    predictor.warm_up()
    gc.collect()
    gc.freeze()  # the libraries' objects: never worth scanning again
    # the event loop answers hits while loader threads unpickle: hand the GIL over sooner (default 5 ms)
    sys.setswitchinterval(0.001)
    logger.info("serving %s with a %s MB model cache", root, options.cache_mb)
    config = uvicorn.Config(
        create_app(predictor, GcKeeper(predictor)),
        host=host,
        port=int(port),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
