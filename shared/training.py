"""Training of one mini-batch file: every partition's candidates compete, the best is kept.

Per partition, the end of the series is cut into windows by period::

    [ train ............ | validation (validation_periods) | test (test_periods) ]

1. every candidate is fitted on *train* and forecasts *validation* from its origin; the lowest
   ``training.selection_metric`` wins (ties and undefined scores go to the earlier candidate);
2. the winner and the baseline are refitted on *train + validation* and forecast *test*: the
   winner's WAPE/MAPE/RMSE/accuracy are the partition's ``metrics`` (used by promotion), the
   baseline's are ``baseline_metrics``;
3. the winner and the baseline are refitted on all rows and packed into a :class:`ForecastBundle`.

Statuses: ``skipped`` (fewer than ``forecast.min_periods`` observed rows, and no global model to
forecast it; with one, such a series is treated as too short, below); ``baseline_only``
(fewer than ``forecast.min_train_periods`` observed rows before the validation window, with the
folds reduced to one if need be, and no global model in the run: the baseline is scored on the
last ``min(test_periods, span // 2)`` periods and kept; with a global model, that is the
partition's model instead: status ``trained``, model ``global``, the reason says why); ``failed``
(anything raised for that partition: the exception's type and message; the others go on);
``trained``.

Rows filled into gaps by validation (``_filled``) stay in the data as lag and rolling-mean
inputs, but no model learns from their target (on generated data, training on ``gaps="zero"``
fills raised the log-linear model's WAPE from 0.14 to 0.24) and metrics and the baseline's moving
average use observed rows only. Features come from one
vectorised pass over the whole batch (:func:`shared.features.build_features`); a window longer
than the horizon is forecast recursively, exactly as :meth:`ForecastBundle.predict` does.

Timing: ``TrainResult.fit_seconds`` is the partition's wall time (perf_counter), including its
row-weighted share of the batch's feature building; ``TrainResult.timings`` splits it into
``features`` (that share), ``estimators`` (the candidates' own fit and predict calls) and
``overhead`` (everything else: slicing, metrics, bundles). :func:`time_breakdown` sums them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Generator, Iterable, Mapping

import numpy as np
import pandas as pd

from shared.candidates import AverageForecaster, MovingAverageBaseline, check_candidates, make_candidate
from shared.features import FeatureFrame, FeatureSpec, build_features, series_features
from shared.global_model import GlobalModelSet, bind_global, needs_global, partition_stats
from shared.keys import PARTITION_ID, key_dict
from shared.metrics import evaluate, selection_key
from shared.timegrid import PERIOD, anchor_offset, from_periods, to_periods

logger = logging.getLogger(__name__)

STATUSES = ("trained", "baseline_only", "skipped", "failed")


# -- forecasting from an origin: shared by backtests and bundles -------------------------------------

def recursive_forecast(estimator: Any, spec: FeatureSpec, trend_origin: int, log_covariates: Iterable[bool],
                       hist_periods: np.ndarray, hist_target: np.ndarray, hist_covariates: np.ndarray,
                       origin: int, periods: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    """Forecasts for ``periods`` (sorted, all > ``origin``) from the history up to ``origin``.

    Works in blocks of ``horizon`` periods on the complete grid ``origin+1 .. max(periods)``: the
    first block's lags read only history; each later block reads the previous blocks' forecasts
    as if they were observed (recursive fill for lags beyond the horizon). Grid periods that were
    not asked for carry the covariates of the latest earlier row forward.
    """
    periods = np.asarray(periods, dtype=np.int64)
    n_cov = len(spec.covariates)
    covariates = np.asarray(covariates, dtype=np.float64).reshape(len(periods), n_cov)
    keep = (hist_periods <= origin) & (hist_periods > origin - spec.lookback)
    h_periods, h_target = hist_periods[keep], hist_target[keep]
    h_cov = np.asarray(hist_covariates, dtype=np.float64).reshape(len(hist_periods), n_cov)[keep]
    grid = np.arange(origin + 1, int(periods[-1]) + 1, dtype=np.int64)
    at = np.searchsorted(periods, grid, side="right") - 1
    grid_cov = np.where((at >= 0)[:, None], covariates[np.maximum(at, 0)], np.nan)
    all_periods = np.concatenate((h_periods, grid))
    target = np.concatenate((h_target, np.full(len(grid), np.nan)))
    cov = _ffill(np.concatenate((h_cov, grid_cov)))
    n_hist, step = len(h_periods), spec.horizon
    for start in range(0, len(grid), step):
        X = series_features(spec, all_periods, target, cov, trend_origin, list(log_covariates))
        block = slice(n_hist + start, n_hist + min(start + step, len(grid)))
        target[block] = np.maximum(estimator.predict(X[block]), 0.0)
    return target[n_hist + (periods - origin - 1)]


def _ffill(a: np.ndarray) -> np.ndarray:
    """Forward-fill NaN down the columns (leading NaN stay)."""
    if a.size == 0 or not np.isnan(a).any():
        return a
    idx = np.where(np.isnan(a), 0, np.arange(len(a))[:, None])
    np.maximum.accumulate(idx, axis=0, out=idx)
    return a[idx, np.arange(a.shape[1])]


# -- the deployable artefact ---------------------------------------------------------------------

@dataclass
class ForecastBundle:
    """A partition's fitted model plus everything needed to forecast its next periods.

    Small on purpose (thousands are cached for serving): no training frame, only the last
    ``spec.lookback`` periods of target and covariates, and the test window's backtest.
    """

    partition_id: str
    keys: dict[str, str]
    model_name: str
    estimator: Any
    baseline: MovingAverageBaseline
    spec: FeatureSpec
    trend_origin: int
    log_covariates: tuple[bool, ...]
    history_periods: np.ndarray
    history_target: np.ndarray
    history_covariates: np.ndarray  # (history rows, covariates)
    last_period: int
    freq: str
    anchor: str | None
    time_column: str
    metrics: dict[str, float] = field(default_factory=dict)
    backtest_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # interval offsets in log1p space per source kind ("model", "baseline", "global"): (lower, upper)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    interval_level: float = 0.80
    global_view: Any = None  # the partition's GlobalView (scale, centres) for the global fallback

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Bundles pickled by earlier releases lack the newer fields: they get the defaults."""
        state.setdefault("intervals", {})
        state.setdefault("interval_level", 0.80)
        state.setdefault("global_view", None)
        self.__dict__.update(state)

    @property
    def horizon(self) -> int:
        return self.spec.horizon

    @property
    def global_run_id(self) -> str | None:
        """The run whose global model this bundle's forecasts need (None: self-contained)."""
        found = needs_global(self.estimator)
        if found is None and self.global_view is not None:
            found = self.global_view.run_id
        return found

    def bind_global(self, model: Any) -> None:
        """Attach the loaded global model (see :mod:`shared.global_model`) to this bundle."""
        bind_global(self.estimator, model)
        if self.global_view is not None:
            bind_global(self.global_view, model)

    def bounds(self, periods: np.ndarray, prediction: np.ndarray,
               kind: str = "model") -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the ``interval_level`` interval around point forecasts.

        From the partition's own backtest residuals (log1p space, conformal quantiles): a kind
        the bundle has no residuals for gets NaN bounds. Steps beyond the horizon widen with
        the square root of the distance.
        """
        pred = np.asarray(prediction, dtype=np.float64)
        lo_hi = self.intervals.get(kind)
        if lo_hi is None:
            nan = np.full(len(pred), np.nan)
            return nan, nan.copy()
        lo, hi = lo_hi
        steps = np.asarray(periods, dtype=np.int64) - int(self.last_period)
        widen = np.sqrt(np.maximum(steps, 1) / max(self.horizon, 1))
        widen = np.where(steps > self.horizon, widen, 1.0)
        base = np.log1p(np.maximum(pred, 0.0))
        lower = np.maximum(np.expm1(base + lo * widen), 0.0)
        upper = np.maximum(np.expm1(base + hi * widen), lower)
        return np.minimum(lower, pred), np.maximum(upper, pred)

    @property
    def covariates(self) -> tuple[str, ...]:
        return self.spec.covariates

    @property
    def backtest(self) -> pd.DataFrame:
        """The test window: ``_period``, time, ``actual``, ``prediction`` (chosen model), ``baseline``."""
        b = self.backtest_arrays
        periods = np.asarray(b.get(PERIOD, np.empty(0, dtype=np.int64)), dtype=np.int64)
        return pd.DataFrame({
            PERIOD: periods,
            self.time_column: from_periods(periods, self.freq, self.anchor).to_numpy(),
            "actual": b.get("actual", np.empty(0)),
            "prediction": b.get("prediction", np.empty(0)),
            "baseline": b.get("baseline", np.empty(0)),
        })

    def future_periods(self, future: pd.DataFrame | None = None, horizon: int | None = None) -> np.ndarray:
        """The periods a call of :meth:`predict` with these arguments forecasts."""
        if future is None:
            n = int(self.horizon if horizon is None else horizon)
            if n < 1:
                raise ValueError(f"horizon must be >= 1, got {horizon}")
            return np.arange(self.last_period + 1, self.last_period + 1 + n, dtype=np.int64)
        if PERIOD in future.columns:
            return future[PERIOD].to_numpy(dtype=np.int64)
        if self.time_column not in future.columns:
            raise ValueError(f"future rows need the time column {self.time_column!r} (or {PERIOD!r})")
        times = future[self.time_column]
        if self.freq != "int" and not pd.api.types.is_datetime64_any_dtype(times):
            try:
                times = pd.to_datetime(times)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"future column {self.time_column!r} is not parseable as dates: "
                                 f"{exc}") from exc
        return to_periods(times.reset_index(drop=True), self.freq)

    def predict(self, future: pd.DataFrame | None = None, horizon: int | None = None,
                use_baseline: bool = False, source: str = "model") -> pd.DataFrame:
        """Forecasts as a frame ``_period``, <time column>, ``prediction`` (never negative), by period.

        ``future``: the rows to forecast (time column or ``_period``, and every covariate; NaN
        covariates take the previous value). Without it: the next ``horizon`` periods (default the
        trained horizon) with covariates carried forward from the last observed row. Rows further
        than the horizon ahead are forecast recursively (see :func:`recursive_forecast`).
        ``use_baseline`` forecasts with the baseline (the serving fallback).
        """
        if future is not None and horizon is not None:
            raise ValueError("give either future rows or a horizon, not both")
        periods = self.future_periods(future, horizon)
        if future is None:
            cov = self._carried_covariates(len(periods))
        else:
            missing = [c for c in self.covariates if c not in future.columns]
            if missing:
                raise ValueError(f"future rows lack covariate column(s) {missing}")
            cov = future[list(self.covariates)].to_numpy(dtype=np.float64)
            cov = cov.reshape(len(future), len(self.covariates))
        kind = "baseline" if use_baseline else source
        periods, pred = self._forecast(periods, cov, kind)
        return self._frame(periods, pred, kind)

    def predict_arrays(self, periods: np.ndarray | None = None, covariates: np.ndarray | None = None,
                       horizon: int | None = None, use_baseline: bool = False,
                       source: str = "model") -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` on arrays, without pandas: ``(periods sorted, predictions)``.

        The single-request path of serving (a frame in and a frame out cost more than the model).
        ``periods`` with ``covariates`` (rows x ``spec.covariates``, NaN carries the previous value
        forward) or, without periods, the next ``horizon`` periods. Same checks, same numbers as
        :meth:`predict` (both end in one shared forecasting step).
        """
        if periods is not None and horizon is not None:
            raise ValueError("give either future periods or a horizon, not both")
        if periods is None:
            if covariates is not None:
                raise ValueError("covariates need the periods they belong to")
            periods = self.future_periods(None, horizon)
            cov = self._carried_covariates(len(periods))
        else:
            periods = np.asarray(periods, dtype=np.int64).reshape(-1)
            n_cov = len(self.covariates)
            if covariates is None:
                if n_cov:
                    raise ValueError(f"future rows lack covariate column(s) {list(self.covariates)}")
                covariates = np.empty((len(periods), 0))
            cov = np.asarray(covariates, dtype=np.float64)
            if cov.shape != (len(periods), n_cov):
                raise ValueError(f"covariates must have shape ({len(periods)}, {n_cov}), got {cov.shape}")
        return self._forecast(periods, cov, "baseline" if use_baseline else source)

    def _carried_covariates(self, n: int) -> np.ndarray:
        last_cov = self.history_covariates[-1:] if len(self.history_covariates) else \
            np.full((1, len(self.covariates)), np.nan)
        return np.repeat(last_cov, n, axis=0)

    def _forecast(self, periods: np.ndarray, cov: np.ndarray,
                  kind: str) -> tuple[np.ndarray, np.ndarray]:
        """The one forecasting step behind :meth:`predict` and :meth:`predict_arrays`.

        ``kind``: ``model`` (the partition's chosen model), ``baseline``, or ``global`` (the
        run's global model seen through the partition's view; it must be bound).
        """
        if kind not in ("model", "baseline", "global"):
            raise ValueError(f"unknown forecast source {kind!r}")
        if len(periods) == 0:
            return periods, np.empty(0)
        if len(np.unique(periods)) != len(periods):
            raise ValueError("future rows repeat a period")
        early = periods[periods <= self.last_period]
        if len(early):
            raise ValueError(f"future periods must come after the last trained period {self.last_period}; "
                             f"got {sorted(set(early.tolist()))[:5]}")
        if len(periods) > 1 and not (periods[1:] > periods[:-1]).all():
            order = np.argsort(periods, kind="stable")
            periods, cov = periods[order], cov[order]
        estimator = {"model": self.estimator, "baseline": self.baseline, "global": self.global_view}[kind]
        if estimator is None:
            raise ValueError(f"this bundle has no {kind} forecaster")
        if isinstance(estimator, MovingAverageBaseline):
            pred = estimator.predict(len(periods))
        else:
            pred = recursive_forecast(estimator, self.spec, self.trend_origin, self.log_covariates,
                                      self.history_periods, self.history_target, self.history_covariates,
                                      self.last_period, periods, cov)
        return periods, np.maximum(np.asarray(pred, dtype=np.float64), 0.0)

    def period_times(self, periods: np.ndarray) -> np.ndarray:
        """The time stamps (or integer periods) of period ordinals, as :func:`from_periods` gives them."""
        return period_times(periods, self.freq, self.anchor)

    def _frame(self, periods: np.ndarray, pred: np.ndarray, kind: str = "model") -> pd.DataFrame:
        pred = np.maximum(np.asarray(pred, dtype=np.float64), 0.0)
        lower, upper = self.bounds(periods, pred, kind)
        return pd.DataFrame({
            PERIOD: periods,
            self.time_column: self.period_times(periods),
            "prediction": pred,
            "lower": lower,
            "upper": upper,
        })


