"""The data contract: turn a raw long frame into the validated frame, or refuse it with a clear reason.

Fatal problems (empty input, missing columns, unparseable time/target/covariates, null keys, and
any policy set to ``error``) raise :class:`DataValidationError`, whose message names the column,
the rule and up to five example rows as read. Everything else is repaired by the configured
policy and counted in the :class:`ValidationReport`: nothing is dropped silently.

The work is vectorised over the whole frame (group codes, ``np.lexsort``, accumulate tricks, a
complete period grid built with ``np.repeat``/``arange``), never one pandas frame per partition,
so millions of rows validate in seconds.

The report and the error are in :mod:`shared.data.validation_report`, the policies' repairs (targets,
duplicates, covariates, gaps) in :mod:`shared.data.repairs`; this module parses and checks, and
:func:`validate` runs the whole flow.
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api import types as ptypes

from shared import bounds
from shared.config import DataSpec, ProjectConfig
from shared.keys import PARTITION_ID, partition_ids
from shared.data.repairs import FILLED, _duplicates, _fill_gaps, _null_covariate, _target_policies
from shared.data.timegrid import PERIOD, anchor_offset, from_periods, period_freq, sub_daily, to_periods
from shared.data.validation_report import (
    UNSET, DataValidationError, PartContext, ValidationReport, example_rows,
)

# Dates must fit pandas' nanosecond range (1677-09-21 .. 2262-04-11) with room for a forecast
# horizon on either side; integer periods must be exact in float64 and leave room for arithmetic.
DATE_MIN = pd.Timestamp("1678-01-01")
DATE_MAX = pd.Timestamp("2261-12-31")
INT_PERIOD_LIMIT = 10**15


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
    _check_key_lengths(work, spec)
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
    # partitions that lost rows with a null target: their gaps are never filled with zeros by the
    # "auto" gap policy (a missing target is not a zero sale)
    lost_nulls = (set(partition_ids(work[~keep], spec.keys).tolist())
                  if keep is not None and policy.gaps == "auto" else set())
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
    _enter(part, (1, 4), report)
    copies = _exact_copies(codes, periods, rows, source, spec, policy.exact_duplicates, report)
    if copies is not None:
        keep_rows = ~copies
        rows, codes, periods, time_values = rows[keep_rows], codes[keep_rows], periods[keep_rows], time_values[keep_rows]
        target = target[keep_rows]
        covs = {c: v[keep_rows] for c, v in covs.items()}
        keys = keys[keep_rows]
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
    out = _fill_gaps(out, starts, spec, policy.gaps, anchor, report, part, lost_nulls)
    _enter(part, (9,), report)

    report.output_rows = len(out)
    report.partitions = len(starts)
    report.anchor = anchor
    return out, report


def _exact_copies(codes: np.ndarray, periods: np.ndarray, rows: np.ndarray, source: pd.DataFrame, spec: DataSpec,
                  policy: str, report: ValidationReport) -> np.ndarray | None:
    """Rows (sorted by partition and period) that repeat an earlier row exactly, as written (keys,
    time, target and covariates): a file loaded twice, not two sales. ``error`` refuses them (the
    default: summing would double the sales), ``drop`` keeps the first of each in input order,
    ``merge`` leaves them to ``validation.duplicates``. Only rows sharing a partition and period
    can be copies, so only those are compared (usually none: no cost on clean data)."""
    if policy == "merge" or len(codes) < 2:
        return None
    same = (codes[1:] == codes[:-1]) & (periods[1:] == periods[:-1])
    if not same.any():
        return None
    involved = np.flatnonzero(np.r_[same, False] | np.r_[False, same])
    columns = [*spec.keys, spec.time, spec.target, *spec.covariates]
    repeated = source.loc[rows[involved], columns].duplicated(keep="first").to_numpy()
    if not repeated.any():
        return None
    copies = np.zeros(len(codes), dtype=bool)
    copies[involved[repeated]] = True
    examples = example_rows(source, np.sort(rows[copies]))
    if policy == "error":
        raise DataValidationError(
            None,
            "rows repeat earlier rows exactly (same keys, time, target and covariates: a file loaded "
            "twice?); set validation.exact_duplicates = 'drop' to keep one of each, or 'merge' to treat "
            "them as any rows of the same period (validation.duplicates)",
            examples,
            int(copies.sum()),
        )
    report.add("dropped_exact_duplicates", int(copies.sum()), examples)
    return copies


def _enter(part: PartContext | None, stage: tuple, report: ValidationReport) -> None:
    if part is not None:
        part.enter(stage, report)


def anchor_counts(times: pd.Series, freq: str) -> tuple[pd.Series, pd.Series] | None:
    """What :func:`shared.data.timegrid.anchor_offset` takes the modes of, as value counts: parts of an
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
        fixes = []  # every role that is missing, with the flag (or config key) that names its column
        for role, flag, key in (("key", "--keys", "data.keys"), ("time", "--time", "data.time"),
                                ("target", "--target", "data.target")):
            if any(roles[c] == role for c in missing):
                fixes.append(f"{flag} (config {key})")
        if any(roles[c] == "covariate" for c in missing):
            fixes.append("--covariates with your columns, or --covariates '' for none (config data.covariates)")
        raise DataValidationError(
            missing if len(missing) > 1 else missing[0],
            f"missing column(s) {named}; available columns: {list(map(str, frame.columns))}; "
            f"name yours with {'; '.join(fixes)}",
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
    """Dates as naive datetime64, or int64 periods for freq 'int'.

    Times with a UTC offset follow one rule in every format (:func:`_one_clock`): sub-daily data
    in UTC, daily and coarser data at its local date (or in ``data.timezone``)."""
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
        parsed = _one_clock(col, source, spec, part)
    elif ptypes.is_numeric_dtype(col) or ptypes.is_bool_dtype(col):
        raise DataValidationError(
            name,
            f"numbers are not dates (freq={spec.freq!r}); use freq='int' for integer periods",
            example_rows(source, col.index),
        )
    else:
        fmt = spec.time_format or (part.time_format if part is not None else None)
        dayfirst = bool(getattr(spec, "dayfirst", False))
        with warnings.catch_warnings():
            # mixed offsets: object values on pandas 2 (with this warning), an error on pandas 3;
            # a day-first guess that pandas cannot confirm warns too
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                parsed = pd.to_datetime(col, errors="coerce", format=fmt, dayfirst=dayfirst)
            except (ValueError, TypeError):
                parsed = None
        if parsed is None or not ptypes.is_datetime64_any_dtype(parsed):
            parsed = _mixed_offsets(col, fmt)
        bad = (parsed.isna() if isinstance(parsed, pd.Series) else parsed[0].isna()).to_numpy()
        if bad.any() and _other_kind(parsed, col[bad]):
            raise DataValidationError(name, MIXED_OFFSETS, example_rows(source, col.index[bad]), int(bad.sum()))
        if bad.any() and _beyond_nanoseconds(col[bad]):
            raise DataValidationError(name, OUTSIDE_DATES, example_rows(source, col.index[bad]), int(bad.sum()))
        if bad.any():
            first = col.iloc[0] if part is None or part.first_time is UNSET else part.first_time
            hint = (f"the format data.time_format = {spec.time_format!r} does not match them" if spec.time_format
                    else "set the format: data.time_format (--time-format '%d.%m.%Y'), or data.dayfirst "
                         "(--dayfirst) for day-first dates")
            raise DataValidationError(
                name,
                f"not a date (values must share one format, like the first: {first!r}; {hint})",
                example_rows(source, col.index[bad]),
                int(bad.sum()),
            )
        parsed = _one_clock(parsed, source, spec, part)
    outside = ((parsed < DATE_MIN) | (parsed > DATE_MAX)).to_numpy(dtype=bool)
    if outside.any():
        raise DataValidationError(
            name,
            OUTSIDE_DATES,
            example_rows(source, col.index[outside]),
            int(outside.sum()),
        )
    return parsed


# Offsets as text ends them ("Z", "+01:00", "-0500"): values are parsed in groups of one offset each
_OFFSET_END = r"(Z|[+-]\d\d:?\d\d)$"


def _mixed_offsets(col: pd.Series, fmt: str | None) -> tuple[pd.Series, pd.Series, np.ndarray]:
    """A time column whose values carry different UTC offsets (a daylight-saving change, say):
    (wall-clock times as written, the instants in UTC, whether each value has an offset), NaT where
    a value is not a date. Distinct values are parsed once, in groups that share an offset."""
    codes, uniques = pd.factorize(col)
    values = pd.Series(np.asarray(uniques, dtype=object))
    texts = values.map(lambda v: v.strip() if isinstance(v, str) else v)
    group = texts.map(lambda v: str(v.utcoffset()) if isinstance(v, datetime.datetime) and v.tzinfo else "")
    is_text = texts.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    if is_text.any():
        ends = texts[is_text].astype(str).str.extract(_OFFSET_END, expand=False).fillna("")
        group[is_text] = ends.to_numpy(dtype=object)
    wall = np.full(len(values), np.datetime64("NaT", "ns"))
    utc = wall.copy()
    aware = np.zeros(len(values), dtype=bool)
    for key in pd.unique(group):
        at = np.flatnonzero((group == key).to_numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                one = pd.to_datetime(texts.iloc[at], errors="coerce", format=fmt if is_text[at].all() else None)
            except (ValueError, TypeError):
                one = None
        if one is None or not ptypes.is_datetime64_any_dtype(one):  # offsets written otherwise: one by one
            stamps = [_one_stamp(v) for v in texts.iloc[at]]
            aware[at] = [t is not pd.NaT and t.tzinfo is not None for t in stamps]
            wall[at] = pd.DatetimeIndex([t if t is pd.NaT else t.tz_localize(None) for t in stamps]).to_numpy()
            utc[at] = pd.DatetimeIndex([t if t is pd.NaT or t.tzinfo is None else t.tz_convert("UTC").tz_localize(None)
                                        for t in stamps]).to_numpy()
            continue
        if one.dt.tz is None:
            wall[at] = utc[at] = one.to_numpy(dtype="datetime64[ns]")
        else:
            aware[at] = True
            wall[at] = one.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
            utc[at] = one.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return (pd.Series(wall[codes], index=col.index), pd.Series(utc[codes], index=col.index),
            aware[codes] & (codes >= 0))


def _other_kind(parsed, rejected: pd.Series) -> bool:
    """Whether values that did not parse in the column's format are dates of the other kind (with an
    offset where the column has none, or the reverse): a mixed column, not a bad date."""
    if not isinstance(parsed, pd.Series) or parsed.notna().sum() == 0:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            again = pd.to_datetime(rejected, errors="coerce")
        except (ValueError, TypeError):
            return False
    if not ptypes.is_datetime64_any_dtype(again) or again.isna().any():
        return False
    return (again.dt.tz is None) != (parsed.dt.tz is None)


def _beyond_nanoseconds(rejected: pd.Series) -> bool:
    """Whether values that did not parse are all real dates beyond pandas' nanosecond range (the
    parser makes them NaT like text that is no date): then the range is what the user must hear."""
    def far(value) -> bool:
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError):
            return False
        return stamp is not pd.NaT and not (DATE_MIN <= stamp.tz_localize(None) <= DATE_MAX)

    return all(far(v) for v in pd.unique(rejected)[:1000])


def _one_stamp(value) -> pd.Timestamp:
    try:
        return pd.Timestamp(value).as_unit("ns")
    except (ValueError, TypeError, OverflowError):  # OutOfBoundsDatetime is a ValueError
        return pd.NaT


def _one_clock(parsed, source: pd.DataFrame, spec: DataSpec, part: PartContext | None) -> pd.Series:
    """The one rule for UTC offsets, whatever the format (docs/configuration.md, "Time zones").

    Times without an offset are used as written. Times with one (text such as
    ``2024-03-10T00:00:00-05:00``, tz-aware Parquet or SQL timestamps) are instants: sub-daily
    data is put on the UTC clock, so a daylight-saving change neither invents an hour nor merges
    two; daily and coarser data keeps the local date as written (its own offset), or the date in
    ``data.timezone`` when one is named. A column mixing both kinds is refused. ``parsed`` is a
    datetime Series (naive or tz-aware) or the (wall, utc, has offset) of :func:`_mixed_offsets`.
    """
    if isinstance(parsed, tuple):
        wall, utc, aware = parsed
    elif getattr(parsed.dt, "tz", None) is None:
        wall = utc = parsed
        aware = np.zeros(len(parsed), dtype=bool)
    else:
        wall, aware = parsed.dt.tz_localize(None), np.ones(len(parsed), dtype=bool)
        utc = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    if part is not None and len(aware):
        part.tz_kinds.update({"offset"} if aware.all() else {"naive"} if not aware.any() else {"offset", "naive"})
    if not aware.any():
        return wall
    if not aware.all():
        plain = ~aware
        raise DataValidationError(spec.time, MIXED_OFFSETS, example_rows(source, wall.index[plain]),
                                  int(plain.sum()))
    if sub_daily(spec.freq):
        return utc
    if spec.timezone:
        return utc.dt.tz_localize("UTC").dt.tz_convert(spec.timezone).dt.tz_localize(None)
    return wall


OUTSIDE_DATES = (f"date outside the supported range {DATE_MIN.date()} .. {DATE_MAX.date()} (what pandas "
                 "handles at nanosecond precision, with room for a forecast horizon)")
MIXED_OFFSETS = ("time values mix times with a UTC offset and times without one: write every time "
                 "with its offset (e.g. 2024-03-10T00:00:00-05:00) or none")


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
            written = col[bad].astype(str).str.strip()
            if written.str.fullmatch(r"[-+]?\d[\d.,' _]*").any():  # "24,924.50", "1.234,5"
                rule += ("; numbers written with separators are read with [ingest] thousands and decimal "
                         "(--thousands ',' --decimal '.', or --thousands '.' --decimal ',')")
            raise DataValidationError(name, rule, example_rows(source, col.index[bad]), int(bad.sum()))
    infinite = np.isinf(values)
    if infinite.any():
        raise DataValidationError(
            name, f"{role} is infinite", example_rows(source, col.index[infinite]), int(infinite.sum())
        )
    if role == "covariate":  # a 1e300 price overflows every feature built from it
        huge = np.abs(values) > bounds.limit("covariate_magnitude").high
        if huge.any():
            rule = f"covariate too large: must be {bounds.limit('covariate_magnitude').describe()}"
            raise DataValidationError(name, rule, example_rows(source, col.index[huge]), int(huge.sum()))
    return values


def _check_key_lengths(work: pd.DataFrame, spec: DataSpec) -> None:
    """Key values of at most ``bounds.MAX_KEY_LENGTH`` characters: every model, file name, report row
    and SQL row carries them (a 50 MB value held the workdir for minutes at 11 GB). The examples
    quote each value by its start only."""
    for name in spec.keys:
        col = work[name]
        if ptypes.is_numeric_dtype(col) or ptypes.is_bool_dtype(col) or ptypes.is_datetime64_any_dtype(col):
            continue
        # a key repeats on every row of its series: measure each distinct value once
        codes, uniques = pd.factorize(col, use_na_sentinel=False)
        long_values = np.fromiter((len(str(v)) > bounds.MAX_KEY_LENGTH for v in uniques), dtype=bool,
                                  count=len(uniques))
        if not long_values.any():
            continue
        lengths = col.astype("str").str.len()
        too_long = (lengths > bounds.MAX_KEY_LENGTH).to_numpy()
        if too_long.any():
            first = str(col[too_long].iloc[0])
            rule = (f"partition key value too long: {len(first):,} characters ({bounds.shorten(first)}); "
                    f"at most {bounds.MAX_KEY_LENGTH:,} characters")
            shown = pd.DataFrame({name: col[too_long].astype("str").str.slice(0, 40) + "...",
                                  "characters": lengths[too_long]}).head(5)
            shown.index.name = "row"
            raise DataValidationError(name, rule, shown, int(too_long.sum()))



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


