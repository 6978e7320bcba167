"""What a partition's model says about its covariates: price elasticity and promotion lift.

Retail users act on two numbers per series: how demand answers a price change, and what a
promotion adds. Any model that reads covariates knows them implicitly; we ask it, the same way for
every model kind: forecast the next horizon with the covariates at their last values, then with
one covariate moved, and compare the totals.

* a strictly positive covariate that is not a 0/1 flag (a price) gets an **elasticity**: the change
  of log total forecast per change of log covariate, from +/- 5 % (an arc elasticity);
* a 0/1 flag (promotion, display, holiday) gets a **lift**: total forecast with the flag on over
  the total with it off, minus one.

A model that ignores a covariate (naive, theta, the baseline...) moves nothing: no row, rather than
a zero that would read as "no effect was found".
"""
from __future__ import annotations

from typing import Any

import numpy as np

STEP = 0.05  # +/- 5 % for elasticities: far enough to move trees, near enough to stay local
_MOVED = 1e-9  # relative change below which the model did not react


def covariate_effects(bundle: Any) -> list[dict[str, Any]]:
    """``[{covariate, measure, value}]`` of the bundle's model over its horizon; [] when it has none."""
    names = tuple(getattr(bundle, "covariates", ()) or ())
    history = np.asarray(getattr(bundle, "history_covariates", np.empty((0, 0))), dtype=np.float64)
    if not names or history.ndim != 2 or history.shape[0] == 0 or history.shape[1] != len(names):
        return []
    periods = bundle.future_periods(None, None)
    base = np.repeat(_last_values(history)[None, :], len(periods), axis=0)
    out = []
    for j, name in enumerate(names):
        seen = history[:, j][np.isfinite(history[:, j])]
        if not len(seen):
            continue
        if np.isin(seen, (0.0, 1.0)).all():
            low, high = _totals(bundle, periods, base, j, 0.0, 1.0)
            if low > 0 and abs(high - low) > _MOVED * low:
                out.append({"covariate": name, "measure": "lift", "value": float(high / low - 1.0)})
        elif (seen > 0).all() and base[0, j] > 0:
            level = base[0, j]
            low, high = _totals(bundle, periods, base, j, level * (1 - STEP), level * (1 + STEP))
            if low > 0 and high > 0 and abs(high - low) > _MOVED * low:
                value = (np.log(high) - np.log(low)) / (np.log1p(STEP) - np.log1p(-STEP))
                out.append({"covariate": name, "measure": "elasticity", "value": float(value)})
    return out


def _last_values(history: np.ndarray) -> np.ndarray:
    """Each covariate's last observed value (a NaN tail carries the value before it)."""
    out = np.full(history.shape[1], np.nan)
    for j in range(history.shape[1]):
        seen = history[:, j][np.isfinite(history[:, j])]
        if len(seen):
            out[j] = seen[-1]
    return out


def _totals(bundle: Any, periods: np.ndarray, base: np.ndarray, j: int, low: float,
            high: float) -> tuple[float, float]:
    totals = []
    for value in (low, high):
        cov = base.copy()
        cov[:, j] = value
        _, pred = bundle.predict_arrays(periods, cov)
        totals.append(float(np.sum(pred)))
    return totals[0], totals[1]
