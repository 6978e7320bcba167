"""Time as integer periods: every series lives on a regular grid of its frequency.

Dates map to pandas period ordinals (``freq="W"`` -> weeks ending Sunday); integer periods
(``freq="int"``) are used as they are. Lags and horizons are then plain integer offsets, and
future times are rebuilt from ordinals plus the dataset's anchor (where in its period a time
stamp sits, e.g. Sundays for weekly data), so predictions line up with the input's time stamps.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

PERIOD = "_period"


def period_freq(freq: str) -> str:
    """The Period frequency for an offset alias (month-end and month-start both map to months)."""
    freq = {"H": "h", "T": "min", "S": "s", "A": "Y"}.get(freq, freq)
    base = freq.upper()
    for alias, period in (("MS", "M"), ("ME", "M"), ("QS", "Q"), ("QE", "Q"), ("YS", "Y"), ("YE", "Y"), ("AS", "Y")):
        if base.startswith(alias):
            return period + freq[len(alias):]
    return freq


def to_periods(times: pd.Series, freq: str) -> np.ndarray:
    if freq == "int":
        return times.to_numpy(dtype="int64")
    return times.dt.to_period(period_freq(freq)).array.asi8.astype("int64")


def anchor_offset(times: pd.Series, freq: str) -> str | None:
    """Where time stamps sit inside their period, as 'start:<seconds>' or 'end:<seconds>'.

    Month-end dates are anchored to the period end (months differ in length); other stamps to
    the most common offset from the period start (Sundays in weekly data, say).
    """
    if freq == "int" or times.empty:
        return None
    periods = times.dt.to_period(period_freq(freq))
    from_start = (times - periods.dt.start_time).mode().iloc[0]
    to_end = (periods.dt.end_time.dt.normalize() - times).mode().iloc[0]
    if to_end == pd.Timedelta(0) and from_start != pd.Timedelta(0) and period_freq(freq)[0] in "MQY":
        return "end:0"
    return f"start:{int(from_start.total_seconds())}"


def partition_anchors(times: pd.Series, bounds: np.ndarray, freq: str,
                      observed: np.ndarray | None = None) -> list[str | None]:
    """:func:`anchor_offset` of each partition (rows ``bounds[g]:bounds[g+1]``), from its observed
    rows: one panel may hold weekly series dated on Fridays and others on Wednesdays, and each
    series' forecasts are dated as its own history is. Vectorised but for a ``np.unique`` a partition."""
    n = len(bounds) - 1
    if freq == "int" or n <= 0 or not pd.api.types.is_datetime64_any_dtype(times):
        return [None] * max(n, 0)
    pf = period_freq(freq)
    periods = times.dt.to_period(pf)
    from_start = (times - periods.dt.start_time).dt.total_seconds().to_numpy()
    to_end = (periods.dt.end_time.dt.normalize() - times).dt.total_seconds().to_numpy()
    keep = np.ones(len(times), dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    month_like = pf[0] in "MQY"
    out: list[str | None] = []
    for g in range(n):
        rows = slice(int(bounds[g]), int(bounds[g + 1]))
        seg = from_start[rows][keep[rows]]
        if not len(seg):
            out.append(None)
            continue
        start = _mode(seg)
        if month_like and start != 0 and _mode(to_end[rows][keep[rows]]) == 0:
            out.append("end:0")
        else:
            out.append(f"start:{int(start)}")
    return out


def _mode(values: np.ndarray) -> float:
    found, counts = np.unique(values, return_counts=True)  # sorted: ties go to the smallest, as pandas' mode
    return float(found[int(np.argmax(counts))])


def from_periods(periods: np.ndarray, freq: str, anchor: str | None) -> pd.Series:
    periods = np.asarray(periods, dtype="int64")
    if freq == "int":
        return pd.Series(periods)
    index = pd.PeriodIndex.from_ordinals(periods, freq=period_freq(freq))
    kind, _, seconds = (anchor or "start:0").partition(":")
    if kind == "end":
        return pd.Series(index.end_time.normalize() - pd.Timedelta(seconds=int(seconds or 0)))
    return pd.Series(index.start_time + pd.Timedelta(seconds=int(seconds or 0)))


def sub_daily(freq: str) -> bool:
    """Whether periods are shorter than a day (hours, minutes...): such data lives on the UTC clock
    when its times carry offsets (see :func:`shared.data.validation.parse_time`)."""
    if freq == "int":
        return False
    period = pd.Period("2000-01-03", freq=period_freq(freq))
    return (period + 1).start_time - period.start_time < pd.Timedelta(days=1)
