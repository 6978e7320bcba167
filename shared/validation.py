"""The data contract: turn a raw long frame into the validated frame, or refuse it with a clear reason.

Fatal problems (empty input, missing columns, unparseable time/target/covariates, null keys, and
any policy set to ``error``) raise :class:`DataValidationError`, whose message names the column,
the rule and up to five example rows as read. Everything else is repaired by the configured
policy and counted in the :class:`ValidationReport`: nothing is dropped silently.

The work is vectorised over the whole frame (group codes, ``np.lexsort``, accumulate tricks, a
complete period grid built with ``np.repeat``/``arange``), never one pandas frame per partition,
so millions of rows validate in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api import types as ptypes

from shared.config import DataSpec, ProjectConfig
from shared.errors import ManyModelsError
from shared.keys import PARTITION_ID, partition_ids
from shared.timegrid import PERIOD, anchor_offset, from_periods, period_freq, to_periods

FILLED = "_filled"
MAX_EXAMPLES = 5
# Dates must fit pandas' nanosecond range (1677-09-21 .. 2262-04-11) with room for a forecast
# horizon on either side; integer periods must be exact in float64 and leave room for arithmetic.
DATE_MIN = pd.Timestamp("1678-01-01")
DATE_MAX = pd.Timestamp("2261-12-31")
INT_PERIOD_LIMIT = 10**15
# Filling gaps may multiply the rows, but not without bound: a grid more than GRID_FACTOR times
# the observed rows (and beyond GRID_SLACK rows) means sparse periods or a wrong frequency.
GRID_FACTOR = 20
GRID_SLACK = 2_000_000
# A warning, not an error: this share of the input merged as duplicates suggests a wrong freq.
MERGED_WARNING_SHARE = 0.10


class _Unset:
    """A global fact a part of the input leaves to be computed from the part itself."""

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:  # pickled by reference: still ``is UNSET`` in a worker process
        return "UNSET"


UNSET: Any = _Unset()

REASONS = {
    "dropped_null_keys": "rows dropped: a partition key was null",
    "dropped_null_target": "rows dropped: the target was null",
    "zeroed_null_target": "rows repaired: a null target set to 0",
    "clipped_negative_target": "rows repaired: a negative target clipped to 0",
    "dropped_negative_target": "rows dropped: the target was negative",
    "kept_negative_target": "rows kept with a negative target (policy keep)",
    "merged_duplicates": "rows merged into another row of the same partition and period",
    "filled_null_covariates": "covariate values filled from the same partition's neighbours",
    "median_filled_null_covariates": "covariate values set to the column median (null in a whole partition)",
    "zeroed_null_covariates": "covariate values set to 0",
    "filled_gaps": "rows added for missing periods inside a series",
    "kept_gaps": "missing periods inside a series left as gaps (policy keep)",
}


@dataclass
class PartContext:
    """Validating one part of a larger input (:mod:`shared.streaming`): what the part cannot see.

    Inputs are facts about the whole input, decided outside (``UNSET``: compute from the part as
    :func:`validate` does). Outputs are what the part observed, for the global checks that
    :func:`validate` makes over the whole frame: the anchor's statistics, whether the anchor or a
    covariate median was used, covariates null in the whole part, and the stage of each reason.
    The part's frame is indexed by input row positions.
    """

    anchor: Any = UNSET
    first_time: Any = UNSET  # the input's first time value, quoted by "not a date"
    time_format: str | None = None  # strptime format guessed from the input's first time value
    time_utc: bool | None = None  # None: as validate (UTC only if offsets are mixed)
    covariate_medians: dict[str, float] = field(default_factory=dict)
    collect_covariates: bool = False
    # observations
    stage: tuple = ()
    reason_stage: dict[str, tuple] = field(default_factory=dict)
    anchor_counts: Any = None
    used_anchor: bool = False
    tz_kinds: set = field(default_factory=set)
    needs_median: set = field(default_factory=set)
    non_null: dict[str, int] = field(default_factory=dict)
    all_null: dict[str, Any] = field(default_factory=dict)  # covariate -> (null rows, examples)
    covariate_values: dict[str, np.ndarray] = field(default_factory=dict)

    def enter(self, stage: tuple, report: "ValidationReport") -> None:
        """Start a stage; reasons that appeared since the last call belong to the previous one."""
        for reason in report.counts:
            self.reason_stage.setdefault(reason, self.stage)
        self.stage = stage


class DataValidationError(ManyModelsError, ValueError):
    """The input breaks the data contract; ``column``, ``rule`` and ``examples`` say where and how."""

    def __init__(
        self,
        column: str | list[str] | None,
        rule: str,
        examples: pd.DataFrame | None = None,
        rows: int | None = None,
    ) -> None:
        self.column = column
        self.rule = rule
        self.examples = examples if examples is not None else pd.DataFrame()
        self.rows = rows
        where = (
            f"column {column!r}: " if isinstance(column, str) else (f"columns {column}: " if column else "")
        )
        message = f"{where}{rule}"
        if rows is not None:
            message += f" ({rows} row{'s' if rows != 1 else ''})"
        if len(self.examples):
            shown = self.examples.head(MAX_EXAMPLES)
            message += f"\nexamples (row = position in the input):\n{shown.to_string()}"
        super().__init__(message)


@dataclass
class ValidationReport:
    """What validation did: row counts in and out, and a count (with examples) per repair reason."""

    input_rows: int = 0
    output_rows: int = 0
    partitions: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    policy: dict[str, str] = field(default_factory=dict)
    anchor: str | None = None

    def add(self, reason: str, n: int, examples: pd.DataFrame | None = None) -> None:
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + int(n)
        if examples is not None and reason not in self.examples:
            shown = examples.head(MAX_EXAMPLES).reset_index(drop=examples.index.name != "row")
            self.examples[reason] = json.loads(
                shown.to_json(orient="records", date_format="iso", default_handler=str)
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ValidationReport":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def repairs(self) -> dict[str, int]:
        """Rows dropped, repaired, merged or added, per kind (the reasons of REASONS)."""
        return {reason: int(n) for reason, n in self.counts.items() if n}

    def warnings(self, freq: str | None = None) -> list[str]:
        """Repairs so large that the configuration is likely wrong (the frequency, mostly)."""
        out = []
        freq_text = f" (freq={freq!r})" if freq else ""
        merged = int(self.counts.get("merged_duplicates", 0))
        if self.input_rows and merged >= MERGED_WARNING_SHARE * self.input_rows:
            out.append(f"{merged} of {self.input_rows} input rows were merged into another row of the "
                       f"same partition and period{freq_text}: if the data is finer than the "
                       "frequency, set data.freq (e.g. D); validation.duplicates chooses sum, last or error")
        filled = int(self.counts.get("filled_gaps", 0))
        if self.output_rows and filled > 0.5 * self.output_rows:
            out.append(f"{filled} of {self.output_rows} rows were added for missing periods{freq_text}: "
                       "if the data is coarser than the frequency, set data.freq; validation.gaps = "
                       "'keep' leaves gaps as they are")
        return out

    def summary_lines(self) -> list[str]:
        lines = [
            f"input rows: {self.input_rows}",
            f"output rows: {self.output_rows}",
            f"partitions: {self.partitions}",
        ]
        for reason, n in self.counts.items():
            lines.append(f"{reason}: {n} ({REASONS.get(reason, reason)})")
        if not self.counts:
            lines.append("no rows dropped or repaired")
        lines.extend(f"warning: {w}" for w in self.warnings())
        return lines


def validate(
    frame: pd.DataFrame, cfg: ProjectConfig, part: PartContext | None = None
) -> tuple[pd.DataFrame, ValidationReport]:
    """Check and repair ``frame`` by ``cfg.validation``; return the validated frame and the report.

    With ``part``, ``frame`` is one part of a larger input (whole partitions, indexed by input row
    positions, null keys already handled): the checks that need the whole input are left to the
    caller through ``part`` (see :class:`PartContext`), and a part may end up empty.
    """
    spec, policy = cfg.data, cfg.validation
    report = ValidationReport(input_rows=len(frame), policy=dataclasses.asdict(policy))
    if part is None and (frame.shape[1] == 0 or len(frame) == 0):
        raise DataValidationError(None, f"empty input: {len(frame)} rows, {frame.shape[1]} columns")
    _check_columns(frame, spec)
    # examples quote rows by their position in the input (a part's index already holds them)
    source = frame.reset_index(drop=True) if part is None else frame
    _check_nested(source, spec)
    work = source[[*spec.keys, spec.time, spec.target, *spec.covariates]]

    _enter(part, (0,), report)
    work = _null_keys(work, source, spec, policy.null_keys, report)
    _enter(part, (1, 0), report)
    times = parse_time(work[spec.time], source, spec, part=part)
    _enter(part, (1, 1), report)
    target = parse_numeric(work[spec.target], source, spec.target, "target")
    covs = {}
    for i, c in enumerate(spec.covariates):
        _enter(part, (1, 2, i), report)
        covs[c] = parse_numeric(work[c], source, c, "covariate")
    _enter(part, (1, 3), report)
    target, keep = _target_policies(target, work.index.to_numpy(), source, spec.target, policy, report)
    if keep is not None:
        work, times, target = work[keep], times[keep], target[keep]
        covs = {c: v[keep] for c, v in covs.items()}
    if len(work) == 0:
        if part is not None:  # whether the whole input is empty is the caller's check
            _enter(part, (9,), report)
            return pd.DataFrame(), report
        raise DataValidationError(None, f"no rows left after validation: {report.counts}")

    # partition codes (sorted by partition id) and periods; one stable sort puts rows in order
    codes, pids = _partition_codes(work, spec.keys)
    periods = to_periods(times, spec.freq)
    order = np.lexsort((periods, codes))
    rows = work.index.to_numpy()[order]  # input positions, for examples
    codes, periods = codes[order], periods[order]
    time_values = times.to_numpy()[order]
    target = target[order]
    covs = {c: v[order] for c, v in covs.items()}
    keys = work[spec.keys].take(order)

    if part is None or part.anchor is UNSET:
        anchor = anchor_offset(times, spec.freq)
    else:
        anchor = part.anchor
    if part is not None:
        part.anchor_counts = anchor_counts(times, spec.freq)
    _enter(part, (2,), report)
    merged = _duplicates(codes, periods, target, rows, source, spec, policy.duplicates, report)
    if merged is not None:
        keep_rows, absorbed = merged
        rows, codes, periods, time_values = (
            rows[keep_rows],
            codes[keep_rows],
            periods[keep_rows],
            time_values[keep_rows],
        )
        target = target[keep_rows]
        covs = {c: v[keep_rows] for c, v in covs.items()}
        keys = keys[keep_rows]
        # a merged row stands for its whole period: give it the period's usual time stamp
        absorbed = absorbed[keep_rows]
        if part is not None and absorbed.any():
            part.used_anchor = True
        time_values = time_values.copy()
        time_values[absorbed] = (
            from_periods(periods[absorbed], spec.freq, anchor).to_numpy().astype(time_values.dtype)
        )

    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    for i, name in enumerate(spec.covariates):
        _enter(part, (3, i), report)
        if part is not None and part.collect_covariates:
            part.covariate_values[name] = covs[name]
        covs[name] = _null_covariate(
            covs[name], starts, rows, source, name, policy.null_covariates, report, part
        )

    out = pd.DataFrame(
        {
            PARTITION_ID: pa.array(pids, type=pa.string()).take(pa.array(codes)).to_pandas(),
            **{k: keys[k].reset_index(drop=True) for k in spec.keys},
            spec.time: time_values,
            PERIOD: periods.astype("int64"),
            spec.target: target,
            **covs,
            FILLED: np.zeros(len(codes), dtype=bool),
        }
    )
    _enter(part, (4,), report)
    out = _fill_gaps(out, starts, spec, policy.gaps, anchor, report, part)
    _enter(part, (9,), report)

    report.output_rows = len(out)
    report.partitions = len(starts)
    report.anchor = anchor
    return out, report


def _enter(part: PartContext | None, stage: tuple, report: ValidationReport) -> None:
    if part is not None:
        part.enter(stage, report)


def anchor_counts(times: pd.Series, freq: str) -> tuple[pd.Series, pd.Series] | None:
    """What :func:`shared.timegrid.anchor_offset` takes the modes of, as value counts: parts of an
    input add theirs up and :func:`anchor_from_counts` gives the whole input's anchor."""
    if freq == "int" or times.empty:
        return None
    periods = times.dt.to_period(period_freq(freq))
    from_start = (times - periods.dt.start_time).value_counts()
    to_end = (periods.dt.end_time.dt.normalize() - times).value_counts()
    return from_start, to_end


