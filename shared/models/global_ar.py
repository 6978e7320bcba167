"""The autoregressive half of the global model: read the last periods, forecast one step at a time.

Why: the partition models and the direct global model read the target no closer than the horizon
(``lag_h`` and beyond: one model answers every step of the horizon at once). On data whose next
value depends mostly on the last few (random walks, level shifts, the Christmas drop of a daily
series), that throws away what matters most. The field's standard global model (mlforecast with
LightGBM) reads lags from 1 and forecasts step by step, feeding each forecast back as the next
step's lag 1; it was the best reference on the benchmark's M4 weekly and bike sets and on
hidden real panels (issue 17). This module is that model, trained over every partition beside
the direct one, and competing as the candidate ``global_ar``.

How it sees a partition: the features of :mod:`shared.models.features` for a horizon of 1 (lags 1..7,
the seasonal lags, rolling means ending at the previous period, Fourier terms, covariates), with
every target-derived column divided by the row's *level* (the mean of the last 4 periods; a
random walk becomes a ratio near 1 whatever its height), ``log(level)`` and the
partition's ``log(scale)`` as statistics. It predicts ``target / level`` (Poisson loss).

Forecasting is vectorised over many series at once (:func:`forecast_steps`): one model call per
step for a whole mini-batch's backtest windows, and the same code for one served partition.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from shared.models.features import FeatureFrame, FeatureSpec, compute_features, rolling_windows, write_calendar

AR_LAGS = 7  # lags 1..7 (mlforecast's common choice), plus the seasonal and yearly lags
LEVEL_WINDOW = 4
LEVEL_FLOOR = 0.1  # a row's level is at least this share of the partition's scale (intermittent series)


def level_window(season_length: int) -> int:
    """Periods averaged for a row's level: the last 4, whatever the season (offline, on the eight
    real sets: 3 and 4 periods scored alike, a whole season worse on weekly, hourly and web data)."""
    return LEVEL_WINDOW


def ar_spec(spec: FeatureSpec) -> FeatureSpec:
    """The autoregressive feature spec beside a partition spec: horizon 1, lags from 1.

    Lags and windows never reach further back than ``spec.lookback``: a bundle keeps that much
    history, and serving forecasts from it.
    """
    s = int(spec.season_length)
    reach = int(spec.lookback)
    lags = set(range(1, AR_LAGS + 1))
    if s > 1:
        lags |= {s - 1, s, s + 1}
    if spec.yearly_terms:
        lags.add(s * round(spec.year_length / s) if s > 1 else round(spec.year_length))
    windows = set(rolling_windows(s)) | {level_window(s)}
    return FeatureSpec(horizon=1, season_length=s, lags=tuple(sorted(k for k in lags if k <= reach)),
                       windows=tuple(sorted(w for w in windows if w <= reach)),
                       fourier_terms=spec.fourier_terms, covariates=spec.covariates,
                       year_length=spec.year_length, yearly_terms=spec.yearly_terms)


def level_column(spec1: FeatureSpec) -> int | None:
    """The column of the rolling mean that gives a row's level (None when the history is too short
    for its window: the partition's scale is the level then)."""
    name = f"roll_{level_window(spec1.season_length)}"
    return spec1.names.index(name) if name in spec1.names else None


def ar_features(ff: FeatureFrame, spec1: FeatureSpec) -> np.ndarray:
    """The autoregressive features of a batch's rows (``spec1`` order), from its feature frame.

    The covariate columns are the frame's own (already in their log or raw form).
    """
    bare = replace(spec1, covariates=())
    X0 = compute_features(bare, ff.bounds, ff.periods, ff.y, np.empty((len(ff.periods), 0)), ff.trend_origin,
                          np.zeros((ff.n_partitions, 0), dtype=bool))
    cov = ff.X[:, ff.spec.columns("cov_")]
    return np.concatenate((X0[:, :-1], cov, X0[:, -1:]), axis=1)


