"""The repairs validation applies by policy (``[validation]``), vectorised over the sorted frame:
null and negative targets, duplicate (partition, period) rows, null covariates, gaps in a series.

Each counts what it did in the :class:`~shared.data.validation_report.ValidationReport` (with example
rows) or, when its policy is ``error``, raises :class:`~shared.data.validation_report.DataValidationError`.
:func:`shared.data.validation.validate` calls them in its order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from shared.config import DataSpec
from shared.keys import PARTITION_ID
from shared.data.timegrid import PERIOD, from_periods, period_freq
from shared.data.validation_report import (
    MAX_EXAMPLES,
    DataValidationError,
    PartContext,
    ValidationReport,
    example_rows,
)

FILLED = "_filled"
# Filling gaps may multiply the rows, but not without bound: a grid more than GRID_FACTOR times
# the observed rows (and beyond GRID_SLACK rows) means sparse periods or a wrong frequency.
GRID_FACTOR = 20
GRID_SLACK = 2_000_000


def _target_policies(
    target: np.ndarray,
    positions: np.ndarray,
    source: pd.DataFrame,
    name: str,
    policy: Any,
    report: ValidationReport,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Null and negative targets by policy; returns the target and a row mask (None: keep all)."""
    keep = np.ones(len(target), dtype=bool)
    null = np.isnan(target)
    if null.any():
        examples = example_rows(source, positions[null])
        if policy.null_target == "error":
            raise DataValidationError(
                name, "target is null (validation.null_target=error)", examples, int(null.sum())
            )
        if policy.null_target == "zero":
            target = np.where(null, 0.0, target)
            report.add("zeroed_null_target", int(null.sum()), examples)
        else:
            keep &= ~null
            report.add("dropped_null_target", int(null.sum()), examples)
    negative = keep & (target < 0)
    if negative.any():
        examples = example_rows(source, positions[negative])
        n = int(negative.sum())
        if policy.negative_target == "error":
            raise DataValidationError(
                name, "target is negative (validation.negative_target=error)", examples, n
            )
        if policy.negative_target == "clip":
            target = np.where(negative, 0.0, target)
            report.add("clipped_negative_target", n, examples)
        elif policy.negative_target == "drop":
            keep &= ~negative
            report.add("dropped_negative_target", n, examples)
        else:
            report.add("kept_negative_target", n, examples)
    return target, (None if keep.all() else keep)



