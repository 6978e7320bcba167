"""A partition's forecast model as stored and served: the :class:`ForecastBundle`.

Training (:mod:`shared.models.training`) packs each partition's chosen model, its baseline, the history
tail its features read, its backtest and its prediction-interval offsets into one bundle;
scoring and serving unpickle it and call :meth:`ForecastBundle.predict`. Forecasts further ahead
than the horizon proceed in blocks of the horizon (:func:`recursive_forecast`), exactly as the
training backtests did.

Bundles pickled before this module existed name ``shared.training.ForecastBundle``: the one
artifact loader maps that class path here (:data:`shared.models.artifact_format.CLASS_PATHS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from shared.models.candidates import MovingAverageBaseline
from shared.models.features import FeatureSpec, series_features
from shared.models.global_model import bind_global, needs_global, uses_history
from shared.models.selection import widening
from shared.data.timegrid import PERIOD, from_periods, to_periods


def recursive_forecast(estimator: Any, spec: FeatureSpec, trend_origin: int, log_covariates: Iterable[bool],
                       hist_periods: np.ndarray, hist_target: np.ndarray, hist_covariates: np.ndarray,
                       origin: int, periods: np.ndarray, covariates: np.ndarray,
                       ceiling: float = np.inf) -> np.ndarray:
    """Forecasts for ``periods`` (sorted, all > ``origin``) from the history up to ``origin``.

    ``ceiling``: no forecast exceeds it, block by block (a later block's lags read the bounded
    values, so one wild forecast cannot compound).

    Works in blocks of ``horizon`` periods on the complete grid ``origin+1 .. max(periods)``: the
    first block's lags read only history; each later block reads the previous blocks' forecasts
    as if they were observed (recursive fill for lags beyond the horizon). Grid periods that were
    not asked for carry the covariates of the latest earlier row forward.
    """
    periods = np.asarray(periods, dtype=np.int64)
    n_cov = len(spec.covariates)
    covariates = np.asarray(covariates, dtype=np.float64).reshape(len(periods), n_cov)
    if uses_history(estimator):  # a model that reads the history itself (step by step: global_ar)
        return _from_history(estimator, spec, trend_origin, log_covariates, hist_periods, hist_target,
                             hist_covariates, origin, periods, covariates, ceiling)
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
    flags = list(log_covariates)
    if getattr(estimator, "position_only", False):  # no lags read: every block at once
        step = len(grid)
    for start in range(0, len(grid), step):
        block = slice(n_hist + start, n_hist + min(start + step, len(grid)))
        X = series_features(spec, all_periods, target, cov, trend_origin, flags, rows=block)
        target[block] = np.clip(estimator.predict(X), 0.0, ceiling)
    return target[n_hist + (periods - origin - 1)]


def _from_history(estimator: Any, spec: FeatureSpec, trend_origin: int, log_covariates: Iterable[bool],
                  hist_periods: np.ndarray, hist_target: np.ndarray, hist_covariates: np.ndarray,
                  origin: int, periods: np.ndarray, covariates: np.ndarray, ceiling: float) -> np.ndarray:
    """:func:`recursive_forecast` of an estimator that reads the history: itself, or the mean of an
    ensemble's members, each forecast on its own terms."""
    flags = tuple(log_covariates)
    if getattr(estimator, "uses_history", False):
        out = estimator.forecast_history(trend_origin, flags, hist_periods, hist_target, hist_covariates,
                                         origin, periods, covariates, ceiling=ceiling)
    else:
        members = getattr(estimator, "members_", None) or estimator.members
        out = np.mean([recursive_forecast(m, spec, trend_origin, flags, hist_periods, hist_target,
                                          hist_covariates, origin, periods, covariates, ceiling=ceiling)
                       for m in members], axis=0)
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, ceiling)


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
    # how the offsets grow with the step (shared.models.selection.step_profile); None: the older rule
    interval_profile: Any = None
    global_view: Any = None  # the partition's GlobalView (scale, centres) for the global fallback
    # no forecast of any source exceeds it (shared.models.metrics.forecast_ceiling of the history)
    ceiling: float = float("inf")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Bundles pickled by earlier releases lack the newer fields: they get the defaults."""
        state.setdefault("intervals", {})
        state.setdefault("interval_level", 0.80)
        state.setdefault("global_view", None)
        state.setdefault("ceiling", float("inf"))
        state.setdefault("interval_profile", None)
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
        """Attach the loaded global model (see :mod:`shared.models.global_model`) to this bundle."""
        bind_global(self.estimator, model)
        if self.global_view is not None:
            bind_global(self.global_view, model)

    def bounds(self, periods: np.ndarray, prediction: np.ndarray,
               kind: str = "model") -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the ``interval_level`` interval around point forecasts.

        From the partition's own backtest residuals (log1p space, conformal quantiles calibrated on
        the batch's test windows, :func:`shared.models.selection.calibrated_intervals`), widened with the
        step by the batch's profile: a kind the bundle has no residuals for gets NaN bounds.
        """
        pred = np.asarray(prediction, dtype=np.float64)
        lo_hi = self.intervals.get(kind)
        if lo_hi is None:
            nan = np.full(len(pred), np.nan)
            return nan, nan.copy()
        lo, hi = lo_hi
        steps = np.asarray(periods, dtype=np.int64) - int(self.last_period)
        if self.interval_profile is not None:
            widen = widening(self.interval_profile, steps)
        else:  # bundles of earlier releases: flat up to the horizon, then the square root
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
                                      self.last_period, periods, cov, ceiling=self.ceiling)
        return periods, np.clip(np.asarray(pred, dtype=np.float64), 0.0, self.ceiling)

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
