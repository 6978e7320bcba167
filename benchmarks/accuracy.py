"""How accurate is what `manymodels score` delivers, next to simple and strong references? (issue 9 item 6)

For each data set, every series' last `--holdout` rows (default 12) are held out. The training part
goes through the CLI exactly as a user would run it (`manymodels run`, then `manymodels score` on the
held-out rows without their target), and the delivered predictions are read back from the SQLite
store and compared with the held-out actuals. On the same hold-out, in this script:

1. naive            the series' last training value;
2. mean of last 4   the mean of the series' last 4 training values;
3. log-log LSQ      per series, least squares of log1p(target) on log(positive covariates), raw flags,
                    Fourier terms of the season position (when the history covers a season) and a
                    trend, predicting with the held-out rows' covariates;
4. global GBM       one LightGBM model (scikit-learn's HistGradientBoostingRegressor if LightGBM is not
                    installed) over all series: direct lags >= the hold-out, rolling means lagged by
                    it, covariates, calendar, series mean-scaled target.

Metric: WAPE = sum|actual - prediction| / sum|actual| over the held-out rows (a held-out row with no
delivered prediction counts as a prediction of 0). Also: the share of delivered rows by `source`
(or `is_fallback`), the coverage of prediction intervals when the store has `lower`/`upper`, and
the wall time of every method. Target: ours below every reference.

    python benchmarks/accuracy.py                          # cheese, walmart, generated weekly + daily
    python benchmarks/accuracy.py --datasets cheese,walmart,weekly --quick --json out.json
    python benchmarks/accuracy.py --dataset "mine=sales.csv:keys=store,sku;time=week;target=units;\\
        covariates=price,promo;freq=W;season=52" --datasets mine

The real data sets (../shared/data relative to the repo) are read only when selected and present.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HOLDOUT = 12
CANDIDATE_SLACK = 0.02  # the delivered WAPE may exceed the best candidate scored alone by 2 % at most
GBM_THREADS = 1  # OpenMP threads spin badly when the 2 shared cores are busy; one is steadier


# --------------------------------------------------------------------------- data set descriptions


@dataclass(frozen=True)
class Columns:
    """What the references need to know about a long table (the CLI's column flags, plus a season)."""

    keys: tuple[str, ...]
    time: str
    target: str
    covariates: tuple[str, ...] = ()
    freq: str = "W"
    season_length: int = 52


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark data set: a file given by path, or a panel `manymodels generate` writes."""

    name: str
    cols: Columns
    path: Path | None = None
    generate: tuple[int, int] | None = None  # (partitions, periods), freq from cols


def default_season_length(freq: str) -> int:
    """Periods per season for the references; 'int' is taken as weekly scanner data (52)."""
    if freq == "int":
        return 52
    base = freq.split("-")[0].lstrip("0123456789").upper()
    table = {"W": 52, "D": 7, "B": 5, "M": 12, "MS": 12, "ME": 12, "Q": 4, "QS": 4, "QE": 4, "H": 24}
    return table.get(base, 1)


def builtin_specs(args: argparse.Namespace) -> dict[str, DatasetSpec]:
    """The four default data sets, with the panel sizes the options ask for."""
    weekly = (args.weekly_partitions, args.weekly_periods)
    daily = (args.daily_partitions, args.daily_periods)
    if args.quick:
        weekly = (min(weekly[0], 60), min(weekly[1], 130))
        daily = (min(daily[0], 30), min(daily[1], 400))
    gen_cols: dict[str, Any] = {
        "keys": ("store", "item"), "time": "date", "target": "sales", "covariates": ("price", "promo"),
    }
    return {
        "cheese": DatasetSpec(
            "cheese",
            Columns(("retailer",), "week", "volume", ("price", "disp"), "int", 52),
            path=Path(args.cheese),
        ),
        "walmart": DatasetSpec(
            "walmart",
            Columns(("Store", "Dept"), "Date", "Weekly_Sales", ("IsHoliday",), "W-FRI", 52),
            path=Path(args.walmart),
        ),
        "weekly": DatasetSpec("weekly", Columns(**gen_cols, freq="W", season_length=52), generate=weekly),
        "daily": DatasetSpec("daily", Columns(**gen_cols, freq="D", season_length=7), generate=daily),
    }


_DATASET_RE = re.compile(
    r"^(?P<name>[^=]+)=(?P<path>.+?):(?P<opts>(?:keys|time|target|covariates|freq|season)=.*)$"
)


def parse_dataset_option(text: str) -> DatasetSpec:
    """`NAME=PATH:keys=a,b;time=t;target=y;covariates=c1,c2;freq=F[;season=S]` -> a spec."""
    match = _DATASET_RE.match(text.strip())
    if not match:
        raise ValueError(
            f"--dataset {text!r}: expected NAME=PATH:keys=a,b;time=t;target=y;covariates=...;freq=F"
        )
    opts: dict[str, str] = {}
    for part in match["opts"].split(";"):
        if part.strip():
            key, _, value = part.partition("=")
            opts[key.strip()] = value.strip()
    missing = {"keys", "time", "target"} - opts.keys()
    if missing:
        raise ValueError(f"--dataset {match['name']}: missing {', '.join(sorted(missing))}")
    freq = opts.get("freq", "W")
    cols = Columns(
        keys=tuple(k for k in opts["keys"].split(",") if k),
        time=opts["time"],
        target=opts["target"],
        covariates=tuple(c for c in opts.get("covariates", "").split(",") if c),
        freq=freq,
        season_length=int(opts.get("season") or default_season_length(freq)),
    )
    return DatasetSpec(match["name"].strip(), cols, path=Path(match["path"]))


# --------------------------------------------------------------------------- loading and hold-out


def read_table(path: Path) -> pd.DataFrame:
    """CSV or Parquet by suffix, the way the CLI reads files."""
    if path.suffix.lower() in {".parquet", ".pq"}:
        return pd.read_parquet(path)
    return pd.read_csv(path)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """CSV or Parquet by suffix."""
    if path.suffix.lower() in {".parquet", ".pq"}:
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def prepare_frame(raw: pd.DataFrame, cols: Columns) -> pd.DataFrame:
    """Only the columns the run uses, times parsed, sorted by series and time; values left as given."""
    needed = [*cols.keys, cols.time, cols.target, *cols.covariates]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise ValueError(f"columns not in the data: {', '.join(missing)}")
    frame = raw[needed].copy()
    if cols.freq == "int":
        frame[cols.time] = pd.to_numeric(frame[cols.time]).astype("int64")
    else:
        frame[cols.time] = pd.to_datetime(frame[cols.time])
    frame[cols.target] = pd.to_numeric(frame[cols.target], errors="coerce")
    return frame.sort_values([*cols.keys, cols.time], kind="stable").reset_index(drop=True)


@dataclass
class Split:
    """The training part, the held-out rows without target (the future file) and their actuals."""

    train: pd.DataFrame
    future: pd.DataFrame
    actual: pd.DataFrame
    dropped_series: int = 0


def holdout_split(frame: pd.DataFrame, cols: Columns, holdout: int) -> Split:
    """Hold out each series' last `holdout` rows; series with no row left to train on are dropped."""
    size = frame.groupby(list(cols.keys), sort=False)[cols.time].transform("size")
    keep = size > holdout
    dropped = int(frame.loc[~keep, list(cols.keys)].drop_duplicates().shape[0])
    frame = frame[keep].reset_index(drop=True)
    rank_from_end = frame.groupby(list(cols.keys), sort=False).cumcount(ascending=False)
    held = rank_from_end < holdout
    actual = frame[held].reset_index(drop=True)
    future = actual.drop(columns=[cols.target])
    return Split(frame[~held].reset_index(drop=True), future, actual, dropped)


def series_ids(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """A hashable per-row series label (tuple of key values as text), stable across frames."""
    out = frame[keys[0]].astype(str)
    for key in keys[1:]:
        out = out + "\x1f" + frame[key].astype(str)
    return out


def period_index(times: pd.Series, freq: str) -> np.ndarray:
    """Integer period numbers (consecutive periods differ by 1): lags and season positions use them."""
    if freq == "int":
        return pd.to_numeric(times).to_numpy(dtype=np.int64)
    ts = pd.DatetimeIndex(pd.to_datetime(times))
    alias = freq
    base = freq.split("-")[0]
    if base.upper() in {"MS", "QS", "YS", "AS", "BMS", "BQS", "ME", "QE", "YE"}:
        alias = base.upper().rstrip("SE") or base
    try:
        return pd.PeriodIndex(ts, freq=alias).asi8.astype(np.int64)
    except (ValueError, TypeError):
        steps = np.diff(np.unique(ts.asi8))
        step = int(np.median(steps)) if len(steps) else 1
        return ((ts.asi8 - ts.asi8.min()) // max(step, 1)).astype(np.int64)


def numeric(values: pd.Series) -> pd.Series:
    """A covariate as floats (flags such as True/False become 1/0) for the references' features."""
    try:
        return values.astype("float64")
    except (TypeError, ValueError):
        return pd.to_numeric(values, errors="coerce")


# --------------------------------------------------------------------------- metrics


def wape(actual: np.ndarray, prediction: np.ndarray) -> float:
    """sum|error| / sum|actual|: scale-free and robust to zeros, the usual retail metric."""
    actual = np.asarray(actual, dtype=float)
    prediction = np.nan_to_num(np.asarray(prediction, dtype=float), nan=0.0)
    denom = np.abs(actual).sum()
    return float(np.abs(actual - prediction).sum() / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------- references


def _last_values(train: pd.DataFrame, future: pd.DataFrame, cols: Columns, n: int) -> np.ndarray:
    """Mean of each series' last n training targets, mapped onto the future rows."""
    ids = series_ids(train, cols.keys)
    level = train[cols.target].groupby(ids, sort=False).tail(n).groupby(ids, sort=False).mean()
    return np.array(series_ids(future, cols.keys).map(level), dtype=float)  # a writable copy


def naive_reference(train: pd.DataFrame, future: pd.DataFrame, cols: Columns) -> np.ndarray:
    """Last observed value: the floor any forecaster has to beat."""
    return _last_values(train, future, cols, 1)


def mean4_reference(train: pd.DataFrame, future: pd.DataFrame, cols: Columns) -> np.ndarray:
    """Mean of the last 4 observations: the product's own baseline, computed independently."""
    return _last_values(train, future, cols, 4)


def covariate_transforms(train: pd.DataFrame, cols: Columns) -> dict[str, str]:
    """Per covariate, 'raw' for flags (only 0/1) or signed values, 'log' for strictly positive ones."""
    out: dict[str, str] = {}
    for cov in cols.covariates:
        values = numeric(train[cov]).dropna()
        binary = bool(len(values)) and set(np.unique(values)) <= {0.0, 1.0}
        out[cov] = "log" if (not binary and len(values) and (values > 0).all()) else "raw"
    return out


@dataclass
class LogLogFit:
    """A per-series least-squares fit: feature names, coefficients and how to rebuild the features."""

    names: list[str]
    beta: np.ndarray
    origin: int
    span: float
    fourier: int
    yearly: int = 0

    def coef(self, name: str) -> float:
        """Coefficient by feature name, e.g. 'log(price)' (the price elasticity)."""
        return float(self.beta[self.names.index(name)])


def _loglog_design(
    part: pd.DataFrame, periods: np.ndarray, cols: Columns, transforms: Mapping[str, str], origin: int,
    span: float, fourier: int, yearly: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """Intercept, trend, transformed covariates and Fourier terms for some rows of one series."""
    columns = [np.ones(len(part)), (periods - origin) / span]
    names = ["intercept", "trend"]
    for cov in cols.covariates:
        x = numeric(part[cov]).fillna(0.0).to_numpy(dtype=float)
        if transforms.get(cov) == "log":
            columns.append(np.log(np.clip(x, 1e-9, None)))
            names.append(f"log({cov})")
        else:
            columns.append(x)
            names.append(cov)
    for k in range(1, fourier + 1):
        angle = 2 * np.pi * k * (periods % cols.season_length) / cols.season_length
        columns += [np.sin(angle), np.cos(angle)]
        names += [f"sin{k}", f"cos{k}"]
    if yearly:
        year_pos = (pd.DatetimeIndex(pd.to_datetime(part[cols.time])).day_of_year.to_numpy() - 1) / 365.25
        for k in range(1, yearly + 1):
            columns += [np.sin(2 * np.pi * k * year_pos), np.cos(2 * np.pi * k * year_pos)]
            names += [f"year_sin{k}", f"year_cos{k}"]
    return np.column_stack(columns), names


def has_sub_weekly_year(part: pd.DataFrame, cols: Columns) -> bool:
    """Dated periods shorter than a week over at least a year: a yearly cycle beside the short season."""
    if cols.freq == "int":
        return False
    stamps = np.unique(pd.DatetimeIndex(pd.to_datetime(part[cols.time])).asi8)
    if len(stamps) < 3 or stamps[-1] - stamps[0] < pd.Timedelta(days=365).value:
        return False
    return float(np.median(np.diff(stamps))) < pd.Timedelta(days=7).value


def fit_loglog(part: pd.DataFrame, cols: Columns, transforms: Mapping[str, str]) -> LogLogFit | None:
    """Least squares on one series' training rows; None when there are too few rows for the features."""
    periods = period_index(part[cols.time], cols.freq)
    origin = int(periods.min())
    span = float(max(periods.max() - origin, 1))
    covers_season = cols.season_length > 1 and span + 1 >= cols.season_length
    fourier = min(3, cols.season_length // 2) if covers_season else 0
    yearly = 2 if has_sub_weekly_year(part, cols) else 0
    x, names = _loglog_design(part, periods, cols, transforms, origin, span, fourier, yearly)
    y = np.log1p(np.clip(part[cols.target].to_numpy(dtype=float), 0.0, None))
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    varying = np.r_[True, x[:, 1:].std(axis=0) > 1e-12]  # a constant covariate would alias the intercept
    if len(y) < varying.sum() + 2:
        return None
    beta = np.zeros(x.shape[1])
    beta[varying] = np.linalg.lstsq(x[:, varying], y, rcond=None)[0]
    return LogLogFit(names, beta, origin, span, fourier, yearly)


def predict_loglog(
    fit: LogLogFit, part: pd.DataFrame, cols: Columns, transforms: Mapping[str, str]
) -> np.ndarray:
    """Back-transformed prediction for some future rows of the fitted series (never negative)."""
    periods = period_index(part[cols.time], cols.freq)
    x, _ = _loglog_design(part, periods, cols, transforms, fit.origin, fit.span, fit.fourier, fit.yearly)
    log_pred = np.clip(x @ fit.beta, -50.0, 50.0)
    return np.clip(np.expm1(log_pred), 0.0, None)


def loglog_reference(train: pd.DataFrame, future: pd.DataFrame, cols: Columns) -> np.ndarray:
    """Per-series log-log least squares (the classic price-elasticity model); mean-of-4 if too short."""
    transforms = covariate_transforms(train, cols)
    out = mean4_reference(train, future, cols)
    train_ids = series_ids(train, cols.keys)
    future_ids = series_ids(future, cols.keys)
    groups = {sid: idx for sid, idx in train.groupby(train_ids, sort=False).indices.items()}
    for sid, fidx in future.groupby(future_ids, sort=False).indices.items():
        if sid not in groups:
            continue
        fit = fit_loglog(train.iloc[groups[sid]], cols, transforms)
        if fit is not None:
            out[fidx] = predict_loglog(fit, future.iloc[fidx], cols, transforms)
    return out


def _gbm_lags(horizon: int, season: int, yearly: bool = False) -> list[int]:
    """Direct-forecast lags: horizon..horizon+3, the first multiple of the season >= horizon, and
    for daily-like data a year back in whole seasons (364 days: same weekday)."""
    lags = list(range(horizon, horizon + 4))
    if season > 1:
        seasonal = season * math.ceil(horizon / season)
        if seasonal not in lags:
            lags.append(seasonal)
        if yearly:
            lags.append(season * max(1, round(365.25 / season)) if season < 365 else season)
    return sorted(set(lags))


def gbm_features(train: pd.DataFrame, future: pd.DataFrame, cols: Columns, horizon: int) -> pd.DataFrame:
    """One dense (series x period) frame with scaled target, lags, rolling means, covariates, calendar."""
    both = pd.concat(
        [train.assign(_future=False, _row=-1), future.assign(_future=True, _row=np.arange(len(future)))],
        ignore_index=True,
    )
    both["_sid"] = pd.factorize(series_ids(both, cols.keys))[0]
    both["_p"] = period_index(both[cols.time], cols.freq)
    both = both.drop_duplicates(["_sid", "_p"], keep="last")
    bounds = both.groupby("_sid")["_p"].agg(["min", "max"])
    lengths = (bounds["max"] - bounds["min"] + 1).to_numpy()
    spans = [np.arange(lo, hi + 1) for lo, hi in zip(bounds["min"], bounds["max"], strict=True)]
    grid = pd.DataFrame({"_sid": np.repeat(bounds.index.to_numpy(), lengths), "_p": np.concatenate(spans)})
    dense = grid.merge(both, on=["_sid", "_p"], how="left")
    dense["_future"] = dense["_future"].fillna(False).astype(bool)
    observed = dense[cols.target].where(~dense["_future"])
    scale = observed.groupby(dense["_sid"]).transform("mean").abs()
    dense["_scale"] = scale.where(scale > 0, 1.0).fillna(1.0)
    dense["_y"] = observed / dense["_scale"]
    by_series = dense.groupby("_sid")["_y"]
    for lag in _gbm_lags(horizon, cols.season_length, has_sub_weekly_year(train, cols)):
        dense[f"lag{lag}"] = by_series.shift(lag)
    shifted = by_series.shift(horizon)
    for window in sorted({4, 12, max(cols.season_length, 4)}):
        dense[f"mean{window}_lag{horizon}"] = shifted.groupby(dense["_sid"]).transform(
            lambda s, w=window: s.rolling(w, min_periods=1).mean()
        )
    transforms = covariate_transforms(train, cols)
    for cov in cols.covariates:
        dense[cov] = numeric(dense[cov])
        if transforms[cov] == "log":
            dense[f"rel_{cov}"] = dense[cov] / dense.groupby("_sid")[cov].transform("mean")
    dense["season_pos"] = dense["_p"] % max(cols.season_length, 1)
    if cols.freq != "int":
        stamps = pd.to_datetime(dense[cols.time])
        dense["month"] = stamps.dt.month
        dense["day_of_year"] = stamps.dt.day_of_year
        if cols.freq.upper().startswith(("D", "B")):
            dense["day_of_week"] = stamps.dt.day_of_week
    return dense


def _feature_columns(dense: pd.DataFrame, cols: Columns) -> list[str]:
    """Everything gbm_features built, minus bookkeeping and the raw target/time/keys."""
    skip = {*cols.keys, cols.time, cols.target, "_future", "_row", "_p", "_scale", "_y"}
    return [c for c in dense.columns if c not in skip]


def _gbm_model(seed: int) -> tuple[Any, str]:
    """LightGBM if installed (the public go-to), else scikit-learn's histogram gradient boosting."""
    try:
        import lightgbm

        model = lightgbm.LGBMRegressor(
            n_estimators=400, learning_rate=0.05, num_leaves=31, min_child_samples=20, subsample=0.8,
            subsample_freq=1, colsample_bytree=0.8, random_state=seed, n_jobs=GBM_THREADS, verbose=-1,
        )
        return model, "lightgbm"
    except ImportError:
        from sklearn.ensemble import HistGradientBoostingRegressor

        model = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05, random_state=seed)
        return model, "sklearn-hgb"


def global_gbm_reference(
    train: pd.DataFrame, future: pd.DataFrame, cols: Columns, horizon: int = HOLDOUT, seed: int = 0
) -> np.ndarray:
    """One boosted model over all series, direct (lags >= horizon), on the series mean-scaled target."""
    dense = gbm_features(train, future, cols, horizon)
    features = _feature_columns(dense, cols)
    fit_rows = dense[~dense["_future"] & dense["_y"].notna()]
    pred_rows = dense[dense["_future"]]
    model, kind = _gbm_model(seed)
    x_fit, x_pred = fit_rows[features], pred_rows[features]
    if kind == "lightgbm":
        x_fit = x_fit.astype({"_sid": "category"})
        x_pred = x_pred.astype({"_sid": pd.CategoricalDtype(x_fit["_sid"].cat.categories)})
    model.fit(x_fit, fit_rows["_y"])
    scaled = model.predict(x_pred)
    out = np.full(len(future), np.nan)
    out[pred_rows["_row"].to_numpy(dtype=int)] = np.clip(scaled * pred_rows["_scale"].to_numpy(), 0.0, None)
    return out


Reference = Callable[[pd.DataFrame, pd.DataFrame, Columns], np.ndarray]
REFERENCES: dict[str, Reference] = {
    "naive last value": naive_reference,
    "mean of last 4": mean4_reference,
    "log-log least squares": loglog_reference,
    "global GBM": global_gbm_reference,
}


def gbm_label() -> str:
    """Which library the global GBM reference uses here."""
    try:
        import lightgbm  # noqa: F401

        return "global LightGBM"
    except ImportError:
        return "global HistGradientBoosting"


# --------------------------------------------------------------------------- the CLI, as a user runs it


class CliError(RuntimeError):
    """A `manymodels` call exited non-zero; the message carries its stderr tail."""


def cli_path() -> Path:
    """The `manymodels` entry point of the interpreter running this script (same venv)."""
    return Path(sys.executable).parent / "manymodels"


def run_cli(args: Sequence[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run one CLI command, timed (wall); return its --json object (the last JSON line of stdout)."""
    command = [str(cli_path()), *args]
    start = time.perf_counter()
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise CliError(f"`manymodels {args[0]}` exited {proc.returncode}: " + " | ".join(tail))
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line), seconds
    return {}, seconds


def generate_panel(spec: DatasetSpec, out: Path, seed: int, timeout: float) -> float:
    """`manymodels generate` the synthetic panel of a generated data set; returns its wall time."""
    partitions, periods = spec.generate or (0, 0)
    _, seconds = run_cli(
        ["generate", "--partitions", str(partitions), "--periods", str(periods), "--freq", spec.cols.freq,
         "--seed", str(seed), "--out", str(out), "--json"],
        timeout,
    )
    return seconds


def run_args(cols: Columns, train_file: Path, workdir: Path, holdout: int, workers: int | None) -> list[str]:
    """`manymodels run` flags for a data set (season length passed: 'int' data cannot infer it)."""
    args = [
        "run", "--data", str(train_file), "--keys", ",".join(cols.keys), "--time", cols.time,
        "--target", cols.target, "--covariates", ",".join(cols.covariates), "--freq", cols.freq,
        "--horizon", str(holdout), "--test-periods", str(holdout), "--season-length", str(cols.season_length),
        "--workdir", str(workdir), "--json", "--no-progress",
    ]
    if workers is not None:
        args += ["--workers", str(workers)]
    return args


def read_predictions(workdir: Path, score_id: str | None) -> tuple[pd.DataFrame, list[str], str]:
    """The `predictions` rows of this score id from WORKDIR/results.sqlite, its columns, and a note."""
    with sqlite3.connect(workdir / "results.sqlite") as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(predictions)")]
        rows = pd.read_sql_query("SELECT * FROM predictions WHERE score_id = ?", conn, params=(score_id,))
        note = ""
        if rows.empty:
            rows = pd.read_sql_query(
                "SELECT * FROM predictions WHERE scored_at = (SELECT MAX(scored_at) FROM predictions)", conn
            )
            note = f"no rows for score id {score_id!r}; used the latest scored_at"
    return rows, columns, note


def join_delivered(actual: pd.DataFrame, delivered: pd.DataFrame, cols: Columns) -> pd.DataFrame:
    """Held-out actuals left-joined with delivered rows on keys (as text) and time (parsed)."""
    left = actual.copy()
    right = delivered.copy()
    for frame in (left, right):
        for key in cols.keys:
            frame[key] = frame[key].astype(str)
        if cols.freq == "int":
            frame[cols.time] = pd.to_numeric(frame[cols.time]).astype("int64")
        else:
            frame[cols.time] = pd.to_datetime(frame[cols.time]).astype("datetime64[ns]")
    right = right.drop(columns=[c for c in right.columns if c in cols.covariates or c == cols.target])
    return left.merge(right, on=[*cols.keys, cols.time], how="left", validate="one_to_one")


def source_shares(joined: pd.DataFrame, columns: Sequence[str]) -> tuple[dict[str, float], bool]:
    """Share of delivered rows by `source`; by `is_fallback` when the store has no `source` yet."""
    delivered = joined[joined["prediction"].notna()]
    if "source" in columns:
        counts = delivered["source"].fillna("(null)").value_counts(normalize=True)
        return {str(k): float(v) for k, v in counts.items()}, True
    if "is_fallback" in columns:
        flag = delivered["is_fallback"].fillna(-1).astype(int).map({0: "is_fallback=0", 1: "is_fallback=1"})
        counts = flag.fillna("is_fallback=null").value_counts(normalize=True)
        return {str(k): float(v) for k, v in counts.items()}, False
    return {}, False


def interval_coverage(joined: pd.DataFrame, columns: Sequence[str], target: str) -> float | None:
    """Share of held-out rows with lower <= actual <= upper, over the rows that have both bounds;
    None when the store has no interval columns or no row has bounds."""
    if not {"lower", "upper"} <= set(columns):
        return None
    lower, upper = numeric(joined["lower"]), numeric(joined["upper"])
    bounded = lower.notna() & upper.notna()
    if not bounded.any():
        return None
    actual = joined[target].astype(float)
    inside = (lower <= actual) & (actual <= upper)
    return float(inside[bounded].mean())


def interval_note(joined: pd.DataFrame, columns: Sequence[str]) -> str:
    """Why coverage is n/a, or over how many rows it was measured."""
    if not {"lower", "upper"} <= set(columns):
        return "no lower/upper columns"
    rows = int((numeric(joined["lower"]).notna() & numeric(joined["upper"]).notna()).sum())
    return f"{rows}/{len(joined)} held-out rows have both bounds"


# Each default candidate trained alone and scored alone, through the CLI: a project file picks the
# candidate and a scoring chain that answers with each partition's model whatever its backtests
# ("latest"; trained with the global candidate alone, every partition's model is the global model,
# short series included).
ALONE_CHAIN = ["latest", "baseline"]


def default_candidates() -> list[str]:
    """The candidate set `manymodels` trains by default (read from its config, not restated here)."""
    sys.path.insert(0, str(REPO))
    from shared.config import ProjectConfig

    return list(ProjectConfig().training.candidates)


def alone_config(name: str) -> str:
    """The project TOML that trains `name` alone and scores every partition with it."""
    return (f"[training]\ncandidates = [{json.dumps(name)}]\nensemble = false\n\n"
            f"[scoring]\nchain = {json.dumps(ALONE_CHAIN)}\n")


def candidates_alone(split: Split, cols: Columns, folder: Path, suffix: str, holdout: int,
                     workers: int | None, timeout: float, names: Sequence[str]) -> dict[str, float]:
    """WAPE on the hold-out of each candidate trained and scored alone (same files as ours)."""
    train_file, future_file = folder / f"train{suffix}", folder / f"future{suffix}"
    out: dict[str, float] = {}
    for name in names:
        workdir = folder / f"alone-{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        config = folder / f"alone-{name}.toml"
        config.write_text(alone_config(name))
        run_cli([*run_args(cols, train_file, workdir, holdout, workers), "--config", str(config)], timeout)
        score_json, _ = run_cli(["score", "--workdir", str(workdir), "--data", str(future_file), "--json",
                                 "--no-progress"], timeout)
        delivered, _, _ = read_predictions(workdir, score_json.get("score_id"))
        joined = join_delivered(split.actual, delivered, cols)
        out[name] = wape(joined[cols.target].to_numpy(), joined["prediction"].to_numpy())
        shutil.rmtree(workdir, ignore_errors=True)
    return out


@dataclass
class OursResult:
    """What `manymodels score` delivered, measured against the hold-out."""

    wape: float
    wape_delivered_rows: float
    delivered_rows: int
    holdout_rows: int
    seconds: dict[str, float]
    sources: dict[str, float]
    source_column: bool
    coverage: float | None
    coverage_note: str
    run_json: dict[str, Any]
    score_json: dict[str, Any]
    note: str = ""
    candidates: Mapping[str, float] | None = None


def run_ours(
    split: Split, cols: Columns, folder: Path, suffix: str, holdout: int, workers: int | None, timeout: float
) -> OursResult:
    """Train file + future file on disk, `run` then `score`, predictions read back and joined."""
    train_file, future_file = folder / f"train{suffix}", folder / f"future{suffix}"
    write_table(split.train, train_file)
    write_table(split.future, future_file)
    workdir = folder / "mm"
    run_json, run_s = run_cli(run_args(cols, train_file, workdir, holdout, workers), timeout)
    score_json, score_s = run_cli(
        ["score", "--workdir", str(workdir), "--data", str(future_file), "--json", "--no-progress"], timeout
    )
    delivered, columns, note = read_predictions(workdir, score_json.get("score_id"))
    joined = join_delivered(split.actual, delivered, cols)
    has_pred = joined["prediction"].notna()
    sources, source_column = source_shares(joined, columns)
    return OursResult(
        wape=wape(joined[cols.target].to_numpy(), joined["prediction"].to_numpy()),
        wape_delivered_rows=wape(joined.loc[has_pred, cols.target].to_numpy(),
                                 joined.loc[has_pred, "prediction"].to_numpy()),
        delivered_rows=int(has_pred.sum()),
        holdout_rows=len(joined),
        seconds={"run": run_s, "score": score_s, "total": run_s + score_s},
        sources=sources,
        source_column=source_column,
        coverage=interval_coverage(joined, columns, cols.target),
        coverage_note=interval_note(joined, columns),
        run_json=run_json,
        score_json=score_json,
        note=note,
    )


# --------------------------------------------------------------------------- one data set


@dataclass
class DatasetResult:
    """Every figure of one data set (also what --json writes)."""

    name: str
    columns: dict[str, Any]
    series: int = 0
    train_rows: int = 0
    holdout_rows: int = 0
    dropped_series: int = 0
    generate_seconds: float | None = None
    ours: OursResult | None = None
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None

    def best_reference(self) -> tuple[str, float] | None:
        """The reference with the lowest WAPE."""
        scored = [(n, r["wape"]) for n, r in self.references.items() if math.isfinite(r["wape"])]
        return min(scored, key=lambda item: item[1]) if scored else None

    def passed(self) -> bool | None:
        """Ours strictly below every reference (None when something is missing)."""
        if self.ours is None or not self.references:
            return None
        return all(self.ours.wape < r["wape"] for r in self.references.values())

    def near_best_candidate(self) -> bool | None:
        """Ours within CANDIDATE_SLACK of the best candidate scored alone (None when not measured)."""
        if self.ours is None or not self.ours.candidates:
            return None
        return self.ours.wape <= (1 + CANDIDATE_SLACK) * min(self.ours.candidates.values())


def run_references(split: Split, cols: Columns, holdout: int, seed: int) -> dict[str, dict[str, float]]:
    """Every reference on the same hold-out, each timed (wall)."""
    out: dict[str, dict[str, float]] = {}
    actual = split.actual[cols.target].to_numpy()
    gbm_name = gbm_label()  # imports LightGBM outside the timed section
    for name, fn in REFERENCES.items():
        start = time.perf_counter()
        if fn is global_gbm_reference:
            pred = global_gbm_reference(split.train, split.future, cols, horizon=holdout, seed=seed)
            name = gbm_name
        else:
            pred = fn(split.train, split.future, cols)
        out[name] = {"wape": wape(actual, pred), "seconds": time.perf_counter() - start}
    return out


def benchmark_dataset(spec: DatasetSpec, folder: Path, args: argparse.Namespace) -> DatasetResult:
    """Load or generate, hold out, run ours and the references; errors are recorded, not raised."""
    result = DatasetResult(spec.name, asdict(spec.cols))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if spec.generate:
            source = folder / "panel.parquet"
            result.generate_seconds = generate_panel(spec, source, args.seed, args.timeout)
        else:
            assert spec.path is not None
            source = spec.path
        frame = prepare_frame(read_table(source), spec.cols)
        split = holdout_split(frame, spec.cols, args.holdout)
        result.series = int(series_ids(split.actual, spec.cols.keys).nunique())
        result.train_rows, result.holdout_rows = len(split.train), len(split.actual)
        result.dropped_series = split.dropped_series
        suffix = ".parquet" if spec.generate or source.suffix.lower() in {".parquet", ".pq"} else ".csv"
        try:
            result.ours = run_ours(split, spec.cols, folder, suffix, args.holdout, args.workers, args.timeout)
            if args.alone:
                result.ours.candidates = candidates_alone(split, spec.cols, folder, suffix, args.holdout,
                                                          args.workers, args.timeout, args.alone)
        except Exception as exc:  # noqa: BLE001 - the references' figures are still worth printing
            result.error = f"manymodels: {type(exc).__name__}: {exc}"
        result.references = run_references(split, spec.cols, args.holdout, args.seed)
    except Exception as exc:  # noqa: BLE001 - one broken data set must not hide the others' figures
        result.error = (result.error + "; " if result.error else "") + f"{type(exc).__name__}: {exc}"
    return result


# --------------------------------------------------------------------------- printing


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _header(res: DatasetResult) -> str:
    """What the data set is: sizes, keys, frequency, season."""
    c = res.columns
    text = (f"== {res.name}: {res.series} series, {res.train_rows} training rows, "
            f"{res.holdout_rows} held-out rows (keys {','.join(c['keys'])}; freq {c['freq']}; "
            f"season {c['season_length']})")
    return text + (f"; {res.dropped_series} series too short, dropped" if res.dropped_series else "")


def _ours_details(ours: OursResult) -> list[str]:
    """Candidates hook, delivered rows, sources, intervals and what `run` itself reported."""
    lines = []
    if ours.candidates:
        for name, value in ours.candidates.items():
            lines.append(f"   {'candidate ' + str(name) + ' alone':<34}{_fmt(value):>8}")
        best_name, best = min(ours.candidates.items(), key=lambda kv: kv[1])
        lines.append(f"   delivered / best candidate alone ({best_name}): {_fmt(ours.wape / best, 3)} "
                     f"(target <= {1 + CANDIDATE_SLACK:.2f})")
    else:
        lines.append("   candidates alone: not measured (--alone '')")
    delivered = f"   delivered rows: {ours.delivered_rows}/{ours.holdout_rows}"
    if ours.delivered_rows != ours.holdout_rows:
        only = _fmt(ours.wape_delivered_rows)
        delivered += f" (missing rows count as 0; WAPE on delivered rows only {only})"
    lines.append(delivered)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(ours.sources.items(), key=lambda kv: -kv[1]))
    prefix = "by source" if ours.source_column else "source column missing; by is_fallback"
    lines.append(f"   {prefix}: {shares or 'n/a'}")
    lines.append(f"   interval coverage (lower <= actual <= upper): {_fmt(ours.coverage)} ({ours.coverage_note})")
    run = ours.run_json
    if run:
        lines.append(
            f"   run says: trained {run.get('trained')} (ML {run.get('trained_ml')}, baseline only "
            f"{run.get('baseline_only')}), promoted {run.get('promoted')}, rejected {run.get('rejected')}, "
            f"failed {run.get('failed')}, skipped {run.get('skipped')}; its test-window WAPE "
            f"{run.get('model_wape')} vs baseline {run.get('baseline_wape')}"
        )
    if ours.note:
        lines.append(f"   note: {ours.note}")
    return lines


def format_table(res: DatasetResult) -> str:
    """The per-data-set table: WAPE and wall time of ours and every reference, then sources/intervals."""
    lines = [_header(res)]
    if res.generate_seconds is not None:
        lines.append(f"   generated with `manymodels generate` in {res.generate_seconds:.1f} s")
    lines.append(f"   {'method':<34}{'WAPE':>8}{'wall s':>9}")
    ours = res.ours
    if ours is not None:
        detail = f"(run {ours.seconds['run']:.1f} + score {ours.seconds['score']:.1f})"
        lines.append(f"   {'manymodels run + score (delivered)':<34}{_fmt(ours.wape):>8}"
                     f"{ours.seconds['total']:>9.1f}  {detail}")
    for name, ref in res.references.items():
        lines.append(f"   {name:<34}{_fmt(ref['wape']):>8}{ref['seconds']:>9.2f}")
    if ours is not None:
        lines += _ours_details(ours)
    if res.error:
        lines.append(f"   ERROR: {res.error}")
    return "\n".join(lines)


def summary_line(res: DatasetResult) -> str:
    """ours vs best reference (ratio) and PASS/FAIL for 'ours < every reference'."""
    best = res.best_reference()
    if res.ours is None or best is None:
        return f"{res.name:<10} incomplete ({res.error or 'no figures'})"
    ratio = res.ours.wape / best[1] if best[1] > 0 else float("nan")
    verdict = "PASS" if res.passed() else "FAIL"
    text = (f"{res.name:<10} ours {_fmt(res.ours.wape)} vs best reference {_fmt(best[1])} ({best[0]}): "
            f"ratio {_fmt(ratio, 2)}  {verdict} (ours < every reference)")
    near = res.near_best_candidate()
    if near is not None:
        name, value = min(res.ours.candidates.items(), key=lambda kv: kv[1])
        text += (f"; vs best candidate alone {_fmt(value)} ({name}): ratio {_fmt(res.ours.wape / value, 3)}  "
                 f"{'PASS' if near else 'FAIL'} (<= {1 + CANDIDATE_SLACK:.2f})")
    return text


def to_json(results: Sequence[DatasetResult], args: argparse.Namespace) -> dict[str, Any]:
    """Every figure, for --json."""
    out: dict[str, Any] = {"holdout": args.holdout, "quick": args.quick, "datasets": {}}
    for res in results:
        item = asdict(res)
        best = res.best_reference()
        item["best_reference"] = None if best is None else {"name": best[0], "wape": best[1]}
        item["ratio_to_best_reference"] = (
            res.ours.wape / best[1] if res.ours is not None and best is not None and best[1] > 0 else None
        )
        item["pass"] = res.passed()
        item["near_best_candidate"] = res.near_best_candidate()
        out["datasets"][res.name] = item
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (parsed in main(), never at import)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--datasets", help="comma-separated subset (default: cheese,walmart,weekly,daily"
                        " and every --dataset)")
    parser.add_argument("--cheese", default=str(SHARED_DATA / "cheese_scanner_weekly.csv"))
    parser.add_argument("--walmart", default=str(SHARED_DATA / "walmart_dept_weekly.csv"))
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH:keys=..;time=..;...",
                        help="an extra data set: NAME=PATH:keys=a,b;time=t;target=y;covariates=c1,c2;freq=F"
                        "[;season=S] (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller generated panels")
    parser.add_argument("--weekly-partitions", type=int, default=300)
    parser.add_argument("--weekly-periods", type=int, default=156)
    parser.add_argument("--daily-partitions", type=int, default=200)
    parser.add_argument("--daily-periods", type=int, default=730)
    parser.add_argument("--holdout", type=int, default=HOLDOUT, help="held-out rows per series (= horizon)")
    parser.add_argument("--workers", type=int, help="--workers for `manymodels run` (default: the CLI's)")
    parser.add_argument("--seed", type=int, default=0, help="generator and GBM seed")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per CLI call")
    parser.add_argument("--workdir-root", help="folder for the data sets' files and workdirs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the files and workdirs")
    parser.add_argument("--json", dest="json_out", metavar="OUT.json", help="write all figures here")
    parser.add_argument("--alone", default=None,
                        help="candidates to train and score alone, comma-separated (default: the default "
                        "candidate set; '' to skip)")
    args = parser.parse_args(argv)
    args.alone = (default_candidates() if args.alone is None
                  else [n.strip() for n in args.alone.split(",") if n.strip()])
    return args


def select_specs(args: argparse.Namespace) -> list[DatasetSpec]:
    """Built-ins plus --dataset entries, filtered by --datasets, in the order asked."""
    specs = builtin_specs(args)
    for text in args.dataset:
        spec = parse_dataset_option(text)
        specs[spec.name] = spec
    names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown data set(s): {', '.join(unknown)} (known: {', '.join(specs)})")
    return [specs[n] for n in names]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    specs = select_specs(args)
    if not cli_path().exists():
        raise SystemExit(f"{cli_path()} not found: run this with the project's venv python")
    temp_root = args.workdir_root is None
    root = Path(tempfile.mkdtemp(prefix="mm-accuracy-")) if temp_root else Path(args.workdir_root)
    root.mkdir(parents=True, exist_ok=True)
    results: list[DatasetResult] = []
    try:
        for spec in specs:
            if spec.path is not None and not spec.path.exists():
                print(f"== {spec.name}: skipped, {spec.path} not found\n", flush=True)
                continue
            folder = root / spec.name
            shutil.rmtree(folder, ignore_errors=True)  # an old workdir would hold champions of another run
            res = benchmark_dataset(spec, folder, args)
            results.append(res)
            print(format_table(res) + "\n", flush=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if temp_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            print(f"files and workdirs kept in {root}")
    print(f"summary (WAPE on the held-out last {args.holdout} rows of every series)")
    for res in results:
        print("  " + summary_line(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(to_json(results, args), indent=2, default=str) + "\n")
        print(f"figures written to {args.json_out}")


if __name__ == "__main__":
    main()