_TIMES_MEMO: dict[tuple[str, str | None, bytes], np.ndarray] = {}
TIMES_MEMO_SIZE = 4096


def period_times(periods: np.ndarray, freq: str, anchor: str | None) -> np.ndarray:
    """``from_periods(...).to_numpy()``, remembered: forecasts keep asking for the same next periods
    (pandas' PeriodIndex costs ~0.2 ms a call, more than a small forecast)."""
    periods = np.asarray(periods, dtype=np.int64)
    key = (freq, anchor, periods.tobytes())
    known = _TIMES_MEMO.get(key)
    if known is None:
        known = np.array(from_periods(periods, freq, anchor).to_numpy(), copy=True)  # owns its data
        known.setflags(write=False)
        if len(_TIMES_MEMO) >= TIMES_MEMO_SIZE:
            _TIMES_MEMO.clear()
        _TIMES_MEMO[key] = known
    return known.copy()


# -- per-partition result -----------------------------------------------------------------------

@dataclass
class TrainResult:
    """The outcome of one partition; ``to_row()`` is the JSON line the entry script writes."""

    partition_id: str
    keys: dict[str, str]
    status: str
    reason: str = ""
    model_name: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    candidate_scores: dict[str, float] = field(default_factory=dict)
    global_metrics: dict[str, float] = field(default_factory=dict)  # the global model on the test window
    n_observed: int = 0
    fit_seconds: float = 0.0
    bundle: ForecastBundle | None = None
    timings: dict[str, float] = field(default_factory=dict)  # features / estimators / overhead seconds

    def to_row(self) -> dict[str, Any]:
        return {
            PARTITION_ID: self.partition_id,
            "keys": dict(self.keys),
            "status": self.status,
            "reason": self.reason,
            "model_name": self.model_name,
            "metrics": _json_floats(self.metrics),
            "baseline_metrics": _json_floats(self.baseline_metrics),
            "candidate_scores": _json_floats(self.candidate_scores),
            "global_metrics": _json_floats(self.global_metrics),
            "n_observed": int(self.n_observed),
            "fit_seconds": round(float(self.fit_seconds), 6),
            "timings": {k: round(float(v), 6) for k, v in self.timings.items()},
            "backtest": self.backtest_rows(),
        }

    def backtest_rows(self) -> list[dict[str, Any]]:
        """The test window as JSON rows (periods, not time stamps: registration converts them all at
        once), so registering a run never has to open the bundles."""
        if self.bundle is None:
            return []
        b = self.bundle.backtest_arrays
        periods = np.asarray(b.get(PERIOD, ()), dtype=np.int64)
        if not len(periods):
            return []
        values = {c: [None if np.isnan(v) else float(v) for v in np.asarray(b.get(c), dtype=float)]
                  for c in ("actual", "prediction", "baseline", "global") if c in b}
        return [{PERIOD: int(p), **{c: values[c][i] for c in values}} for i, p in enumerate(periods)]


