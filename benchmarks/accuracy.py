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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the references module sits beside it
    sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
HOLDOUT = 12
RATIO_TARGET = 1.00  # delivered / best reference, on every set (issue 17)
GEOMEAN_TARGET = 0.97  # geometric mean of that ratio over all sets
COVERAGE_TARGET = (0.78, 0.85)  # of the 80 % intervals, on every set
CANDIDATE_SLACK = 0.02  # the delivered WAPE may exceed the best candidate scored alone by 2 % at most
PROJECT_CONFIG = ""  # --config: a project file every `run` of ours gets (to try settings)
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
    horizon: int | None = None  # held-out rows per series (None: --holdout)
    constant_key: str | None = None  # a one-series file: this key column is added with one value
    intermittent: float | None = None  # generated: share of intermittent-demand series


def default_season_length(freq: str) -> int:
    """Periods per season for the references; 'int' is taken as weekly scanner data (52)."""
    if freq == "int":
        return 52
    base = freq.split("-")[0].lstrip("0123456789").upper()
    table = {"W": 52, "D": 7, "B": 5, "M": 12, "MS": 12, "ME": 12, "Q": 4, "QS": 4, "QE": 4, "H": 24}
    return table.get(base, 1)


def builtin_specs(args: argparse.Namespace) -> dict[str, DatasetSpec]:
    """Every real set of ../shared/data (M4 with the M4 protocol's horizons) and three generated
    panels (weekly, daily, and an intermittent monthly one: mostly zeros, short series)."""
    weekly = (args.weekly_partitions, args.weekly_periods)
    daily = (args.daily_partitions, args.daily_periods)
    sparse = (args.intermittent_partitions, 36)
    if args.quick:
        weekly = (min(weekly[0], 60), min(weekly[1], 130))
        daily = (min(daily[0], 30), min(daily[1], 400))
        sparse = (min(sparse[0], 60), 36)
    gen_cols: dict[str, Any] = {
        "keys": ("store", "item"), "time": "date", "target": "sales", "covariates": ("price", "promo"),
    }
    data = Path(args.data_dir)
    m4 = {"hourly": ("h", 24, 48), "daily": ("D", 7, 14), "weekly": ("W", 52, 13), "monthly": ("MS", 12, 18)}
    specs = {
        "cheese": DatasetSpec(
            "cheese",
            Columns(("retailer",), "week", "volume", ("price", "disp"), "int", 52),
            path=data / "cheese_scanner_weekly.csv", horizon=12,
        ),
        "walmart": DatasetSpec(
            "walmart",
            Columns(("Store", "Dept"), "Date", "Weekly_Sales", ("IsHoliday",), "W-FRI", 52),
            path=data / "walmart_dept_weekly.csv", horizon=12,
        ),
    }
    for kind, (freq, season, horizon) in m4.items():
        specs[f"m4_{kind}"] = DatasetSpec(f"m4_{kind}", Columns(("id",), "date", "value", (), freq, season),
                                          path=data / f"m4_{kind}.csv", horizon=horizon)
    specs["wikipedia"] = DatasetSpec("wikipedia", Columns(("Page",), "date", "value", (), "D", 7),
                                     path=data / "wikipedia_traffic_daily.csv", horizon=14)
    specs["bike"] = DatasetSpec("bike", Columns(("series",), "dteday", "cnt", ("holiday", "workingday"), "D", 7),
                                path=data / "bike_sharing_daily.csv", horizon=14, constant_key="series")
    specs["weekly"] = DatasetSpec("weekly", Columns(**gen_cols, freq="W", season_length=52), generate=weekly,
                                  horizon=12)
    specs["daily"] = DatasetSpec("daily", Columns(**gen_cols, freq="D", season_length=7), generate=daily,
                                 horizon=14)
    specs["intermittent"] = DatasetSpec("intermittent", Columns(**gen_cols, freq="MS", season_length=12),
                                        generate=sparse, horizon=6, intermittent=0.8)
    return specs


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


def is_intermittent(train: pd.DataFrame, cols: Columns) -> bool:
    """A quarter or more of the training targets are zero: the intermittent-demand references run."""
    y = pd.to_numeric(train[cols.target], errors="coerce")
    return bool((y == 0).mean() >= 0.25)


