"""Model features for a whole mini-batch of partitions at once, in numpy on the sorted arrays.

Why vectorised: building features one pandas frame per partition costs several times the model
fit itself, which would make the engine's overhead dominate. Here a batch of thousands of
partitions costs a handful of numpy passes:

* every partition is laid onto a dense period grid inside one long array, preceded by
  ``spec.lookback`` NaN padding cells, so "lag k" is a plain index shift (``dense[pos - k]``) that
  can never reach the previous partition, and "value at ``_period - k``" holds even when a series
  has gaps (``validation.gaps = "keep"``): a missing period is a NaN cell;
* rolling means of the target lagged by the horizon come from two cumulative sums (values and
  counts of non-missing cells): mean over the window = difference of sums / difference of counts.

Features (all NaN where the history does not reach):

* ``lag_<k>`` — the target ``k`` periods earlier, for ``k = h .. h+3`` (``h`` = horizon) and the
  seasonal lags ``s-1, s, s+1`` (``s`` = season length) that are usable at the horizon (``>= h``);
* ``roll_<w>`` — the mean of the target over the ``w`` periods ending ``h`` periods earlier
  (missing cells ignored; NaN when the window holds no value);
* ``sin_<j>`` / ``cos_<j>`` — Fourier terms of the position in the season (``_period mod s``;
  period ordinals are one grid for all partitions, so positions agree across partitions);
* ``ysin_<j>`` / ``ycos_<j>`` and ``lag_<y>`` — the longer cycle a short season leaves out: for
  daily and business-day data (season: the week) the year, for hourly data (season: the day) the
  week: Fourier terms of the position in that cycle and the target one cycle back in whole
  seasons (364 days: the same weekday; 168 hours: the same hour of the same weekday);
* ``cov_<name>`` — each covariate, as ``log(x)`` when it is strictly positive and not a 0/1 flag
  in that partition (prices: the log-log, price-elasticity form), otherwise as it is;
* ``trend`` — periods since the partition's first period.

Every feature is usable at the horizon: for a forecast made after period ``T``, rows
``T+1 .. T+h`` only read targets at periods ``<= T``. Training and prediction share
:func:`compute_features`; prediction further ahead than ``h`` fills the lags recursively (see
``shared.models.training.recursive_forecast``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pandas as pd

from shared.keys import PARTITION_ID
from shared.data.timegrid import PERIOD

FILLED = "_filled"
N_LAGS = 4
FOURIER_TERMS = 3
YEARLY_TERMS = 2
# the longer cycle of the frequencies whose season is far shorter: the year (in periods) for daily
# data, whose season is the week; the week (168 hours) for hourly data, whose season is the day
# (M4 hourly: 0.032 -> 0.025 WAPE with it, docs/performance.md)
PERIODS_PER_YEAR = {"D": 365.2425, "B": 260.8929, "H": 168.0}


def periods_per_year(freq: str) -> float:
    """The longer cycle in periods (a year of days; a week of hours), for frequencies that get
    its terms (else 0)."""
    return PERIODS_PER_YEAR.get(str(freq).upper(), 0.0)


def rolling_windows(season_length: int) -> tuple[int, ...]:
    """Rolling-mean windows scaled to the season: weekly (s=52) gives 4, 8, 13, 26, 52."""
    s = int(season_length)
    if s >= 26:
        return tuple(sorted({4, 8, 13, s // 2, s}))
    if s >= 2:
        return tuple(sorted({max(2, s // 2), s, 2 * s}))
    return (2, 4, 8)


@dataclass(frozen=True)
class FeatureSpec:
    """Which features exist for a horizon and season; stored in every bundle so serving rebuilds them."""

    horizon: int
    season_length: int
    lags: tuple[int, ...]
    windows: tuple[int, ...]
    fourier_terms: int
    covariates: tuple[str, ...]
    # yearly terms (daily-like data): class defaults keep bundles pickled before them predicting as before
    year_length: float = 0.0
    yearly_terms: int = 0
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = [f"lag_{k}" for k in self.lags] + [f"roll_{w}" for w in self.windows]
        for j in self._fourier_orders():
            if 2 * j != self.season_length:  # sin(pi * pos) is zero on the grid
                names.append(f"sin_{j}")
            names.append(f"cos_{j}")
        for j in range(1, self.yearly_terms + 1):
            names += [f"ysin_{j}", f"ycos_{j}"]
        names += [f"cov_{c}" for c in self.covariates] + ["trend"]
        object.__setattr__(self, "names", tuple(names))

    @classmethod
    def from_config(cls, cfg: Any) -> "FeatureSpec":
        h, s = int(cfg.forecast.horizon), int(cfg.season_length)
        lags = list(range(h, h + N_LAGS))
        if s > 1:
            lags += [k for k in (s - 1, s, s + 1) if k >= h]
        year = periods_per_year(cfg.data.freq)
        yearly = year > 0 and 4 * s < year
        if yearly:
            lags.append(s * round(year / s) if s > 1 else round(year))
        return cls(horizon=h, season_length=s, lags=tuple(sorted(set(lags))), windows=rolling_windows(s),
                   fourier_terms=min(FOURIER_TERMS, s // 2), covariates=tuple(cfg.data.covariates),
                   year_length=year if yearly else 0.0, yearly_terms=YEARLY_TERMS if yearly else 0)

    def _fourier_orders(self) -> range:
        return range(1, self.fourier_terms + 1)

    @property
    def lookback(self) -> int:
        """Periods of history that the features of one row read (the history a bundle keeps)."""
        return max(max(self.lags), self.horizon + max(self.windows) - 1)

    def columns(self, prefix: str) -> np.ndarray:
        """Column indices of one feature family ("lag_", "roll_", "sin_", "cos_", "cov_", "trend")
        (remembered per spec: the models ask several times per fit and predict)."""
        return _family_columns(self.names, prefix)


@lru_cache(maxsize=256)
def _family_columns(names: tuple[str, ...], prefix: str) -> np.ndarray:
    found = np.array([i for i, n in enumerate(names) if n.startswith(prefix)], dtype=np.intp)
    found.setflags(write=False)  # shared by every caller
    return found


@dataclass
class FeatureFrame:
    """Features of a batch: one row per input row, in the input's (partition, period) order."""

    X: np.ndarray  # (rows, features) float64
    spec: FeatureSpec
    y: np.ndarray  # the target, float64
    periods: np.ndarray  # int64 ordinals
    filled: np.ndarray  # bool: rows the validation step filled into gaps
    bounds: np.ndarray  # partition g owns rows bounds[g]:bounds[g+1]
    partition_ids: np.ndarray  # (partitions,) object
    trend_origin: np.ndarray  # (partitions,) int64: each partition's first period
    log_covariates: np.ndarray  # (partitions, covariates) bool: covariate used as log(x)

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    @property
    def n_partitions(self) -> int:
        return len(self.partition_ids)

    def rows(self, g: int) -> slice:
        return slice(int(self.bounds[g]), int(self.bounds[g + 1]))

    def to_frame(self) -> pd.DataFrame:
        """A readable frame (for inspection and tests; training uses the arrays)."""
        lengths = np.diff(self.bounds)
        out = pd.DataFrame(self.X, columns=list(self.names))
        out.insert(0, "y", self.y)
        out.insert(0, PERIOD, self.periods)
        out.insert(0, PARTITION_ID, np.repeat(self.partition_ids, lengths))
        return out


