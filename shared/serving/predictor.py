"""The predictor: one request, from its body to its answer, the same in every front end.

The local server (:mod:`shared.serving.app`), the Functions route (``function_app/serving.py``)
and the Azure ML online endpoint (``shared/azureml/online_score.py``) all hand a body to
:meth:`Predictor.handle` (or :meth:`Predictor.ahandle` in an event loop) and send back its
:class:`ServingResponse`. The request is checked by :class:`shared.serving.request.RequestParser`,
the partition's model comes from the bounded :class:`shared.forecasts.model_cache.ModelCache`, and the
forecast is the bundle's ``predict_arrays`` (the same forecasting step as batch scoring's
``predict``, without a frame in or out). Predictions come back in request order. A model's
horizon forecast is remembered in its cache entry.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Mapping

import numpy as np
import pandas as pd

from shared import faults
from shared.config import ProjectConfig
from shared.keys import PARTITION_ID, describe
from shared.forecasts.model_cache import CachedModel, Lookup, ModelCache, ModelLoadError, ModelNotFoundError
from shared.serving.cache import ServingOptions, open_cache
from shared.serving.errors import (BadRequest, ModelUnavailable, PartitionNotFound, RequestTimeout, ServingError,
                                   redact, redact_paths)
from shared.serving.request import PredictRequest, RequestParser, RequestRows, ServingResponse, format_times
from shared.data.timegrid import PERIOD, from_periods

logger = logging.getLogger(__name__)

INLINE_PERIODS = 64  # forecasts reaching further are made on a forecast thread, not on the event loop
MEMO_HORIZONS = 4  # horizon forecasts kept per cached model


class DaemonPool(Executor):
    """A fixed pool of daemon threads for forecasts.

    Unlike ``ThreadPoolExecutor`` (whose threads the interpreter joins at exit), a forecast still
    running when the server is told to stop never holds the process: SIGTERM ends it in seconds.
    The per-request time budget (:attr:`ServingOptions.request_seconds`) answers the client when a
    forecast overruns; the bounded distance of a row keeps every forecast finite.
    """

    def __init__(self, workers: int, name: str = "forecast") -> None:
        self.workers = max(1, int(workers))
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the forecast pool is shut down")
            self._queue.put((future, fn, args, kwargs))
            if len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                future.set_exception(exc)

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


class Predictor:
    """Parse, resolve through the model cache, predict; count requests by status."""

    def __init__(
        self, config: ProjectConfig, cache: ModelCache, options: ServingOptions | None = None
    ) -> None:
        self.config = config
        self.cache = cache
        self.options = options or ServingOptions()
        self.parser = RequestParser(config, self.options)
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._pool: DaemonPool | None = None

    @property
    def pool(self) -> DaemonPool:
        """The forecast threads, made on first use."""
        with self._lock:
            if self._pool is None:
                self._pool = DaemonPool(self.options.forecast_workers)
            return self._pool

    def parse(self, body: bytes | str | Mapping[str, Any]) -> PredictRequest:
        """Check a request body; raises BadRequest naming the field, or PayloadTooLarge."""
        return self.parser.parse(body)

    # -- predicting ------------------------------------------------------------------------------
    def answer(self, request: PredictRequest, found: Lookup) -> ServingResponse:
        """Predict a parsed request with its cached model (the same forecast as batch scoring)."""
        faults.point("serve.forecast")
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
        self.check_distance(rows, last, bundle)
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
        with np.errstate(all="ignore"):
            values = np.asarray(predicted, dtype=np.float64)[position]
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad) and rows.covariates.size:  # finite inputs, no finite forecast: the covariates are extreme
            i = int(bad[0])
            raise BadRequest(
                f"rows[{i}]: the model gives no finite forecast for these covariate values "
                f"({len(bad)} row(s)); they are far outside anything it was trained on",
                f"rows[{i}]",
            )
        if len(bad):
            raise ValueError(f"the model returned {len(bad)} non-finite prediction(s)")
        time_col = self.config.data.time
        lower, upper = _bounds(bundle, rows.periods, values, cached.kind)
        return [{time_col: t, "prediction": p, "lower": lo, "upper": hi}
                for t, p, lo, hi in zip(rows.times, values.tolist(), lower, upper)]

    def check_distance(self, rows: RequestRows, last: int, bundle: Any) -> None:
        """Bounded work: each row lies after the model's last trained period, and at most
        ``options.distance_limit`` periods after it (a forecast walks every period up to its row)."""
        limit = self.options.distance_limit

        def when() -> Any:
            return self._times_out(
                from_periods(np.array([last]), self.config.data.freq, getattr(bundle, "anchor", None))
            )[0]

        early = np.flatnonzero(rows.periods <= last)
        if len(early):
            i = int(early[0])
            raise BadRequest(
                f"rows[{i}] is not after the model's last trained period ({when()})",
                f"rows[{i}].{self.config.data.time}",
            )
        far = np.flatnonzero(rows.periods - last > limit)
        if len(far):
            i = int(far[0])
            raise BadRequest(
                f"rows[{i}] is {int(rows.periods[i] - last)} periods after the model's last trained period "
                f"({when()}); a request may reach at most {limit} periods ahead (MM_SERVING_MAX_DISTANCE)",
                f"rows[{i}].{self.config.data.time}",
            )

    def _reach(self, request: PredictRequest, cached: CachedModel) -> int:
        """How many periods past the model's end the forecast walks (what it costs)."""
        if request.rows is None:
            return int(request.horizon or 1)
        last = int(getattr(cached.bundle, "last_period", -(2**62)))
        return int(np.max(request.rows.periods)) - last

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
            times = self._times_out(bundle.period_times(periods))
        else:
            out = bundle.predict(horizon=horizon, use_baseline=cached.kind == "baseline")
            times, predicted = self._times_out(out[time_col]), out["prediction"].to_numpy()
            periods = out[PERIOD].to_numpy(dtype=np.int64)
        lower, upper = _bounds(bundle, periods, np.asarray(predicted, dtype=np.float64), cached.kind)
        records = [{time_col: t, "prediction": float(p), "lower": lo, "upper": hi}
                   for t, p, lo, hi in zip(times, predicted.tolist(), lower, upper)]
        if len(cached.memo) < MEMO_HORIZONS:
            cached.memo[memo_key] = records
        return records

    def _times_out(self, times: pd.Series | np.ndarray) -> list[Any]:
        return format_times(times, self.config.data.freq)

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
        """Small forecasts (at most INLINE_PERIODS periods ahead, or remembered) are answered on the
        loop; larger ones on the forecast threads. The lookup and forecast share one time budget."""
        loop = asyncio.get_running_loop()
        budget = float(self.options.request_seconds)
        deadline = loop.time() + budget
        try:
            request = self.parse(body)
            try:
                # shielded: a request that gives up never cancels a load other requests wait for
                found = await asyncio.wait_for(asyncio.shield(self.cache.alookup(request.partition_id)), budget)
            except (ModelNotFoundError, ModelLoadError) as exc:
                raise self._cache_error(request, exc) from exc
            cached = found.model
            memo = request.rows is None and ("horizon", request.horizon or 1) in cached.memo
            if memo or self._reach(request, cached) <= INLINE_PERIODS:
                response = self.answer(request, found)
            else:
                work = loop.run_in_executor(self.pool, self.answer, request, found)
                response = await asyncio.wait_for(work, max(0.0, deadline - loop.time()))
        except (asyncio.TimeoutError, TimeoutError):
            response = self.error(RequestTimeout(
                f"the request ran out of its time budget of {budget:g} s (MM_SERVING_REQUEST_SECONDS); "
                "ask for fewer or nearer periods, or retry", headers={"Retry-After": "5"}))
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
        return ServingResponse(exc.status, redact(exc.body()), dict(exc.headers))

    def failure(self, exc: Exception) -> ServingResponse:
        logger.exception("predict failed")
        return ServingResponse(
            500, {"error": redact_paths(f"prediction failed: {type(exc).__name__}: {exc}"), "status": 500}
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
            return ServingResponse(503, {"status": "unavailable",
                                         "reason": redact_paths(f"{type(exc).__name__}: {exc}")})
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
        found = prod.find(limit=1)
        if not found:
            return None
        try:
            prod.load(found[0])
        except Exception as exc:  # that model will answer 503 when asked for; serving starts anyway
            logger.warning("warm-up: the model of %s failed to load: %s", found[0].partition_id, exc)
            return None
        return found[0].partition_id

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
        self.cache.close()



def _bounds(bundle: Any, periods: np.ndarray, values: np.ndarray, kind: str) -> tuple[list[Any], list[Any]]:
    """The prediction interval of each row as JSON numbers (null where the bundle has none)."""
    if not hasattr(bundle, "bounds"):
        return [None] * len(values), [None] * len(values)
    lower, upper = bundle.bounds(periods, values, kind)
    as_json = lambda a: [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]  # noqa: E731
    return as_json(lower), as_json(upper)



def process_memory() -> dict[str, Any]:
    """This process's resident memory now and its peak (Linux: /proc and getrusage)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return {"pid": os.getpid(), "rss_bytes": None, "peak_rss_bytes": None}
    rss = None
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = None
    # read after the current size (another thread may allocate in between), and never below it
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"pid": os.getpid(), "rss_bytes": rss, "peak_rss_bytes": max(peak, rss or 0)}



def open_predictor(workspace: Any, options: ServingOptions | None = None) -> Predictor:
    """A predictor over a workspace's production registry (and dev registry for the fallback)."""
    options = options or ServingOptions.from_env()
    return Predictor(workspace.config, open_cache(workspace, options), options)