def mase_scales(train: pd.DataFrame, cols: Columns) -> pd.Series:
    """Per series, the in-sample mean absolute seasonal difference (lag 1 when the series is shorter
    than two seasons): the denominator of MASE."""
    ids = series_ids(train, cols.keys)
    y = pd.to_numeric(train[cols.target], errors="coerce").astype(float)

    def scale(values: pd.Series) -> float:
        v = values.to_numpy()
        lag = cols.season_length if len(v) > 2 * cols.season_length else 1
        d = np.abs(v[lag:] - v[:-lag])
        d = d[np.isfinite(d)]
        return float(d.mean()) if d.size and d.mean() > 0 else float("nan")

    return y.groupby(ids, sort=False).apply(scale)


def mase(split: Split, cols: Columns, prediction: np.ndarray, scales: pd.Series) -> float:
    """Mean over series of (mean |error| / the series' MASE scale); series without a scale left out."""
    ids = series_ids(split.actual, cols.keys)
    err = pd.Series(np.abs(split.actual[cols.target].to_numpy(dtype=float)
                           - np.nan_to_num(np.asarray(prediction, dtype=float), nan=0.0)))
    per_series = err.groupby(ids.to_numpy(), sort=False).mean() / scales.reindex(ids.unique()).to_numpy()
    per_series = per_series[np.isfinite(per_series)]
    return float(per_series.mean()) if len(per_series) else float("nan")


def run_references(split: Split, cols: Columns, holdout: int, seed: int) -> dict[str, dict[str, float]]:
    """The field's libraries on the same hold-out (benchmarks/field_references.py), each timed."""
    from benchmarks.field_references import field_references

    actual = split.actual[cols.target].to_numpy()
    scales = mase_scales(split.train, cols)
    found = field_references(split.train, split.future, cols.keys, cols.time, cols.target, cols.covariates,
                             cols.freq, cols.season_length, seed, is_intermittent(split.train, cols))
    return {name: {"wape": wape(actual, pred), "mase": mase(split, cols, pred, scales), "seconds": seconds}
            for name, (pred, seconds) in found.items()}


def load_earlier_references(path: str) -> dict[str, dict[str, Any]]:
    """Per data set, what an earlier ``--json`` run recorded: its references and its hold-out shape."""
    saved = json.loads(Path(path).read_text())
    return {name: item for name, item in saved.get("datasets", {}).items() if item.get("references")}


def reused_references(earlier: Mapping[str, Any], result: "DatasetResult", name: str) -> dict[str, dict[str, float]]:
    """An earlier run's reference figures for this data set, refused unless its hold-out was the
    same (series, training rows, held-out rows): the references are deterministic and take minutes."""
    same = all(earlier.get(k) == getattr(result, k) for k in ("series", "train_rows", "holdout_rows", "horizon"))
    if not same:
        raise ValueError(f"--references-from: data set {name} was held out differently in that run")
    return {ref: dict(figures) for ref, figures in earlier["references"].items()}


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
    extra = ["--intermittent", str(spec.intermittent)] if spec.intermittent is not None else []
    _, seconds = run_cli(
        ["generate", "--partitions", str(partitions), "--periods", str(periods), "--freq", spec.cols.freq,
         "--seed", str(seed), "--out", str(out), "--json", *extra],
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
    if PROJECT_CONFIG:
        args += ["--config", PROJECT_CONFIG]
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
            stamps = pd.to_datetime(frame[cols.time])
            if isinstance(stamps.dtype, pd.DatetimeTZDtype):  # instants (hourly with offsets): on UTC,
                stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)  # as the store gives them
            frame[cols.time] = stamps.astype("datetime64[ns]")
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
    predictions: np.ndarray | None = None  # delivered, aligned with the held-out rows (NaN: missing)
    mase: float | None = None


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
        predictions=joined["prediction"].to_numpy(dtype=float),
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
    horizon: int = HOLDOUT
    generate_seconds: float | None = None
    ours: OursResult | None = None
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None

    def best_reference(self) -> tuple[str, float] | None:
        """The reference with the lowest WAPE."""
        scored = [(n, r["wape"]) for n, r in self.references.items() if math.isfinite(r["wape"])]
        return min(scored, key=lambda item: item[1]) if scored else None

    def ratio(self) -> float | None:
        """Delivered WAPE / the best reference's (None when something is missing)."""
        best = self.best_reference()
        if self.ours is None or best is None or not best[1] > 0:
            return None
        return self.ours.wape / best[1]

    def passed(self) -> bool | None:
        """Delivered / best reference <= RATIO_TARGET and coverage within COVERAGE_TARGET."""
        ratio = self.ratio()
        if ratio is None:
            return None
        return ratio <= RATIO_TARGET and covered(self.ours.coverage if self.ours else None)

    def near_best_candidate(self) -> bool | None:
        """Ours within CANDIDATE_SLACK of the best candidate scored alone (None when not measured)."""
        if self.ours is None or not self.ours.candidates:
            return None
        return self.ours.wape <= (1 + CANDIDATE_SLACK) * min(self.ours.candidates.values())


