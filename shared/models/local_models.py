"""Per-series statistical candidates: naive, seasonal naive, and statsforecast's Theta, ETS and
intermittent-demand models, as estimators of the same interface as :mod:`shared.models.candidates`.

Why these: on data we did not develop on (M4 daily/monthly, web traffic) the feature-based
models lost to the last value or the seasonal naive by 1.4-1.8x; a candidate set without them
cannot pick them where they win. They compete in the same rolling-origin folds as every other
candidate (issue 17).

How they fit the interface: ``fit(X, y)`` reads only the ``trend`` column of the feature matrix
(periods since the partition's first period) and the target, so each row's position on the
period grid is known even with gaps; ``predict(X)`` forecasts the rows' positions. The forecast
path is computed once at fit time (``path_``, steps 1..``PATH_STEPS`` after the last observed
period; further steps keep the last value) so that scoring and serving never import statsforecast
and a bundle stays small. statsforecast (Nixtla) is imported lazily, once per process; the
compute runner imports it before forking its workers (:func:`preload`).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from shared.models.features import FeatureSpec

PATH_STEPS = 1040  # 20 years of weeks; the scoring distance bound is 520 periods by default
TAIL_SEASONS = 8  # statistical fits read at most this many seasons (and at least TAIL_MIN periods)
TAIL_MIN = 120
TAIL_MAX = 600  # Theta's decomposition costs ~0.06 ms per period: 4,000 daily rows took 240 ms

STAT_KINDS = ("theta", "ets", "croston", "tsb")


def preload() -> None:
    """Import statsforecast's models now (about 3 s, once per process) rather than in a partition."""
    import statsforecast.models  # noqa: F401


def _positions(X: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    col = spec.columns("trend")
    return np.asarray(X, dtype=np.float64)[:, int(col[0])].astype(np.int64)


def _observed(X: np.ndarray | None, y: np.ndarray, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    pos = _positions(X, spec) if X is not None else np.arange(len(y))
    keep = np.isfinite(y)
    if not keep.any():
        raise ValueError("no rows with an observed target to fit on")
    return pos[keep], np.maximum(y[keep], 0.0)


class _PathForecaster(BaseEstimator, RegressorMixin):
    """A forecast path from the last observed position; ``predict`` reads it by distance."""

    spec: FeatureSpec
    # its forecast of a row depends on the row's position alone (never on lags): forecasting far
    # ahead needs no recursion through its own forecasts (shared.models.bundle.recursive_forecast)
    position_only = True

    def _set_path(self, last: int, path: np.ndarray) -> None:
        self.last_position_ = int(last)
        self.path_ = np.maximum(np.nan_to_num(np.asarray(path, dtype=np.float64), nan=0.0), 0.0)

    def predict(self, X: np.ndarray) -> np.ndarray:
        steps = _positions(X, self.spec) - self.last_position_
        idx = np.clip(steps - 1, 0, len(self.path_) - 1)
        return self.path_[idx]


class SeasonalNaive(_PathForecaster):
    """The value one season earlier (whole seasons back from the forecast period); with less than
    one season observed, the last value."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def fit(self, X: np.ndarray | None, y: np.ndarray) -> "SeasonalNaive":
        pos, values = _observed(X, y, self.spec)
        s = max(int(self.spec.season_length), 1)
        last = int(pos[-1])
        grid = np.full(last - int(pos[0]) + 1, np.nan)
        grid[pos - pos[0]] = values
        if len(grid) < s or s == 1:
            self._set_path(last, np.full(PATH_STEPS, values[-1]))
            return self
        season = grid[-s:].copy()
        # a missing cell of the last season takes the same position one season earlier, else the mean
        earlier = grid[-2 * s:-s] if len(grid) >= 2 * s else np.full(s, np.nan)
        season = np.where(np.isnan(season), earlier, season)
        season = np.where(np.isnan(season), float(np.nanmean(grid[-s:])), season)
        self._set_path(last, np.resize(season, PATH_STEPS))
        return self


class StatsForecaster(_PathForecaster):
    """One of statsforecast's per-series models on the series' tail, its forecast path kept.

    ``kind``: ``theta`` (Theta with multiplicative seasonal decomposition when the season is short
    enough to estimate: M3's winner and a standard M4 benchmark), ``ets`` (AutoETS, seasonal for
    seasons up to 24), ``croston`` (CrostonOptimized) or ``tsb`` (Teunter-Syntetos-Babai, for
    intermittent demand: it lets the demand probability decay to zero).
    Gaps inside the tail are linearly interpolated (the models need a regular series).
    """

    def __init__(self, spec: FeatureSpec, kind: str = "theta"):
        self.spec = spec
        self.kind = kind

    def _model(self, n: int) -> Any:
        from statsforecast import models

        s = int(self.spec.season_length)
        seasonal = s if 1 < s <= 24 and n >= 2 * s + 2 else 1
        if self.kind == "theta":
            return models.Theta(season_length=seasonal)
        if self.kind == "ets":
            return models.AutoETS(season_length=seasonal)
        if self.kind == "croston":
            return models.CrostonOptimized()
        if self.kind == "tsb":
            return models.TSB(alpha_d=0.1, alpha_p=0.1)
        raise ValueError(f"unknown statistical model kind {self.kind!r}; known: {STAT_KINDS}")

    def fit(self, X: np.ndarray | None, y: np.ndarray) -> "StatsForecaster":
        if self.kind not in STAT_KINDS:
            raise ValueError(f"unknown statistical model kind {self.kind!r}; known: {STAT_KINDS}")
        pos, values = _observed(X, y, self.spec)
        s = max(int(self.spec.season_length), 1)
        tail = int(min(max(TAIL_SEASONS * s, TAIL_MIN), TAIL_MAX))
        last = int(pos[-1])
        keep = pos > last - tail
        pos, values = pos[keep], values[keep]
        grid_pos = np.arange(int(pos[0]), last + 1)
        series = np.interp(grid_pos, pos, values) if len(grid_pos) != len(pos) else values
        if len(series) < 3 or np.ptp(series) == 0:
            self._set_path(last, np.full(PATH_STEPS, series[-1] if len(series) else 0.0))
            return self
        model = self._model(len(series))  # an unknown kind is a configuration error, not a fallback
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            try:
                path = model.forecast(y=series.astype(np.float64), h=PATH_STEPS)["mean"]
            except (ValueError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError):
                path = np.full(PATH_STEPS, float(series[-max(1, min(4, len(series))):].mean()))
        path = np.asarray(path, dtype=np.float64)
        if not np.isfinite(path).all():
            path = np.full(PATH_STEPS, float(series[-4:].mean()))
        # a trend extrapolated for years runs away: beyond the fitted tail the path stays level
        path[len(series):] = path[len(series) - 1] if len(series) < PATH_STEPS else path[len(series):]
        self._set_path(last, path)
        return self