def anchor_from_counts(counts: tuple[pd.Series, pd.Series] | None, freq: str) -> str | None:
    """``anchor_offset``'s rule over summed counts (a mode is the smallest of the most frequent)."""
    if counts is None:
        return None

    def mode(c: pd.Series) -> pd.Timedelta:
        return c[c == c.max()].index.min()

    from_start, to_end = mode(counts[0]), mode(counts[1])
    if to_end == pd.Timedelta(0) and from_start != pd.Timedelta(0) and period_freq(freq)[0] in "MQY":
        return "end:0"
    return f"start:{int(from_start.total_seconds())}"


# -- the checks, in the order validate applies them ------------------------------------------------


def _check_columns(frame: pd.DataFrame, spec: DataSpec) -> None:
    needed = [*spec.keys, spec.time, spec.target, *spec.covariates]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        roles = {
            **{k: "key" for k in spec.keys},
            spec.time: "time",
            spec.target: "target",
            **{c: "covariate" for c in spec.covariates},
        }
        named = ", ".join(f"{c!r} ({roles[c]})" for c in missing)
        raise DataValidationError(
            missing if len(missing) > 1 else missing[0],
            f"missing column(s) {named}; available columns: {list(map(str, frame.columns))}",
        )
    if frame.columns.duplicated().any():
        dup = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        raise DataValidationError(dup, "column names appear more than once in the input")