def _duplicates(
    codes: np.ndarray,
    periods: np.ndarray,
    target: np.ndarray,
    rows: np.ndarray,
    source: pd.DataFrame,
    spec: DataSpec,
    policy: str,
    report: ValidationReport,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows sharing (partition, period), adjacent after the sort: (rows to keep, rows that absorbed others).

    ``sum`` adds the targets into the run's last row (whose covariates are kept); ``last`` keeps
    the last row in input order (the sort is stable).
    """
    same = (codes[1:] == codes[:-1]) & (periods[1:] == periods[:-1])
    if not same.any():
        return None
    has_next = np.r_[same, False]
    has_prev = np.r_[False, same]
    involved = has_next | has_prev
    examples = example_rows(source, rows[involved])
    merged = int(has_next.sum())
    if policy == "error":
        raise DataValidationError(
            spec.time,
            f"duplicate rows for the same partition ({', '.join(spec.keys)}) and period "
            f"(freq={spec.freq!r}) (validation.duplicates=error)",
            examples,
            int(involved.sum()),
        )
    if policy == "sum":
        run_starts = np.flatnonzero(~has_prev)
        with np.errstate(over="ignore"):
            sums = np.add.reduceat(target, run_starts)
        _refuse_infinite_sums(sums, run_starts, has_prev, periods, rows, source, spec)
        target[~has_next] = sums
    report.add("merged_duplicates", merged, examples)
    return ~has_next, has_prev & ~has_next


def _refuse_infinite_sums(
    sums: np.ndarray,
    run_starts: np.ndarray,
    has_prev: np.ndarray,
    periods: np.ndarray,
    rows: np.ndarray,
    source: pd.DataFrame,
    spec: DataSpec,
) -> None:
    """Finite targets that sum past the float range are refused, naming the partition and the
    period: the infinity check ran before the repair, and an infinite target would fail the
    partition later, in training, with no forecast."""
    infinite = np.flatnonzero(np.isinf(sums))
    if not len(infinite):
        return
    first = int(run_starts[infinite[0]])
    run_of_row = np.cumsum(~has_prev) - 1
    involved = np.isin(run_of_row, infinite)
    where = ", ".join(f"{k}={source.at[rows[first], k]}" for k in spec.keys)
    ordinal = int(periods[first])
    when = str(ordinal if spec.freq == "int" else pd.Period(ordinal=ordinal, freq=period_freq(spec.freq)))
    raise DataValidationError(
        spec.target,
        f"target is infinite after summing duplicate rows (validation.duplicates=sum): partition "
        f"{where}, period {when} (freq={spec.freq!r}){' and others' if len(infinite) > 1 else ''}; "
        "the values are too large to add: fix them, or set validation.duplicates to 'last' or 'error'",
        example_rows(source, rows[involved]),
        int(involved.sum()),
    )


def _null_covariate(
    values: np.ndarray,
    starts: np.ndarray,
    rows: np.ndarray,
    source: pd.DataFrame,
    name: str,
    policy: str,
    report: ValidationReport,
    part: PartContext | None = None,
) -> np.ndarray:
    """Fill null covariates: forward then backward within the partition (``ffill``), 0, or refuse.

    A partition with no value at all takes the column's median: of the whole input, which a
    ``part`` gets from ``part.covariate_medians`` (or says it needs through ``part.needs_median``).
    """
    null = np.isnan(values)
    if part is not None:
        part.non_null[name] = int((~null).sum())
    if not null.any():
        return values
    examples = example_rows(source, rows[null])
    if policy == "error":
        raise DataValidationError(
            name, "covariate is null (validation.null_covariates=error)", examples, int(null.sum())
        )
    if policy == "zero":
        report.add("zeroed_null_covariates", int(null.sum()), examples)
        return np.where(null, 0.0, values)
    if null.all():
        if part is None:
            raise DataValidationError(name, "covariate is null in every row", examples, int(null.sum()))
        part.all_null[name] = (int(null.sum()), examples)
    n = len(values)
    idx = np.arange(n)
    part_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    part_end = np.repeat(np.r_[starts[1:], n] - 1, np.diff(np.r_[starts, n]))
    prev_valid = np.maximum.accumulate(np.where(null, -1, idx))
    next_valid = np.minimum.accumulate(np.where(null, n, idx)[::-1])[::-1]
    use_prev = null & (prev_valid >= part_start)
    use_next = null & ~use_prev & (next_valid <= part_end)
    filled = values.copy()
    filled[use_prev] = values[prev_valid[use_prev]]
    filled[use_next] = values[next_valid[use_next]]
    report.add("filled_null_covariates", int(use_prev.sum() + use_next.sum()), examples)
    rest = np.isnan(filled)
    if rest.any():
        if part is None:
            filled[rest] = np.nanmedian(values)
        else:  # NaN until the caller knows the whole input's median
            filled[rest] = part.covariate_medians.get(name, np.nan)
            part.needs_median.add(name)
        report.add("median_filled_null_covariates", int(rest.sum()), example_rows(source, rows[rest]))
    return filled


def _series_spans(out: pd.DataFrame, starts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per series (rows from each start): its row count, first and last period, and grid span."""
    n = len(out)
    periods = out[PERIOD].to_numpy()
    counts = np.diff(np.r_[starts, n])
    ends = np.r_[starts[1:], n] - 1
    first, last = periods[starts], periods[ends]
    return counts, first, last, last - first + 1


def _check_grid(out: pd.DataFrame, starts: np.ndarray, spec: DataSpec) -> None:
    """Refuse a grid far larger than the rows (sparse periods: a wrong freq or a garbled time)."""
    n = len(out)
    counts, first, last, span = _series_spans(out, starts)
    grid_rows = float(span.astype("float64").sum())
    if grid_rows > max(GRID_FACTOR * n, n + GRID_SLACK):
        widest = int(np.argmax(span))
        shown = out.iloc[[starts[widest]]][[*spec.keys]].assign(
            first_period=int(first[widest]), last_period=int(last[widest]), observed_rows=int(counts[widest]))
        raise DataValidationError(
            spec.time,
            f"the periods are too sparse to fill the gaps: a complete grid would hold {grid_rows:.0f} rows "
            f"for {n} observed ({grid_rows / max(n, 1):.0f}x, freq={spec.freq!r}); check the time column and "
            "data.freq, or set validation.gaps = 'keep'",
            shown,
        )


def _fill_gaps(
    out: pd.DataFrame,
    starts: np.ndarray,
    spec: DataSpec,
    policy: str,
    anchor: str | None,
    report: ValidationReport,
    part: PartContext | None = None,
    lost_nulls: set[str] | frozenset[str] = frozenset(),
) -> pd.DataFrame:
    """Put every series on a complete grid from its first to its last period (``zero``/``interpolate``).

    The grid is built with ``np.repeat``/``arange``; each grid slot takes its row from the last
    observed row at or before it, so keys and covariates of filled rows are forward-filled.

    ``auto`` (the default): a series that records zeros itself (a zero target observed) has its
    missing periods filled with zeros, as ``zero`` does (its source writes no row for a period
    without sales); any other series, and one that lost rows with a null target (``lost_nulls``,
    partition ids), keeps its gaps, as ``keep`` does: an absent row there is unknown, not a zero.
    """
    n = len(out)
    if n == 0:
        return out
    periods = out[PERIOD].to_numpy()
    counts, first, _, span = _series_spans(out, starts)
    missing = span - counts
    if policy == "auto":  # zeros only in a series that records zeros and lost no null target
        _check_grid(out, starts, spec)  # a sparse grid is a wrong freq or time, filled or not
        fill = np.add.reduceat((out[spec.target].to_numpy() == 0).astype(np.int64), starts) > 0
        if lost_nulls:
            fill &= ~np.isin(out[PARTITION_ID].to_numpy()[starts], list(lost_nulls))
        policy = "zero"
    else:
        fill = np.full(len(starts), policy != "keep")
    kept = np.flatnonzero(~fill & (missing > 0))
    if len(kept):
        report.add("kept_gaps", int(missing[kept].sum()), out.iloc[starts[kept[:MAX_EXAMPLES]]][[*spec.keys]].assign(
            missing_periods=missing[kept[:MAX_EXAMPLES]]))
    if not (fill & (missing > 0)).any():
        return out
    _check_grid(out, starts, spec)
    if part is not None:
        part.used_anchor = True
    # a series that keeps its gaps keeps exactly its rows: its grid is its own periods
    slots = np.where(fill, span, counts)
    total = int(slots.sum())
    grid_start = np.r_[0, np.cumsum(slots)[:-1]]
    group_of_slot = np.repeat(np.arange(len(starts)), slots)
    offset = np.arange(total) - grid_start[group_of_slot]
    own = periods[np.minimum(starts[group_of_slot] + offset, n - 1)]
    slot_period = np.where(fill[group_of_slot], first[group_of_slot] + offset, own)
    group_of_row = np.repeat(np.arange(len(starts)), counts)
    slot_of_row = grid_start[group_of_row] + np.where(fill[group_of_row], periods - first[group_of_row],
                                                      np.arange(n) - starts[group_of_row])
    row_of_slot = np.full(total, -1, dtype=np.int64)
    row_of_slot[slot_of_row] = np.arange(n)
    observed = row_of_slot >= 0
    source_row = np.maximum.accumulate(row_of_slot)  # each series' first slot is observed

    grid = out.iloc[source_row].reset_index(drop=True)
    grid[PERIOD] = slot_period
    grid[FILLED] = ~observed
    target = out[spec.target].to_numpy()
    if policy == "interpolate":
        grid[spec.target] = np.interp(np.arange(total), slot_of_row, target)
    else:
        grid[spec.target] = np.where(observed, target[source_row], 0.0)
    filled_times = from_periods(slot_period[~observed], spec.freq, anchor).to_numpy()
    times = grid[spec.time].to_numpy().copy()
    times[~observed] = filled_times.astype(times.dtype)
    grid[spec.time] = times
    report.add("filled_gaps", int((~observed).sum()), grid.loc[~observed, [*spec.keys, spec.time]])
    return grid