def row_level(X1: np.ndarray, spec1: FeatureSpec, scale: np.ndarray | float) -> np.ndarray:
    """Each row's level: its recent mean, the partition's scale where there is none, never below
    ``LEVEL_FLOOR`` times the scale (a run of zeros would make every later ratio infinite)."""
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (len(X1),))
    col = level_column(spec1)
    recent = np.asarray(X1[:, col], dtype=np.float64) if col is not None else np.full(len(X1), np.nan)
    level = np.where(np.isfinite(recent), recent, scale)
    return np.maximum(level, LEVEL_FLOOR * scale)


def ar_design(X1: np.ndarray, spec1: FeatureSpec, level: np.ndarray, scale: np.ndarray | float,
              centres: np.ndarray) -> np.ndarray:
    """The model's inputs: target-derived columns over the level, calendar and covariates as they
    are, covariates also against the partition's centre, log level and log scale."""
    X1 = np.asarray(X1, dtype=np.float64)
    n = len(X1)
    level = np.asarray(level, dtype=np.float64).reshape(n, 1)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1, 1) if np.ndim(scale)
                            else np.float64(scale), (n, 1))
    target_cols = np.concatenate((spec1.columns("lag_"), spec1.columns("roll_")))
    keep = np.concatenate((spec1.columns("sin_"), spec1.columns("cos_"), spec1.columns("ysin_"),
                           spec1.columns("ycos_"), spec1.columns("cov_")))
    parts = [X1[:, target_cols] / level, X1[:, keep]]
    cov = spec1.columns("cov_")
    if len(cov):
        centres = np.asarray(centres, dtype=np.float64)
        parts.append(X1[:, cov] - (centres.reshape(1, -1) if centres.ndim == 1 else centres))
    parts += [np.log(level), np.log(scale)]
    return np.concatenate(parts, axis=1)


def step_features(spec1: FeatureSpec, M: np.ndarray, j: int, periods: np.ndarray, cov: np.ndarray,
                  trend_origin: np.ndarray) -> np.ndarray:
    """The features of cell ``j`` of every row of ``M`` (one series per row, one period per column,
    NaN where unknown): what :func:`~shared.models.features.compute_features` gives that period."""
    n = len(M)
    X = np.empty((n, len(spec1.names)), dtype=np.float64)
    col = 0
    for k in spec1.lags:
        X[:, col] = M[:, j - k]
        col += 1
    for w in spec1.windows:
        window = M[:, j - w:j]
        count = (~np.isnan(window)).sum(axis=1)
        total = np.where(np.isnan(window), 0.0, window).sum(axis=1)
        X[:, col] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        col += 1
    col = write_calendar(X, col, spec1, periods)
    n_cov = len(spec1.covariates)
    if n_cov:
        X[:, col:col + n_cov] = cov
        col += n_cov
    X[:, col] = (periods - trend_origin).astype(np.float64)
    return X