def benchmark_dataset(spec: DatasetSpec, folder: Path, args: argparse.Namespace) -> DatasetResult:
    """Load or generate, hold out, run ours and the references; errors are recorded, not raised."""
    result = DatasetResult(spec.name, asdict(spec.cols))
    holdout = int(spec.horizon or args.holdout)
    result.horizon = holdout
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if spec.generate:
            source = folder / "panel.parquet"
            result.generate_seconds = generate_panel(spec, source, args.seed, args.timeout)
        else:
            assert spec.path is not None
            source = spec.path
        raw = read_table(source)
        if spec.constant_key:
            raw[spec.constant_key] = spec.name
        frame = prepare_frame(raw, spec.cols)
        split = holdout_split(frame, spec.cols, holdout)
        result.series = int(series_ids(split.actual, spec.cols.keys).nunique())
        result.train_rows, result.holdout_rows = len(split.train), len(split.actual)
        result.dropped_series = split.dropped_series
        suffix = ".parquet" if spec.generate or source.suffix.lower() in {".parquet", ".pq"} else ".csv"
        try:
            result.ours = run_ours(split, spec.cols, folder, suffix, holdout, args.workers, args.timeout)
            result.ours.mase = mase(split, spec.cols, result.ours.predictions, mase_scales(split.train, spec.cols))
            if args.alone:
                result.ours.candidates = candidates_alone(split, spec.cols, folder, suffix, holdout,
                                                          args.workers, args.timeout, args.alone)
        except Exception as exc:  # noqa: BLE001 - the references' figures are still worth printing
            result.error = f"manymodels: {type(exc).__name__}: {exc}"
        earlier = (args.earlier_references or {}).get(spec.name)
        if earlier is not None:
            result.references = reused_references(earlier, result, spec.name)
        elif not args.no_references:
            result.references = run_references(split, spec.cols, holdout, args.seed)
    except Exception as exc:  # noqa: BLE001 - one broken data set must not hide the others' figures
        result.error = (result.error + "; " if result.error else "") + f"{type(exc).__name__}: {exc}"
    return result


# --------------------------------------------------------------------------- printing


def covered(coverage: float | None) -> bool:
    return coverage is not None and COVERAGE_TARGET[0] <= coverage <= COVERAGE_TARGET[1]


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return float(math.exp(sum(math.log(v) for v in values) / len(values))) if values else float("nan")


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
    lines.append(f"   {'method':<34}{'WAPE':>8}{'MASE':>8}{'wall s':>9}")
    ours = res.ours
    if ours is not None:
        detail = f"(run {ours.seconds['run']:.1f} + score {ours.seconds['score']:.1f})"
        lines.append(f"   {'manymodels run + score (delivered)':<34}{_fmt(ours.wape):>8}{_fmt(ours.mase):>8}"
                     f"{ours.seconds['total']:>9.1f}  {detail}")
    for name, ref in res.references.items():
        lines.append(f"   {name:<34}{_fmt(ref['wape']):>8}{_fmt(ref.get('mase')):>8}{ref['seconds']:>9.2f}")
    if ours is not None:
        lines += _ours_details(ours)
    if res.error:
        lines.append(f"   ERROR: {res.error}")
    return "\n".join(lines)


def summary_line(res: DatasetResult) -> str:
    """One row of the summary table: delivered, best reference, ratio, MASE, coverage, sources, wall."""
    best = res.best_reference()
    if res.ours is None or best is None:
        return f"| {res.name} | incomplete: {res.error or 'no figures'} |||||||"
    ours = res.ours
    ref = res.references[best[0]]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(ours.sources.items(), key=lambda kv: -kv[1]))
    verdict = "PASS" if res.passed() else "FAIL"
    return (f"| {res.name} | {_fmt(ours.wape)} | {_fmt(best[1])} ({best[0]}) | {_fmt(res.ratio(), 3)} | "
            f"{_fmt(ours.mase, 2)} / {_fmt(ref.get('mase'), 2)} | {_fmt(ours.coverage, 3)} | {shares} | "
            f"{ours.seconds['total']:.1f} | {verdict} |")