def _json_floats(values: Mapping[str, float]) -> dict[str, float | None]:
    """NaN is not JSON: undefined metrics become null."""
    return {k: (None if v is None or math.isnan(float(v)) else float(v)) for k, v in values.items()}


# -- the batch ----------------------------------------------------------------------------------

class _Clock:
    """Accumulates the seconds spent inside the estimators' own fit and predict calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def fit(self, est: Any, X: np.ndarray | None, y: np.ndarray) -> Any:
        t = perf_counter()
        est.fit(X, y)
        self.seconds += perf_counter() - t
        return est

    def predict(self, est: Any, X: np.ndarray | int) -> np.ndarray:
        t = perf_counter()
        out = est.predict(X)
        self.seconds += perf_counter() - t
        return out


@dataclass
class _Batch:
    cfg: Any
    ff: FeatureFrame
    cov: np.ndarray
    keys: list[dict[str, str]]
    anchor: str | None
    global_models: GlobalModelSet | None = None


@dataclass
class Windows:
    """Where a partition's evaluation windows start (row indices into its rows, and periods).

    ``folds``: the rolling-origin validation windows, latest first, as (lo, hi, origin);
    ``validation_start``: the earliest fold's first period (what the global model's
    ``validation`` fit and every partition statistic stop before); ``short``: too little
    history before the folds for the ML candidates (baseline only).
    """

    test_start: int
    i_test: int
    folds: list[tuple[int, int, int]]
    validation_start: int
    short: bool


def partition_windows(periods: np.ndarray, filled: np.ndarray, cfg: Any) -> Windows:
    """The test window and the rolling-origin validation folds of one partition (see module doc)."""
    f, t = cfg.forecast, cfg.training
    last = int(periods[-1])
    test_start = last - int(f.test_periods) + 1
    i_test = int(np.searchsorted(periods, test_start))
    val = int(f.validation_periods)
    # as many folds as configured, fewer when the history cannot spare them; too short for one
    # fold (fewer than min_train_periods observed before it): baseline only, and the scoring
    # chain's global model is its better forecast (pooled, it needs no long history)
    for n_folds in range(max(1, int(t.folds)), 0, -1):
        step = max(1, val // n_folds)
        validation_start = test_start - val - (n_folds - 1) * step
        i_first = int(np.searchsorted(periods, validation_start))
        short = int((~filled[:i_first]).sum()) < int(f.min_train_periods)
        if not short:
            break
    folds = []
    for k in range(n_folds):
        end = test_start - 1 - k * step
        start = end - val + 1
        lo, hi = (int(i) for i in np.searchsorted(periods, [start, end + 1]))
        folds.append((lo, hi, start - 1))
    if short:  # one window spared from a short series for the baseline's test score
        span = int(periods[-1] - periods[0] + 1)
        window = min(int(f.test_periods), max(1, span // 2))
        test_start = last - window + 1
        i_test = int(np.searchsorted(periods, test_start))
        validation_start = test_start
        folds = []
    return Windows(test_start, i_test, folds, validation_start, short)


def train_batch(frame: pd.DataFrame, cfg: Any, dataset_meta: Mapping[str, Any] | None = None,
                global_models: GlobalModelSet | None = None) -> list[TrainResult]:
    """Train every partition of one validated mini-batch frame; one :class:`TrainResult` each.

    ``global_models``: the run's global model fits (:func:`shared.global_model.fit_global`);
    without them the ``global`` candidate and the global fallback's metrics are left out.
    """
    meta = dict(dataset_meta or {})
    check_candidates(cfg)
    if cfg.training.selection_metric not in ("wape", "mape", "rmse"):
        raise ValueError(f"training.selection_metric {cfg.training.selection_metric!r} "
                         f"is not wape, mape or rmse")
    began = perf_counter()
    if len(frame) and not _is_sorted(frame):
        frame = frame.sort_values([PARTITION_ID, PERIOD], kind="stable", ignore_index=True)
    ff = build_features(frame, cfg)
    covs = list(cfg.data.covariates)
    cov = frame[covs].to_numpy(dtype=np.float64) if covs else np.empty((len(frame), 0))
    key_cols = list(cfg.data.keys)
    firsts = frame[key_cols].iloc[ff.bounds[:-1]].itertuples(index=False, name=None) if len(frame) else []
    keys = [key_dict(key_cols, values) for values in firsts]
    anchor = meta["anchor"] if "anchor" in meta else _anchor(frame, cfg)
    batch = _Batch(cfg=cfg, ff=ff, cov=cov, keys=keys, anchor=anchor, global_models=global_models)
    shared_seconds = perf_counter() - began  # features and set-up, shared out by rows
    n_rows = max(len(frame), 1)
    shares = [shared_seconds * (ff.bounds[g + 1] - ff.bounds[g]) / n_rows for g in range(ff.n_partitions)]
    # phase 1: every partition scores its candidates on its folds; phase 2: each chooses, knowing
    # which candidate did best over the whole batch (the prior), then fits and packs its model
    jobs = [_PartitionJob(batch, g) for g in range(ff.n_partitions)]
    for job in jobs:
        job.step(None)
    prior = pooled_prior([job.fold_errors for job in jobs if job.fold_errors])
    for job, share in zip(jobs, shares):
        job.step(prior)
    return [job.finish(share) for job, share in zip(jobs, shares)]


def global_cuts(ff: FeatureFrame, cfg: Any) -> dict[str, np.ndarray]:
    """Per partition of a feature frame: the first period of its validation and test windows."""
    val = np.empty(ff.n_partitions, dtype=np.int64)
    test = np.empty(ff.n_partitions, dtype=np.int64)
    for g in range(ff.n_partitions):
        rows = ff.rows(g)
        w = partition_windows(ff.periods[rows], ff.filled[rows], cfg)
        val[g], test[g] = w.validation_start, w.test_start
    return {"validation": val, "test": test}


def _is_sorted(frame: pd.DataFrame) -> bool:
    pids = frame[PARTITION_ID].to_numpy()
    periods = frame[PERIOD].to_numpy()
    same = pids[1:] == pids[:-1]
    if (same & (periods[1:] <= periods[:-1])).any():
        return False
    return len(pd.unique(pids)) == int((~same).sum()) + 1


def _anchor(frame: pd.DataFrame, cfg: Any) -> str | None:
    times = frame[cfg.data.time] if cfg.data.time in frame.columns else None
    if cfg.data.freq == "int" or times is None or not pd.api.types.is_datetime64_any_dtype(times):
        return None
    return anchor_offset(times, cfg.data.freq)


class _PartitionJob:
    """One partition's training, run in two steps around the batch's pooled candidate scores.

    ``_fit_partition`` is a generator: it yields once with its fold errors per candidate, and is
    resumed with the batch's prior. A failure in either step fails this partition alone.
    """

    def __init__(self, batch: _Batch, g: int) -> None:
        ff = batch.ff
        rows = ff.rows(g)
        self.result = TrainResult(partition_id=str(ff.partition_ids[g]), keys=batch.keys[g], status="failed",
                                  n_observed=int((~ff.filled[rows]).sum()))
        self.clock = _Clock()
        self.seconds = 0.0
        self.fold_errors: dict[str, tuple[float, float]] = {}
        self._steps = _fit_partition(batch, g, self.result, self.clock)
        self._started = False
        self._done = False

    def step(self, prior: str | None) -> None:
        if self._done:
            return
        began = perf_counter()
        try:
            if self._started:
                self._steps.send(prior)
            else:
                self._started = True
                self.fold_errors = next(self._steps)
        except StopIteration:
            self._done = True
        except Exception as exc:  # one bad partition must not stop the batch: recorded, logged, reported
            self._done = True
            self.fold_errors = {}
            result = self.result
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
            result.model_name, result.bundle = None, None
            result.metrics, result.baseline_metrics, result.candidate_scores = {}, {}, {}
            result.global_metrics = {}
            logger.warning("partition %s failed: %s", result.partition_id, result.reason, exc_info=True)
        finally:
            self.seconds += perf_counter() - began

    def finish(self, feature_seconds: float) -> TrainResult:
        result = self.result
        result.fit_seconds = self.seconds + feature_seconds
        result.timings = {"features": feature_seconds, "estimators": self.clock.seconds,
                          "overhead": self.seconds - self.clock.seconds}
        return result


def pooled_prior(fold_errors: list[dict[str, tuple[float, float]]]) -> str | None:
    """The candidate with the lowest pooled WAPE over every partition's folds (sum of absolute
    errors over sum of absolute actuals), counted over the partitions that scored every candidate
    (so that a candidate evaluated on fewer, easier series does not win by that); None if none."""
    if not fold_errors:
        return None
    common = set.intersection(*(set(e) for e in fold_errors))
    totals = {name: [0.0, 0.0] for name in common}
    for errors in fold_errors:
        for name in common:
            err, act = errors[name]
            if np.isfinite(err) and np.isfinite(act):
                totals[name][0] += err
                totals[name][1] += act
    scored = [(err / act, name) for name, (err, act) in totals.items() if act > 0]
    return min(scored)[1] if scored else None


def _fold_error(actual: np.ndarray, pred: np.ndarray, filled: np.ndarray) -> tuple[float, float]:
    """Absolute error and absolute actual summed over observed fold rows (for the pooled prior)."""
    keep = ~filled & ~np.isnan(actual) & ~np.isnan(pred)
    return float(np.abs(actual[keep] - pred[keep]).sum()), float(np.abs(actual[keep]).sum())


class _Residuals:
    """Backtest residuals in log1p space per source kind, for the prediction intervals."""

    def __init__(self) -> None:
        self.values: dict[str, list[np.ndarray]] = {}

    def add(self, kind: str, actual: np.ndarray, pred: np.ndarray, filled: np.ndarray) -> None:
        keep = ~filled & ~np.isnan(actual) & ~np.isnan(pred)
        if keep.any():
            r = np.log1p(np.maximum(actual[keep], 0.0)) - np.log1p(np.maximum(pred[keep], 0.0))
            self.values.setdefault(kind, []).append(r)

    def intervals(self, level: float) -> dict[str, tuple[float, float]]:
        return {kind: conformal_offsets(np.concatenate(parts), level)
                for kind, parts in self.values.items() if parts}


def conformal_offsets(residuals: np.ndarray, level: float) -> tuple[float, float]:
    """Lower and upper residual quantiles for a central ``level`` interval (split-conformal ranks:
    the ceil((n+1)(1-a/2))-th smallest, which widens honestly when there are few residuals)."""
    r = np.sort(np.asarray(residuals, dtype=np.float64))
    n = len(r)
    alpha = 1.0 - float(level)
    k_hi = int(math.ceil((n + 1) * (1.0 - alpha / 2.0)))
    k_lo = int(math.floor((n + 1) * (alpha / 2.0)))
    spread = float(r[-1] - r[0]) if n > 1 else 1.0
    hi = float(r[k_hi - 1]) if k_hi <= n else float(r[-1]) + 0.5 * spread / max(n, 1) ** 0.5
    lo = float(r[k_lo - 1]) if k_lo >= 1 else float(r[0]) - 0.5 * spread / max(n, 1) ** 0.5
    return min(lo, 0.0), max(hi, 0.0)


def _fit_partition(batch: _Batch, g: int, result: TrainResult,
                   clock: _Clock) -> Generator[dict[str, tuple[float, float]], str | None, None]:
    cfg, ff = batch.cfg, batch.ff
    f = cfg.forecast
    rows = ff.rows(g)
    periods, y, filled, X = ff.periods[rows], ff.y[rows], ff.filled[rows], ff.X[rows]
    y_obs = np.where(filled, np.nan, y)  # models learn from observed rows; filled ones only feed lags
    gm = batch.global_models
    pooled = gm is not None and "global" in cfg.training.candidates and "final" in gm.fits
    too_few = result.n_observed < int(f.min_periods)
    if too_few and not (pooled and result.n_observed >= 1):
        result.status = "skipped"
        result.reason = (f"{result.n_observed} observed periods, fewer than "
                         f"forecast.min_periods={f.min_periods}")
        return
    win = partition_windows(periods, filled, cfg)
    residuals = _Residuals()
    cutoffs = {"validation": win.validation_start, "test": win.test_start, "final": np.iinfo(np.int64).max}

    def global_view(fit: str) -> Any:
        """The partition's view of one global fit: its statistics before that fit's cut-off."""
        if gm is None or fit not in gm.fits:
            return None
        return gm.view(fit, *partition_stats(ff, g, int(cutoffs[fit])))

    i_test = win.i_test
    test_y, test_filled = y[i_test:], filled[i_test:]
    # the global model's honest test-window forecast: for its metrics and its interval
    g_test = global_view("test")
    g_pred = None
    if g_test is not None and i_test < len(y):
        g_pred = _window_forecast(batch, g, g_test, clock, i_test, len(y), win.test_start - 1)
        result.global_metrics = _score(test_y, g_pred, test_filled)
        residuals.add("global", test_y, g_pred, test_filled)
    g_val = global_view("validation")
    global_folds = None  # the global model's forecasts of the folds: its residuals and its candidate score
    if g_val is not None:
        global_folds = [_window_forecast(batch, g, g_val, clock, lo, hi, origin) for lo, hi, origin in win.folds]
        for (lo, hi, _), pred in zip(win.folds, global_folds):
            residuals.add("global", y[lo:hi], pred, filled[lo:hi])

    if win.short or too_few:
        reason = (f"{int((~filled[:i_test]).sum())} observed periods before the test window: too few for "
                  f"forecast.min_train_periods={f.min_train_periods} before a validation window of "
                  f"{f.validation_periods}: baseline only")
        if too_few:  # a new series: only the global model (pooled over all the others) can say much
            reason = (f"{result.n_observed} observed periods, fewer than forecast.min_periods="
                      f"{f.min_periods}: baseline only")
        _baseline_only(batch, g, result, clock, y_obs, reason, win, residuals, g_pred, global_view("final"))
        return

    metric = cfg.training.selection_metric
    names = [n for n in cfg.training.candidates if n != "global" or global_folds is not None]
    fold_actual = np.concatenate([y[lo:hi] for lo, hi, _ in win.folds])
    fold_filled = np.concatenate([filled[lo:hi] for lo, hi, _ in win.folds])
    fold_preds: dict[str, np.ndarray] = {}
    for name in names:
        if name == "global":
            parts = global_folds
        else:
            parts = [_window_forecast(batch, g, clock.fit(make_candidate(name, cfg, ff.spec), X[:lo], y_obs[:lo]),
                                      clock, lo, hi, origin) for lo, hi, origin in win.folds]
        fold_preds[name] = np.concatenate(parts) if parts else np.empty(0)
    scores = {n: _score(fold_actual, fold_preds[n], fold_filled)[metric] for n in names}
    prior = yield {n: _fold_error(fold_actual, fold_preds[n], fold_filled) for n in names}
    best, members = choose(scores, names, metric, prior, float(cfg.training.selection_margin))
    if cfg.training.ensemble:
        ranked = sorted(names, key=lambda n: (selection_key(scores[n], metric), names.index(n)))
        if len(ranked) >= 2 and np.isfinite(selection_key(scores[ranked[1]], metric)):
            pair = (ranked[0], ranked[1])
            mean = (fold_preds[pair[0]] + fold_preds[pair[1]]) / 2.0
            scores["ensemble"] = _score(fold_actual, mean, fold_filled)[metric]
            if beats(scores["ensemble"], scores[best], metric, float(cfg.training.selection_margin)):
                best, members = "ensemble", pair
                fold_preds["ensemble"] = mean
    base_folds = fold_preds.get("baseline")
    if base_folds is None:
        base_folds = np.concatenate([_window_forecast(batch, g, MovingAverageBaseline().fit(None, y_obs[:lo]), clock,
                                                      lo, hi, origin) for lo, hi, origin in win.folds])
    residuals.add("model", fold_actual, fold_preds[best], fold_filled)
    residuals.add("baseline", fold_actual, base_folds, fold_filled)

    model = _fit_members(batch, members, X[:i_test], y_obs[:i_test], clock, global_view("test"))
    base = clock.fit(MovingAverageBaseline(), None, y_obs[:i_test])
    pred = _window_forecast(batch, g, model, clock, i_test, len(y), win.test_start - 1)
    base_pred = clock.predict(base, len(y) - i_test)
    result.metrics = _score(test_y, pred, test_filled)
    result.baseline_metrics = _score(test_y, base_pred, test_filled)
    result.candidate_scores = scores
    residuals.add("model", test_y, pred, test_filled)
    residuals.add("baseline", test_y, base_pred, test_filled)
    # every backtest window at once (folds and test): the steadier evidence the scoring chain's
    # "unpromoted" step reads (does the model beat its own baseline?)
    all_actual = np.concatenate((fold_actual, test_y))
    all_filled = np.concatenate((fold_filled, test_filled))
    result.metrics["backtest_wape"] = _score(all_actual, np.concatenate((fold_preds[best], pred)), all_filled)["wape"]
    result.metrics["baseline_backtest_wape"] = _score(all_actual, np.concatenate((base_folds, base_pred)),
                                                      all_filled)["wape"]
    if global_folds is not None and g_pred is not None:
        result.metrics["global_backtest_wape"] = _score(
            all_actual, np.concatenate((*global_folds, g_pred)), all_filled)["wape"]

    final = _fit_members(batch, members, X, y_obs, clock, global_view("final"))
    final_base = clock.fit(MovingAverageBaseline(), None, y_obs)
    result.status, result.model_name = "trained", best
    result.bundle = _bundle(batch, g, best, final, final_base, result.metrics,
                            periods[i_test:], y[i_test:], pred, base_pred, g_pred)
    _finish_bundle(result.bundle, residuals, cfg, global_view("final"))


def beats(score: float, other: float, metric: str, margin: float) -> bool:
    """Is ``score`` better than ``other`` by more than ``margin`` (a share of ``other``)?"""
    mine, theirs = selection_key(score, metric), selection_key(other, metric)
    if not np.isfinite(mine):
        return False
    if not np.isfinite(theirs):
        return True
    return mine < theirs - margin * abs(theirs)


def choose(scores: Mapping[str, float], names: list[str], metric: str, prior: str | None,
           margin: float) -> tuple[str, tuple[str, ...]]:
    """A partition's candidate: the batch's best (``prior``) unless one of its own beats it on
    its folds by more than ``margin``; without a prior, simply its best (ties: the earlier one).

    Why: 24 to 36 fold points pick a winner by chance often; what did best across hundreds of
    partitions is the better bet unless a partition clearly says otherwise.
    """
    ranked = sorted(names, key=lambda n: (selection_key(scores[n], metric), names.index(n)))
    best = ranked[0]
    if prior in scores and best != prior and not beats(scores[best], scores[prior], metric, margin):
        best = prior
    return best, (best,)


def _fit_members(batch: _Batch, members: tuple[str, ...], X: np.ndarray, y_obs: np.ndarray, clock: _Clock,
                 view: Any) -> Any:
    """The chosen candidate (or the ensemble of two) fitted on the given rows."""
    fitted = []
    for name in members:
        if name == "global":
            fitted.append(view)
        else:
            fitted.append(clock.fit(make_candidate(name, batch.cfg, batch.ff.spec), X, y_obs))
    if len(fitted) == 1:
        return fitted[0]
    ensemble = AverageForecaster(members=tuple(fitted), names=tuple(members))
    ensemble.members_ = tuple(fitted)
    return ensemble


def _finish_bundle(bundle: "ForecastBundle", residuals: _Residuals, cfg: Any, view: Any) -> None:
    level = float(cfg.forecast.interval_level)
    bundle.interval_level = level
    bundle.intervals = residuals.intervals(level)
    if view is not None:
        bundle.global_view = view  # pickles without the model itself (see GlobalView)


def _baseline_only(batch: _Batch, g: int, result: TrainResult, clock: _Clock, y_obs: np.ndarray,
                   reason: str, win: "Windows", residuals: "_Residuals", g_pred: np.ndarray | None,
                   view: Any) -> None:
    """Too short for the ML candidates: score the baseline on the last periods it can spare."""
    ff = batch.ff
    rows = ff.rows(g)
    periods, y, filled = ff.periods[rows], ff.y[rows], ff.filled[rows]
    i_test = win.i_test
    base = clock.fit(MovingAverageBaseline(), None, y_obs[:i_test])
    pred = clock.predict(base, len(y) - i_test)
    result.metrics = _score(y[i_test:], pred, filled[i_test:])
    result.baseline_metrics = dict(result.metrics)
    residuals.add("baseline", y[i_test:], pred, filled[i_test:])
    final = clock.fit(MovingAverageBaseline(), None, y_obs)
    if (view is not None and g_pred is not None and len(g_pred) == len(y) - i_test
            and "global" in batch.cfg.training.candidates):
        # too short for models of its own, not for the global model (pooled over every partition):
        # that is its model, scored on the same window, and promoted or not by the same rule
        result.metrics = _score(y[i_test:], g_pred, filled[i_test:])
        residuals.add("model", y[i_test:], g_pred, filled[i_test:])
        result.status, result.model_name = "trained", "global"
        result.reason = reason.replace("baseline only", "the global model is its model")
        result.bundle = _bundle(batch, g, "global", view, final, result.metrics,
                                periods[i_test:], y[i_test:], g_pred, pred, g_pred)
    else:
        residuals.add("model", y[i_test:], pred, filled[i_test:])
        result.status, result.reason, result.model_name = "baseline_only", reason, "baseline"
        result.bundle = _bundle(batch, g, "baseline", final, final, result.metrics,
                                periods[i_test:], y[i_test:], pred, pred, g_pred)
    _finish_bundle(result.bundle, residuals, batch.cfg, view)


def _window_forecast(batch: _Batch, g: int, est: Any, clock: _Clock, lo: int, hi: int,
                     origin: int) -> np.ndarray:
    """Forecast rows lo:hi of partition g from ``origin`` (the period before the window)."""
    if hi <= lo:
        return np.empty(0)
    if isinstance(est, MovingAverageBaseline):
        return clock.predict(est, hi - lo)
    ff = batch.ff
    rows = ff.rows(g)
    periods = ff.periods[rows]
    if periods[hi - 1] - origin <= ff.spec.horizon:  # every lag reads history: the batch features hold
        return clock.predict(est, ff.X[rows][lo:hi])
    t = perf_counter()
    out = recursive_forecast(est, ff.spec, int(ff.trend_origin[g]), ff.log_covariates[g],
                             periods[:lo], ff.y[rows][:lo], batch.cov[rows][:lo],
                             origin, periods[lo:hi], batch.cov[rows][lo:hi])
    clock.seconds += perf_counter() - t
    return out


def _score(actual: np.ndarray, pred: np.ndarray, filled: np.ndarray) -> dict[str, float]:
    """Metrics over observed rows (all rows if the window holds only filled ones)."""
    mask = ~filled
    if not mask.any():
        return evaluate(actual, pred)
    return evaluate(actual[mask], pred[mask])


def _bundle(batch: _Batch, g: int, name: str, estimator: Any, baseline: MovingAverageBaseline,
            metrics: dict[str, float], bt_periods: np.ndarray, bt_actual: np.ndarray, bt_pred: np.ndarray,
            bt_base: np.ndarray, bt_global: np.ndarray | None = None) -> ForecastBundle:
    ff, cfg = batch.ff, batch.cfg
    rows = ff.rows(g)
    periods = ff.periods[rows]
    last = int(periods[-1])
    tail = slice(int(np.searchsorted(periods, last - ff.spec.lookback + 1)), len(periods))
    backtest = {PERIOD: np.asarray(bt_periods, dtype=np.int64).copy(),
                "actual": np.asarray(bt_actual, dtype=np.float64).copy(),
                "prediction": np.asarray(bt_pred, dtype=np.float64).copy(),
                "baseline": np.asarray(bt_base, dtype=np.float64).copy()}
    if bt_global is not None and len(bt_global) == len(bt_periods):
        backtest["global"] = np.asarray(bt_global, dtype=np.float64).copy()
    return ForecastBundle(
        partition_id=str(ff.partition_ids[g]), keys=batch.keys[g], model_name=name, estimator=estimator,
        baseline=baseline, spec=ff.spec, trend_origin=int(ff.trend_origin[g]),
        log_covariates=tuple(bool(v) for v in ff.log_covariates[g]),
        history_periods=periods[tail].copy(), history_target=ff.y[rows][tail].copy(),
        history_covariates=batch.cov[rows][tail].copy(), last_period=last, freq=cfg.data.freq,
        anchor=batch.anchor, time_column=cfg.data.time, metrics=dict(metrics),
        backtest_arrays=backtest,
    )


# -- summaries for reports and benchmarks ---------------------------------------------------------

def time_breakdown(results: Iterable[TrainResult]) -> dict[str, float]:
    """Where training time went: shared feature preparation, the estimators' own calls, the rest."""
    results = list(results)
    n = len(results)
    total = {k: sum(r.timings.get(k, 0.0) for r in results) for k in ("features", "estimators", "overhead")}
    out: dict[str, float] = {"partitions": n, "total_seconds": sum(r.fit_seconds for r in results)}
    for k, v in total.items():
        out[f"{k}_seconds"] = v
        out[f"{k}_ms_per_partition"] = 1000.0 * v / n if n else 0.0
    return out


def backtest_summary(results: Iterable[TrainResult]) -> dict[str, Any]:
    """Pooled test-window metrics of the chosen models and of the baseline, over all bundles."""
    frames = [r.bundle.backtest_arrays for r in results
              if r.bundle is not None and len(r.bundle.backtest_arrays.get("actual", ()))]
    if not frames:
        nan = dict.fromkeys(("wape", "mape", "rmse", "accuracy"), float("nan"))
        return {"partitions": 0, "model": nan, "baseline": dict(nan)}
    actual = np.concatenate([f["actual"] for f in frames])
    return {
        "partitions": len(frames),
        "model": evaluate(actual, np.concatenate([f["prediction"] for f in frames])),
        "baseline": evaluate(actual, np.concatenate([f["baseline"] for f in frames])),
    }
