"""Forecast accuracy metrics: one definition shared by selection, backtests, promotion and reports.

* ``wape`` = sum |error| / sum |actual| — the retail headline metric, robust to zeros.
* ``mape`` = mean |error| / |actual| over the rows whose actual is non-zero (a zero actual has no
  percentage error); NaN when every actual is zero.
* ``rmse`` = root mean squared error, in target units.
* ``accuracy`` = 1 - WAPE clipped to [0, 1]: forecast accuracy as retail means it (volume-weighted,
  defined with zeros and small counts); the default promotion metric. NaN when WAPE is NaN.
* ``mape_accuracy`` = 1 - MAPE clipped to [0, 1] (the reference architecture's literal rule; on
  small counts a few near-zero actuals make it collapse, so it is opt-in).

Stored records from releases where ``accuracy`` meant 1 - MAPE are read through
:func:`metric_value`, which derives both accuracies from the stored WAPE and MAPE.

Rows where the actual or the prediction is NaN are ignored. All lower-is-better except accuracy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from shared.models.metric_names import ACCURACY_OF_ERROR, METRICS, lower_is_better  # names and directions


def evaluate(actual: Sequence[float] | np.ndarray,
             predicted: Sequence[float] | np.ndarray) -> dict[str, float]:
    """The four metrics of one series (or any set of rows) as plain floats (NaN when undefined)."""
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if a.shape != p.shape:
        raise ValueError(f"evaluate: actual has shape {a.shape} but predicted has shape {p.shape}")
    ok = ~(np.isnan(a) | np.isnan(p))
    if not ok.all():
        a, p = a[ok], p[ok]
    if a.size == 0:
        return dict.fromkeys(METRICS, float("nan"))
    err = np.abs(a - p)
    abs_a = np.abs(a)
    total = abs_a.sum()
    wape = float(err.sum() / total) if total > 0 else float("nan")
    nz = abs_a > 0
    mape = float((err[nz] / abs_a[nz]).mean()) if nz.any() else float("nan")
    rmse = float(np.sqrt(np.mean((a - p) ** 2)))
    return {"wape": wape, "mape": mape, "rmse": rmse, "accuracy": accuracy_from_error(wape),
            "mape_accuracy": accuracy_from_error(mape)}


OUTLIER_SCALE = 10.0  # a point beyond this many times the series' typical level counts as an outlier


def typical_level(values: np.ndarray) -> float:
    """A scale of a series that one wild value cannot move: the median of its non-zero |values|
    (1.0 for a series of zeros)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size else 1.0


def robust_wape(actual: Sequence[float] | np.ndarray, predicted: Sequence[float] | np.ndarray,
                level: float | None = None) -> float:
    """WAPE with every point's |actual| and |error| capped at ``OUTLIER_SCALE`` x the typical level.

    Why: one recorded 1e15 in a series of level 60 makes the plain WAPE of every forecast equal
    (the outlier's error swamps the sum), so "beats its baseline" and the choice between candidates
    became coin flips decided by the outlier; and a forecast of 1e11 costs no more than the cap per
    point, so it loses plainly to one that stays near the data. On data without outliers the caps do
    not bind and this is the WAPE. ``level``: the typical level to cap at (default: of ``actual``).
    """
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    ok = ~(np.isnan(a) | np.isnan(p))
    if not ok.any():
        return float("nan")
    error, total = capped_sums(a[ok], p[ok], level)
    return error / total if total > 0 else float("nan")


def capped_sums(actual: np.ndarray, predicted: np.ndarray, level: float | None = None) -> tuple[float, float]:
    """Sum of |error| and sum of |actual|, each point capped at ``OUTLIER_SCALE`` x the typical
    level (of ``actual`` unless given): the two halves of :func:`robust_wape`, which the batch's
    pooled comparison adds up over partitions."""
    cap = OUTLIER_SCALE * (typical_level(actual) if level is None else float(level))
    return (float(np.minimum(np.abs(actual - predicted), cap).sum()),
            float(np.minimum(np.abs(actual), cap).sum()))


CEILING_FACTOR = float(np.e)  # forecasts stop at e times the largest plausible value of the history
RECENT = 13  # the recent level is read over this many last observations