def summary_table(results: Sequence[DatasetResult]) -> list[str]:
    """The one table of the run, and its verdicts."""
    lines = ["| data set | delivered WAPE | best reference | delivered / best | MASE ours / best | "
             "80 % coverage | sources | wall s (run + score) | verdict |",
             "|---|---:|---|---:|---:|---:|---|---:|---|"]
    lines += [summary_line(res) for res in results]
    ratios = [res.ratio() for res in results]
    gm = geometric_mean([r for r in ratios if r is not None])
    worst = max((r for r in ratios if r is not None), default=float("nan"))
    coverages = [res.ours.coverage for res in results if res.ours is not None]
    lines.append(f"geometric mean of delivered / best: {_fmt(gm, 3)} (target <= {GEOMEAN_TARGET:.2f}); "
                 f"worst set {_fmt(worst, 3)} (target <= {RATIO_TARGET:.2f}); coverage "
                 f"{_fmt(min((c for c in coverages if c is not None), default=None), 3)}-"
                 f"{_fmt(max((c for c in coverages if c is not None), default=None), 3)} "
                 f"(target {COVERAGE_TARGET[0]:.2f}-{COVERAGE_TARGET[1]:.2f})")
    return lines


def to_json(results: Sequence[DatasetResult], args: argparse.Namespace) -> dict[str, Any]:
    """Every figure, for --json."""
    out: dict[str, Any] = {"quick": args.quick, "datasets": {}}
    for res in results:
        item = asdict(res)
        if item.get("ours"):
            item["ours"].pop("predictions", None)
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
    parser.add_argument("--data-dir", default=str(SHARED_DATA),
                        help="folder of the real data sets (default: ../shared/data beside the repo)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH:keys=..;time=..;...",
                        help="an extra data set: NAME=PATH:keys=a,b;time=t;target=y;covariates=c1,c2;freq=F"
                        "[;season=S] (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller generated panels")
    parser.add_argument("--weekly-partitions", type=int, default=300)
    parser.add_argument("--weekly-periods", type=int, default=156)
    parser.add_argument("--daily-partitions", type=int, default=200)
    parser.add_argument("--daily-periods", type=int, default=730)
    parser.add_argument("--intermittent-partitions", type=int, default=300)
    parser.add_argument("--holdout", type=int, default=HOLDOUT,
                        help="held-out rows per series (= horizon) of --dataset sets (the built-in ones have theirs)")
    parser.add_argument("--workers", type=int, help="--workers for `manymodels run` (default: the CLI's)")
    parser.add_argument("--seed", type=int, default=0, help="generator and GBM seed")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per CLI call")
    parser.add_argument("--workdir-root", help="folder for the data sets' files and workdirs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the files and workdirs")
    parser.add_argument("--json", dest="json_out", metavar="OUT.json", help="write all figures here")
    parser.add_argument("--config", default="", help="a project TOML passed to every `run` of ours")
    parser.add_argument("--no-references", action="store_true",
                        help="ours only (the references take minutes: AutoARIMA on long seasonal series)")
    parser.add_argument("--references-from", metavar="EARLIER.json",
                        help="reuse the references' figures of an earlier --json run on the same hold-outs "
                        "(checked: same series and row counts); the table says so")
    parser.add_argument("--alone", default="",
                        help="candidates to train and score alone, comma-separated ('default': the default "
                        "candidate set; default: none)")
    args = parser.parse_args(argv)
    args.earlier_references = load_earlier_references(args.references_from) if args.references_from else {}
    args.alone = (default_candidates() if args.alone == "default"
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
    global PROJECT_CONFIG
    PROJECT_CONFIG = str(Path(args.config).resolve()) if args.config else ""
    specs = select_specs(args)
    if not cli_path().exists():
        raise SystemExit(f"{cli_path()} not found: run this with the project's venv python")
    load_before = f"{os.getloadavg()[0]:.2f}"
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
    print(f"summary (WAPE on each series' held-out last h rows; load average before: {load_before}, "
          f"after: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs)")
    for line in summary_table(results):
        print(line)
    if args.references_from:
        print(f"references' figures reused from {args.references_from} (an earlier run of this script on the "
              f"same hold-outs), not run again")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(to_json(results, args), indent=2, default=str) + "\n")
        print(f"figures written to {args.json_out}")


if __name__ == "__main__":
    main()