def build_features(frame: pd.DataFrame, cfg: Any) -> FeatureFrame:
    """Features of a validated batch (sorted by partition and period), vectorised over partitions."""
    spec = FeatureSpec.from_config(cfg)
    missing = [c for c in (PARTITION_ID, PERIOD, cfg.data.target, *spec.covariates) if c not in frame.columns]
    if missing:
        raise ValueError(f"build_features: the frame lacks column(s) {missing}")
    pids = frame[PARTITION_ID].to_numpy()
    periods = frame[PERIOD].to_numpy(dtype=np.int64)
    y = frame[cfg.data.target].to_numpy(dtype=np.float64)
    cov = (frame[list(spec.covariates)].to_numpy(dtype=np.float64) if spec.covariates
           else np.empty((len(frame), 0), dtype=np.float64))
    filled = (frame[FILLED].to_numpy(dtype=bool) if FILLED in frame.columns
              else np.zeros(len(frame), dtype=bool))
    bounds = partition_bounds(pids)
    _check_sorted(periods, bounds, pids)
    starts = bounds[:-1]
    trend_origin = periods[starts] if len(starts) else np.empty(0, dtype=np.int64)
    log_cov = covariate_log_flags(cov, bounds)
    X = compute_features(spec, bounds, periods, y, cov, trend_origin, log_cov)
    return FeatureFrame(X=X, spec=spec, y=y, periods=periods, filled=filled, bounds=bounds,
                        partition_ids=pids[starts] if len(starts) else pids[:0],
                        trend_origin=trend_origin, log_covariates=log_cov)