def forecast_ceiling(history: np.ndarray) -> float:
    """The largest forecast a history makes plausible: e x its largest value that is not an outlier.

    An outlier is a value beyond ``OUTLIER_SCALE`` x the typical level, the larger of the whole
    history's and the last ``RECENT`` observations' (so a series that grew tenfold keeps its
    growth). Inf for a history with nothing observed (nothing to bound by)."""
    h = np.asarray(history, dtype=np.float64)
    h = h[np.isfinite(h)]
    if h.size == 0:
        return float("inf")
    level = max(typical_level(h), typical_level(h[-RECENT:]))
    plausible = h[np.abs(h) <= OUTLIER_SCALE * level]
    top = float(plausible.max()) if plausible.size else level
    return CEILING_FACTOR * max(top, level)


def accuracy_from_error(error: float) -> float:
    """1 - a relative error, clipped to [0, 1]; NaN stays NaN."""
    return float("nan") if np.isnan(error) else float(min(1.0, max(0.0, 1.0 - error)))


def accuracy_from_mape(mape: float) -> float:
    return accuracy_from_error(mape)


def metric_value(metrics: dict, name: str) -> float | None:
    """A metric of a stored record: None when absent, NaN when undefined.

    The accuracies are derived from the stored error (``accuracy`` from ``wape``,
    ``mape_accuracy`` from ``mape``) whenever it is there, so records written when ``accuracy``
    meant 1 - MAPE compare on the same scale as new ones.
    """
    source = ACCURACY_OF_ERROR.get(name)
    if source is not None and source in metrics:
        error = _as_float(metrics[source])
        return accuracy_from_error(error)
    if name not in metrics:
        return None
    return _as_float(metrics[name])


def _as_float(value: object) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def evaluate_grouped(groups: Sequence | np.ndarray, actual: Sequence[float] | np.ndarray,
                     predicted: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """The same metrics for many series at once (one row per group, indexed by group).

    Vectorised with ``np.bincount`` so scoring 10,000 backtests costs one pass, not 10,000 calls.
    """
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(groups), sort=True)
    if not (a.shape == p.shape == codes.shape):
        raise ValueError("evaluate_grouped: groups, actual and predicted must have the same length")
    ok = ~(np.isnan(a) | np.isnan(p))
    a, p, codes = np.where(ok, a, 0.0), np.where(ok, p, 0.0), np.where(ok, codes, -1)
    n_groups = len(uniques)
    keep = codes >= 0
    c = codes[keep]
    err, abs_a = np.abs(a - p)[keep], np.abs(a)[keep]
    sq = ((a - p) ** 2)[keep]
    nz = abs_a > 0
    count = np.bincount(c, minlength=n_groups).astype(np.float64)
    sum_err = np.bincount(c, weights=err, minlength=n_groups)
    sum_abs = np.bincount(c, weights=abs_a, minlength=n_groups)
    sum_sq = np.bincount(c, weights=sq, minlength=n_groups)
    ape = np.divide(err, abs_a, out=np.zeros_like(err), where=nz)
    n_nz = np.bincount(c, weights=nz.astype(np.float64), minlength=n_groups)
    sum_ape = np.bincount(c, weights=ape, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        wape = np.where(sum_abs > 0, sum_err / sum_abs, np.nan)
        mape = np.where(n_nz > 0, sum_ape / n_nz, np.nan)
        rmse = np.where(count > 0, np.sqrt(sum_sq / count), np.nan)
    accuracy = np.where(np.isnan(wape), np.nan, np.clip(1.0 - wape, 0.0, 1.0))
    mape_accuracy = np.where(np.isnan(mape), np.nan, np.clip(1.0 - mape, 0.0, 1.0))
    return pd.DataFrame({"wape": wape, "mape": mape, "rmse": rmse, "accuracy": accuracy,
                         "mape_accuracy": mape_accuracy},
                        index=pd.Index(uniques, name="group"))


def selection_key(score: float, metric: str) -> float:
    """A sort key where smaller is better whatever the metric; NaN sorts last."""
    if np.isnan(score):
        return float("inf")
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; one of {list(METRICS)}")
    return score if lower_is_better(metric) else -score