def forecast_steps(model: "object", hist: np.ndarray, origins: np.ndarray, steps: int,
                   cov_future: np.ndarray, trend_origin: np.ndarray, scale: np.ndarray,
                   centres: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """Forecasts of steps 1..``steps`` after each series' origin, one model call per step.

    ``model``: a fitted :class:`~shared.models.global_model.GlobalForecaster` on :func:`ar_design` inputs
    (its ``spec`` is the autoregressive spec); ``hist``: (series, ``spec.lookback``) the target in the
    periods ending at each origin (NaN where unknown); ``cov_future``: (series, steps, covariates)
    in their feature form; ``scale``, ``centres``, ``ceiling``: per series. Each step's forecast
    (bounded by the ceiling) is the next step's lag 1.
    """
    spec1 = model.spec
    hist = np.asarray(hist, dtype=np.float64)
    n, L = hist.shape
    M = np.concatenate((hist, np.full((n, steps), np.nan)), axis=1)
    origins = np.asarray(origins, dtype=np.int64)
    trend_origin = np.asarray(trend_origin, dtype=np.int64)
    scale = np.asarray(scale, dtype=np.float64)
    ceiling = np.asarray(ceiling, dtype=np.float64)
    for k in range(steps):
        j = L + k
        X1 = step_features(spec1, M, j, origins + k + 1, cov_future[:, k, :], trend_origin)
        level = row_level(X1, spec1, scale)
        pred = model.predict_scaled(ar_design(X1, spec1, level, scale, centres)) * level
        M[:, j] = np.clip(np.nan_to_num(pred, nan=0.0, posinf=0.0), 0.0, ceiling)
    return M[:, L:]


def history_row(periods: np.ndarray, target: np.ndarray, origin: int, length: int) -> np.ndarray:
    """The target in the ``length`` periods ending at ``origin`` (NaN where no row)."""
    row = np.full(length, np.nan)
    periods = np.asarray(periods, dtype=np.int64)
    keep = (periods <= origin) & (periods > origin - length)
    row[(periods[keep] - (origin - length + 1)).astype(np.intp)] = np.asarray(target, dtype=np.float64)[keep]
    return row


def carried_covariates(row_periods: np.ndarray, row_cov: np.ndarray, origin: int, steps: int,
                       before: np.ndarray) -> np.ndarray:
    """Covariates on the grid ``origin+1 .. origin+steps``: a period without a row (or a NaN value)
    takes the latest earlier one, the first periods ``before`` (the last known row's)."""
    n_cov = row_cov.shape[1] if np.ndim(row_cov) == 2 else 0
    out = np.full((steps + 1, n_cov), np.nan)
    out[0] = before
    if len(row_periods):
        at = np.asarray(row_periods, dtype=np.int64) - origin
        ok = (at >= 1) & (at <= steps)
        out[at[ok]] = row_cov[ok]
    for k in range(1, steps + 1):
        out[k] = np.where(np.isnan(out[k]), out[k - 1], out[k])
    return out[1:]


def feature_covariates(cov: np.ndarray, log_flags: np.ndarray) -> np.ndarray:
    """Raw covariates in their feature form (log where the partition uses the log), as
    :func:`~shared.models.features.compute_features` writes them."""
    cov = np.asarray(cov, dtype=np.float64)
    if not cov.size:
        return cov
    with np.errstate(invalid="ignore", divide="ignore"):
        logged = np.log(np.where(cov > 0, cov, np.nan))
    return np.where(np.asarray(log_flags, dtype=bool), logged, cov)


def forecast_windows(model: "object", ff: FeatureFrame, windows: list[tuple[int, int, int, int]],
                     scales: np.ndarray, centres: np.ndarray, ceilings: np.ndarray) -> list[np.ndarray]:
    """Backtest forecasts of many windows of a batch at once: one model call per step for all.

    ``windows``: ``(g, lo, hi, origin)`` per window, rows ``lo:hi`` of partition ``g`` (indices
    within it) forecast from ``origin``, the history being the partition's rows up to it;
    ``scales``, ``centres``, ``ceilings``: per window. Returns the forecasts of each window's rows.
    """
    if not windows:
        return []
    spec1 = model.spec
    L = spec1.lookback
    cov_cols = ff.spec.columns("cov_")
    n_cov = len(cov_cols)
    steps = max(int(ff.periods[ff.rows(g)][hi - 1] - origin) if hi > lo else 0 for g, lo, hi, origin in windows)
    steps = max(steps, 1)
    hist = np.empty((len(windows), L))
    cov = np.empty((len(windows), steps, n_cov))
    for i, (g, lo, hi, origin) in enumerate(windows):
        rows = ff.rows(g)
        periods, y = ff.periods[rows], ff.y[rows]
        hist[i] = history_row(periods[:lo], y[:lo], origin, L)
        Xc = ff.X[rows][:, cov_cols]
        before = Xc[lo - 1] if lo > 0 else np.full(n_cov, np.nan)
        cov[i] = carried_covariates(periods[lo:hi], Xc[lo:hi], origin, steps, before)
    origins = np.array([w[3] for w in windows], dtype=np.int64)
    trend = np.array([ff.trend_origin[w[0]] for w in windows], dtype=np.int64)
    out = forecast_steps(model, hist, origins, steps, cov, trend, np.asarray(scales, dtype=np.float64),
                         np.asarray(centres, dtype=np.float64).reshape(len(windows), n_cov),
                         np.asarray(ceilings, dtype=np.float64))
    preds = []
    for i, (g, lo, hi, origin) in enumerate(windows):
        periods = ff.periods[ff.rows(g)][lo:hi]
        preds.append(out[i, (periods - origin - 1).astype(np.intp)])
    return preds