def partition_bounds(pids: np.ndarray) -> np.ndarray:
    """Row boundaries of runs of equal partition ids: partition g owns rows b[g]:b[g+1]."""
    n = len(pids)
    if n == 0:
        return np.zeros(1, dtype=np.intp)
    change = np.flatnonzero(pids[1:] != pids[:-1]) + 1
    return np.concatenate(([0], change, [n])).astype(np.intp)


def _check_sorted(periods: np.ndarray, bounds: np.ndarray, pids: np.ndarray) -> None:
    n_runs = len(bounds) - 1
    if n_runs and len(pd.unique(pids[bounds[:-1]])) != n_runs:
        raise ValueError("build_features: rows must be sorted by partition_id "
                         "(a partition appears in two runs)")
    step = np.diff(periods)
    inside = np.ones(len(step), dtype=bool)
    inside[bounds[1:-1] - 1] = False  # the step across a partition boundary may go down
    if (step[inside] <= 0).any():
        bad = int(np.flatnonzero(inside & (step <= 0))[0]) + 1
        raise ValueError(f"build_features: periods must be strictly increasing within a partition "
                         f"(row {bad}, partition {pids[bad]}, period {periods[bad]})")


def covariate_log_flags(cov: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per partition and covariate: use log(x)? Yes when every value is > 0 and it is not a 0/1 flag."""
    n_parts, n_cov = len(bounds) - 1, cov.shape[1]
    if n_parts == 0 or n_cov == 0:
        return np.zeros((n_parts, n_cov), dtype=bool)
    starts = bounds[:-1]
    nan_to_pos = np.where(np.isnan(cov), np.inf, cov)
    positive = np.minimum.reduceat(nan_to_pos, starts, axis=0) > 0
    not_flag = np.add.reduceat(~np.isnan(cov) & (cov != 0) & (cov != 1), starts, axis=0) > 0
    return positive & not_flag


def compute_features(spec: FeatureSpec, bounds: np.ndarray, periods: np.ndarray, y: np.ndarray,
                     cov: np.ndarray, trend_origin: np.ndarray, log_cov: np.ndarray,
                     rows: slice | None = None) -> np.ndarray:
    """The feature matrix of sorted rows of one or many partitions (the single code path).

    ``rows``: only these rows' features (every row's target is still history they may read): a
    recursive forecast needs one block's rows at a time, not the whole history's again.
    """
    n = len(periods)
    if n == 0:
        return np.empty((0, len(spec.names)), dtype=np.float64)
    lengths = np.diff(bounds)
    part = np.repeat(np.arange(len(lengths)), lengths)
    first = periods[bounds[:-1]]
    span = periods[bounds[1:] - 1] - first + 1
    pad = spec.lookback
    base = np.concatenate(([0], np.cumsum(span + pad)[:-1])) + pad  # dense position of each first period
    pos = base[part] + (periods - first[part])
    dense = np.full(int(base[-1] + span[-1]), np.nan)
    dense[pos] = y
    if rows is not None:
        pos, part, periods, cov = pos[rows], part[rows], periods[rows], cov[rows]
    X = np.empty((len(pos), len(spec.names)), dtype=np.float64)

    col = 0
    for k in spec.lags:
        X[:, col] = dense[pos - k]
        col += 1
    present = ~np.isnan(dense)
    csum = np.concatenate(([0.0], np.cumsum(np.where(present, dense, 0.0))))
    ccnt = np.concatenate(([0], np.cumsum(present)))
    end = pos - spec.horizon + 1  # csum[end] sums cells up to pos - h
    for w in spec.windows:
        total = csum[end] - csum[end - w]
        count = ccnt[end] - ccnt[end - w]
        with np.errstate(invalid="ignore", divide="ignore"):
            X[:, col] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        col += 1
    col = write_calendar(X, col, spec, periods)
    if cov.shape[1]:
        use_log = log_cov[part]
        with np.errstate(invalid="ignore", divide="ignore"):
            logged = np.log(np.where(cov > 0, cov, np.nan))
        X[:, col:col + cov.shape[1]] = np.where(use_log, logged, cov)
        col += cov.shape[1]
    X[:, col] = (periods - trend_origin[part]).astype(np.float64)
    return X


def write_calendar(X: np.ndarray, col: int, spec: FeatureSpec, periods: np.ndarray) -> int:
    """Write the Fourier terms of the season (and of the longer cycle) of ``periods`` into ``X``
    from column ``col``; returns the next free column. Shared by the batch and the step-by-step
    features (:mod:`shared.models.global_ar`)."""
    phase = 2.0 * np.pi * np.mod(periods, max(spec.season_length, 1)) / max(spec.season_length, 1)
    for j in spec._fourier_orders():
        if 2 * j != spec.season_length:
            X[:, col] = np.sin(j * phase)
            col += 1
        X[:, col] = np.cos(j * phase)
        col += 1
    if spec.yearly_terms:
        year_phase = 2.0 * np.pi * periods / spec.year_length
        for j in range(1, spec.yearly_terms + 1):
            X[:, col] = np.sin(j * year_phase)
            X[:, col + 1] = np.cos(j * year_phase)
            col += 2
    return col


def series_features(spec: FeatureSpec, periods: np.ndarray, y: np.ndarray, cov: np.ndarray,
                    trend_origin: int, log_cov: Sequence[bool], rows: slice | None = None) -> np.ndarray:
    """Features of one series (a bundle's history tail plus future rows): same code as the batch.
    ``rows``: only these rows' (see :func:`compute_features`)."""
    periods = np.asarray(periods, dtype=np.int64)
    bounds = np.array([0, len(periods)], dtype=np.intp)
    return compute_features(spec, bounds, periods, np.asarray(y, dtype=np.float64),
                            np.asarray(cov, dtype=np.float64).reshape(len(periods), len(spec.covariates)),
                            np.array([trend_origin], dtype=np.int64),
                            np.asarray(log_cov, dtype=bool).reshape(1, len(spec.covariates)), rows=rows)


def pandas_partition_features(part: pd.DataFrame, cfg: Any) -> pd.DataFrame:
    """One partition's features the obvious way: a pandas frame reindexed to its period grid.

    Not used by training (``build_features`` does the same for a whole batch in numpy, 20x+
    cheaper): it is the correctness reference in the tests and the per-partition preparation
    a user would write, which ``benchmarks/engine_overhead.py`` times for the joblib peer.
    """
    spec = FeatureSpec.from_config(cfg)
    h, s = spec.horizon, spec.season_length
    series = part.set_index(PERIOD)[cfg.data.target]
    grid = series.reindex(pd.RangeIndex(series.index.min(), series.index.max() + 1))
    out = pd.DataFrame(index=part[PERIOD].to_numpy())
    for k in spec.lags:
        out[f"lag_{k}"] = grid.shift(k).reindex(out.index).to_numpy()
    for w in spec.windows:
        out[f"roll_{w}"] = grid.shift(h).rolling(w, min_periods=1).mean().reindex(out.index).to_numpy()
    pos = np.mod(out.index.to_numpy(), s)
    for j in range(1, spec.fourier_terms + 1):
        if 2 * j != s:
            out[f"sin_{j}"] = np.sin(2 * np.pi * j * pos / s)
        out[f"cos_{j}"] = np.cos(2 * np.pi * j * pos / s)
    for j in range(1, spec.yearly_terms + 1):
        out[f"ysin_{j}"] = np.sin(2 * np.pi * j * out.index.to_numpy() / spec.year_length)
        out[f"ycos_{j}"] = np.cos(2 * np.pi * j * out.index.to_numpy() / spec.year_length)
    for c in spec.covariates:
        x = part[c].to_numpy(dtype=float)
        use_log = (x > 0).all() and not np.isin(x, [0.0, 1.0]).all()
        out[f"cov_{c}"] = np.log(x) if use_log else x
    out["trend"] = (out.index - series.index.min()).to_numpy(dtype=float)
    return out