_NESTED = (list, tuple, dict, set, frozenset, np.ndarray)
_FLAT_INFERRED = {"string", "bytes", "floating", "integer", "mixed-integer-float", "decimal", "boolean",
                  "datetime64", "datetime", "date", "timedelta64", "timedelta", "time", "period", "empty"}


def _check_nested(frame: pd.DataFrame, spec: DataSpec) -> None:
    """Lists, structs and maps (nested Parquet types) in a used column are refused by name."""
    for name in [*spec.keys, spec.time, spec.target, *spec.covariates]:
        col = frame[name]
        if col.dtype != object or ptypes.infer_dtype(col, skipna=True) in _FLAT_INFERRED:
            continue
        nested = col.map(lambda v: isinstance(v, _NESTED)).to_numpy(dtype=bool)
        if nested.any():
            raise DataValidationError(
                name, "nested values (lists, structs or maps) are not supported: flatten the column into "
                "plain numbers, text or dates", example_rows(frame, frame.index[nested]), int(nested.sum()))


def check_arrow_types(schema: pa.Schema, spec: DataSpec) -> None:
    """The Arrow counterpart of the nested-values check, on a schema (before any row is read)."""
    for name in [*spec.keys, spec.time, spec.target, *spec.covariates]:
        index = schema.get_field_index(name)
        if index >= 0 and pa.types.is_nested(schema.field(index).type):
            raise DataValidationError(
                name, f"nested values ({schema.field(index).type}) are not supported: flatten the column "
                "into plain numbers, text or dates")


def example_rows(source: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    """Up to five rows of ``source`` by index label (its row position in the input)."""
    shown = source.loc[np.asarray(positions)[:MAX_EXAMPLES]]
    shown.index.name = "row"
    return shown


def _null_keys(
    work: pd.DataFrame, source: pd.DataFrame, spec: DataSpec, policy: str, report: ValidationReport
) -> pd.DataFrame:
    nulls = work[spec.keys].isna()
    mask = nulls.any(axis=1).to_numpy()
    if not mask.any():
        return work
    column = next(k for k in spec.keys if nulls[k].any())
    examples = example_rows(source, work.index.to_numpy()[mask])
    if policy == "error":
        raise DataValidationError(
            column, "partition key is null (validation.null_keys=error)", examples, int(mask.sum())
        )
    report.add("dropped_null_keys", int(mask.sum()), examples)
    return work[~mask]


def parse_time(
    col: pd.Series, source: pd.DataFrame, spec: DataSpec, part: PartContext | None = None
) -> pd.Series:
    """Dates as datetime64 (time zones dropped, wall time kept), or int64 periods for freq 'int'."""
    name = spec.time
    missing = col.isna().to_numpy()
    if missing.any():
        raise DataValidationError(
            name, "time value is missing", example_rows(source, col.index[missing]), int(missing.sum())
        )
    if spec.freq == "int":
        if ptypes.is_bool_dtype(col) or ptypes.is_datetime64_any_dtype(col):
            raise DataValidationError(
                name, f"integer periods expected (freq='int'), got {col.dtype}", example_rows(source, col.index)
            )
        num = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        bad = ~np.isfinite(num) | (num != np.round(num))
        if bad.any():
            raise DataValidationError(
                name, "not an integer period (freq='int')", example_rows(source, col.index[bad]), int(bad.sum())
            )
        far = np.abs(num) > INT_PERIOD_LIMIT
        if far.any():
            raise DataValidationError(
                name, f"integer period outside -{INT_PERIOD_LIMIT:.0e} .. {INT_PERIOD_LIMIT:.0e} (freq='int')",
                example_rows(source, col.index[far]), int(far.sum()))
        return pd.Series(num.astype("int64"), index=col.index)
    if ptypes.is_datetime64_any_dtype(col):
        parsed = col
    elif ptypes.is_numeric_dtype(col) or ptypes.is_bool_dtype(col):
        raise DataValidationError(
            name,
            f"numbers are not dates (freq={spec.freq!r}); use freq='int' for integer periods",
            example_rows(source, col.index),
        )
    else:
        fmt = part.time_format if part is not None else None
        try:
            if part is not None and part.time_utc:
                raise ValueError("the whole input mixes UTC offsets")
            parsed = pd.to_datetime(col, errors="coerce", format=fmt)
        except (ValueError, TypeError):  # mixed UTC offsets: compare them in UTC
            parsed = pd.to_datetime(col, errors="coerce", utc=True, format=fmt)
            if part is not None:
                part.tz_kinds.add("utc")
        else:
            if part is not None:
                part.tz_kinds.add(str(getattr(parsed.dt, "tz", None)))
        bad = parsed.isna().to_numpy()
        if bad.any():
            first = col.iloc[0] if part is None or part.first_time is UNSET else part.first_time
            raise DataValidationError(
                name,
                f"not a date (values must share one format, like the first: {first!r})",
                example_rows(source, col.index[bad]),
                int(bad.sum()),
            )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    outside = ((parsed < DATE_MIN) | (parsed > DATE_MAX)).to_numpy(dtype=bool)
    if outside.any():
        raise DataValidationError(
            name,
            f"date outside the supported range {DATE_MIN.date()} .. {DATE_MAX.date()} (what pandas "
            "handles at nanosecond precision, with room for a forecast horizon)",
            example_rows(source, col.index[outside]),
            int(outside.sum()),
        )
    return parsed


def parse_numeric(col: pd.Series, source: pd.DataFrame, name: str, role: str) -> np.ndarray:
    """float64 values; booleans and 0/1 are fine, text that is not a number is fatal."""
    if ptypes.is_bool_dtype(col) or ptypes.is_numeric_dtype(col):
        values = col.to_numpy(dtype="float64", na_value=np.nan)
    elif ptypes.is_datetime64_any_dtype(col) or ptypes.is_timedelta64_dtype(col):
        raise DataValidationError(
            name, f"{role} is not numeric (dtype {col.dtype})", example_rows(source, col.index)
        )
    else:
        text = col.astype("str").str.strip().str.lower() if role == "covariate" else col
        if role == "covariate":
            text = text.where(~text.isin(["true", "false"]), text.map({"true": "1", "false": "0"}))
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        bad = np.isnan(values) & col.notna().to_numpy()
        if bad.any():
            rule = f"{role} is not numeric" + (
                " (numbers, booleans or 0/1 expected)" if role == "covariate" else ""
            )
            raise DataValidationError(name, rule, example_rows(source, col.index[bad]), int(bad.sum()))
    infinite = np.isinf(values)
    if infinite.any():
        raise DataValidationError(
            name, f"{role} is infinite", example_rows(source, col.index[infinite]), int(infinite.sum())
        )
    return values


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


def _partition_codes(work: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Group codes numbered in partition-id order, and the id of each code.

    Ids are hashed once per partition (``shared.keys.partition_ids`` on one row per group), not
    per row; rows then map to their id through the integer group code.
    """
    groups = work.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    first = np.unique(groups, return_index=True)[1]
    ids = partition_ids(work.iloc[first], keys).to_numpy(dtype=object)
    rank = np.argsort(ids, kind="stable")
    code_of_group = np.empty(len(ids), dtype=np.int64)
    code_of_group[rank] = np.arange(len(ids))
    return code_of_group[groups], ids[rank]


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
        target[~has_next] = np.add.reduceat(target, run_starts)
    report.add("merged_duplicates", merged, examples)
    return ~has_next, has_prev & ~has_next


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


def _fill_gaps(
    out: pd.DataFrame,
    starts: np.ndarray,
    spec: DataSpec,
    policy: str,
    anchor: str | None,
    report: ValidationReport,
    part: PartContext | None = None,
) -> pd.DataFrame:
    """Put every series on a complete grid from its first to its last period (``zero``/``interpolate``).

    The grid is built with ``np.repeat``/``arange``; each grid slot takes its row from the last
    observed row at or before it, so keys and covariates of filled rows are forward-filled.
    """
    n = len(out)
    periods = out[PERIOD].to_numpy()
    counts = np.diff(np.r_[starts, n])
    ends = np.r_[starts[1:], n] - 1
    first, last = periods[starts], periods[ends]
    span = last - first + 1
    missing = span - counts
    total_missing = int(missing.sum())
    if total_missing == 0:
        return out
    gap_parts = np.flatnonzero(missing > 0)
    examples = out.iloc[starts[gap_parts[:MAX_EXAMPLES]]][[*spec.keys]].assign(
        missing_periods=missing[gap_parts[:MAX_EXAMPLES]]
    )
    if policy == "keep":
        report.add("kept_gaps", total_missing, examples)
        return out
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
    if part is not None:
        part.used_anchor = True
    total = int(span.sum())
    grid_start = np.r_[0, np.cumsum(span)[:-1]]
    group_of_slot = np.repeat(np.arange(len(starts)), span)
    slot_period = first[group_of_slot] + (np.arange(total) - grid_start[group_of_slot])
    group_of_row = np.repeat(np.arange(len(starts)), counts)
    slot_of_row = grid_start[group_of_row] + (periods - first[group_of_row])
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
