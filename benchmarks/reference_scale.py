"""The reference architecture's scale on one 2-core machine, both shapes, with the field's peers (issue 22).

The reference (Azure's many-models solution accelerator) trains 40 million rows / 10,000 store x
product models in about 30 minutes on 192 vCPUs and batch-scores them in about 20. This script
generates a panel of that kind (streamed, seeded: ``manymodels generate``, store x item series
with price and promotion covariates) in one of two shapes, one command per shape:

* ``--shape long`` (default): 10,000 daily series of 4,000 days (~40 M rows), horizon 28;
* ``--shape short``: 100,000 weekly series of 104 weeks (~10 M rows), horizon 13.

and one or both panels (``--panel clean|noisy|both``):

* clean: the generated panel (low noise: most partitions' models beat their baseline and are promoted);
* noisy: the same panel with strong multiplicative lognormal noise on the target (``--noise-sd``,
  default 0.8; streamed batch by batch with pyarrow, seeded, bounded memory), so most partitions'
  models miss the promotion rule and are NOT promoted: scoring then runs through the fallbacks.

Each series' last h rows are held out (``benchmarks.accuracy.holdout_split``, applied batch by batch
to whole series: bounded memory): the pipeline trains on the rest and ``score`` forecasts the held-out
rows from a scoring file (keys, dates, covariates; no target), as ``benchmarks/accuracy.py`` does. Every
stage runs through the CLI as a user would, each in its own process, sampling the resident memory of
the whole process tree (the CLI and its workers) every 50 ms:

long shape, per panel: ``ingest``; ``train`` with the loglinear-only candidate set (clean panel only,
    its own workdir); then the default set: ``ingest``, ``train``, ``promote`` (the promoted share is
    printed), ``score`` (the held-out rows, into the SQL store);
short shape, per panel: ``manymodels run`` (default candidates: ingest, train, promote, score, report)
    as one command, its own per-stage seconds printed;
incremental (first panel): 5 % of the partitions get late corrections (their last h training rows
    +10 %) in a new file, and the pipeline runs again on it (only the changed partitions retrain);
peers (every panel) on a sample of the same panel (the first ``--peer-partitions`` series, default
    1,000), on the same training rows and the same held-out rows:
    * joblib: ``joblib.Parallel`` over partitions, pandas features, the baseline and loglinear
      candidates (validation pick, test fit, final fit): what a user would write;
    * statsforecast ``AutoETS`` (season from the frequency; ETS takes at most 24, so weekly data is
      non-seasonal), ``n_jobs`` = workers;
    * mlforecast with LightGBM, lags, rolling means, calendar and covariates
      (``benchmarks.field_references.mlforecast_lightgbm``).
    For each: wall, ms per series and the WAPE on the held-out rows (joblib timed after its pool
    has started; AutoETS timed on its ``forecast`` call, the frame preparation not counted; mlforecast
    as ``field_references`` times it). Ours: ms per series of train + promote + score over all
    partitions, and the WAPE of what ``score`` delivered for the sample's partitions (and for all).
    ``--ridge`` adds the ridge solve before/after (scikit-learn ``Ridge.fit`` vs the direct solve).

Targets (issue 22, 2 cores): long shape: train loglinear-only <= 60 s, train default <= 120 s, score
<= 15 s (each panel), whole pipeline (ingest + train + promote + score) <= 180 s, ingest peak <= 3 GB;
short shape: whole ``run`` (default candidates) <= 600 s, peak memory <= 4 GB, the incremental rerun
(5 % changed) <= 8 % of the full run; both: ours faster per series than AutoETS, and a lower WAPE on
the sample than AutoETS and mlforecast.

It prints per stage: wall, throughput, peak RSS of the process tree and the load average; then the
targets with PASS/MISS, the ratios ours / each peer (time and WAPE, so the figures
travel between machines) and the load average before and after. ``--json`` writes every figure.

    python benchmarks/reference_scale.py                                  # long: 10,000 x 4,000 days
    python benchmarks/reference_scale.py --shape short                    # short: 100,000 x 104 weeks
    python benchmarks/reference_scale.py --panel both --json long.json    # clean and noisy panels
    # AutoETS dominates the peers' time on long daily series (~0.6 s a series at 800 days, more at
    # 4,000): --peer-partitions lowers it, --skip-peer drops the peers
    # smoke runs (a few minutes each on 2 cores):
    python benchmarks/reference_scale.py --shape short --partitions 2000
    python benchmarks/reference_scale.py --shape long --partitions 300 --periods 800 --panel both \\
        --peer-partitions 100
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute  # noqa: E402,F401
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import (Columns, default_season_length, holdout_split, join_delivered,  # noqa: E402
                                 read_predictions, source_shares, wape)
from benchmarks.ingest_scale import cli, run_measured  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """A panel shape: its default size, frequency and forecast horizon."""

    name: str
    partitions: int
    periods: int
    freq: str
    horizon: int


SHAPES = {"long": Shape("long", 10_000, 4_000, "D", 28), "short": Shape("short", 100_000, 104, "W", 13)}
KEYS, TIME, TARGET, COVARIATES = ("store", "item"), "date", "sales", ("price", "promo")
CHANGED_SHARE = 0.05
PEER_PARTITIONS = 1_000
NOISE_SD = 0.8
BATCH_ROWS = 1_000_000
# issue 22's targets (2 cores, 24 GB)
TARGETS = {
    "long": {"train_loglinear_s": 60.0, "train_default_s": 120.0, "score_s": 15.0, "pipeline_s": 180.0,
             "ingest_peak_gb": 3.0},
    "short": {"run_s": 600.0, "peak_gb": 4.0, "incremental_share": 0.08},
}


def columns(shape: Shape) -> Columns:
    """The generated panel's columns, as benchmarks/accuracy.py describes a data set."""
    return Columns(KEYS, TIME, TARGET, COVARIATES, shape.freq, default_season_length(shape.freq))


def project_toml(candidates: list[str] | None, workers: int, shape: Shape) -> str:
    """The project file of a workdir: the shape's frequency and horizon, a candidate set (None: default)."""
    text = (f'[data]\nfreq = "{shape.freq}"\ncovariates = {json.dumps(list(COVARIATES))}\n\n'
            f"[forecast]\nhorizon = {shape.horizon}\ntest_periods = {shape.horizon}\n\n"
            f"[runner]\nworkers = {workers}\nprogress = false\n")
    if candidates is not None:
        text += f"\n[training]\ncandidates = {json.dumps(candidates)}\nensemble = false\n"
        if "global" not in candidates:  # nothing asks for the global model: it is not fitted
            text += '\n[scoring]\nchain = ["production", "unpromoted", "baseline"]\n'
    return text


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def stage(name: str, argv: list[str], work: Path, count: int, unit: str) -> dict[str, Any]:
    """One CLI command, measured: wall, throughput, peak RSS of its process tree, its JSON summary."""
    load = load_average()
    wall, peak, stdout = run_measured([*cli(), *argv, "--json"], work)
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    out = {"stage": name, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 2**30, 2), "count": count,
           "unit": unit, "per_s": round(count / wall, 1) if wall > 0 else None, "load_1m": load,
           "summary": summary}
    print(f"  {name:<36} {wall:8.1f} s  {out['per_s'] or 0:>12,.1f} {unit}/s  peak RSS "
          f"{out['peak_rss_gb']:.2f} GB  (load {load:.1f})", flush=True)
    problems = summary.get("problems") if isinstance(summary, dict) else None
    if problems:
        print(f"    problems reported: {problems}", flush=True)
    return out


def generate(path: Path, partitions: int, periods: int, freq: str, seed: int, work: Path) -> dict[str, Any]:
    argv = ["generate", "--partitions", str(partitions), "--periods", str(periods), "--freq", freq,
            "--seed", str(seed), "--out", str(path)]
    return stage("generate (streamed)", argv, work, partitions * periods, "rows")


# --------------------------------------------------------------------------- panel files, streamed


@dataclass
class PanelFiles:
    """One panel held out: the training file, the scoring file (held-out rows, no target), the actuals."""

    kind: str
    train: Path
    future: Path
    actual: Path
    train_rows: int = 0
    holdout_rows: int = 0
    series: int = 0
    dropped_series: int = 0
    seconds: float = 0.0


def split_panel(source: Path, folder: Path, kind: str, shape: Shape, noise_sd: float | None,
                seed: int) -> PanelFiles:
    """Hold out each series' last h rows, batch by batch (bounded memory), optionally after strong
    multiplicative noise on the target: sales * exp(sd * z - sd^2 / 2), seeded per batch.

    The generator writes series one after another; a batch's last series may continue in the next
    batch, so it is carried over and split with it (whole series only reach ``holdout_split``).
    """
    began = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    files = PanelFiles(kind, folder / "train.parquet", folder / "future.parquet", folder / "actual.parquet")
    cols = Columns(KEYS, TIME, TARGET, COVARIATES, shape.freq)
    reader = pq.ParquetFile(source)
    schema = reader.schema_arrow.remove_metadata()
    future_schema = schema.remove(schema.get_field_index(TARGET))
    writers = {"train": pq.ParquetWriter(files.train, schema, compression="zstd"),
               "future": pq.ParquetWriter(files.future, future_schema, compression="zstd"),
               "actual": pq.ParquetWriter(files.actual, schema, compression="zstd")}

    def write(frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        split = holdout_split(frame, cols, shape.horizon)
        files.dropped_series += split.dropped_series
        files.train_rows += len(split.train)
        files.holdout_rows += len(split.actual)
        files.series += int(split.actual[list(KEYS)].drop_duplicates().shape[0])
        writers["train"].write_table(pa.Table.from_pandas(split.train, schema=schema, preserve_index=False))
        writers["future"].write_table(pa.Table.from_pandas(split.future, schema=future_schema,
                                                           preserve_index=False))
        writers["actual"].write_table(pa.Table.from_pandas(split.actual, schema=schema, preserve_index=False))

    try:
        carry = None
        for number, batch in enumerate(reader.iter_batches(batch_size=BATCH_ROWS)):
            frame = batch.to_pandas()
            if noise_sd:
                rng = np.random.default_rng([seed, 22, number])
                factor = np.exp(noise_sd * rng.standard_normal(len(frame)) - noise_sd**2 / 2)
                frame[TARGET] = np.round(frame[TARGET].to_numpy(dtype=np.float64) * factor, 2)
            if carry is not None:
                frame = pd.concat([carry, frame], ignore_index=True)
            last = frame.iloc[-1]
            tail = ((frame[KEYS[0]] == last[KEYS[0]]) & (frame[KEYS[1]] == last[KEYS[1]])).to_numpy()
            carry = frame[tail].reset_index(drop=True)
            write(frame[~tail].reset_index(drop=True))
        if carry is not None:
            write(carry)
    finally:
        for writer in writers.values():
            writer.close()
    files.seconds = round(time.perf_counter() - began, 1)
    return files


def panel_keys(path: Path) -> list[str]:
    """The file's distinct 'store|item' keys, batch by batch."""
    found: set[str] = set()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=list(KEYS)):
        key = pa.compute.binary_join_element_wise(pa.compute.cast(batch.column(0), pa.string()),
                                                  pa.compute.cast(batch.column(1), pa.string()), "|")
        found.update(pa.compute.unique(key).to_pylist())
    return sorted(found)


def corrected_copy(source: Path, target: Path, share: float, horizon: int, seed: int) -> int:
    """The same file where `share` of the partitions had their last `horizon` periods corrected
    (+10 %), written batch by batch (never the whole file in memory); returns the changed partitions."""
    rng = np.random.default_rng(seed)
    keys = panel_keys(source)
    chosen = rng.choice(len(keys), size=max(1, round(share * len(keys))), replace=False)
    wanted = pa.array(sorted(keys[i] for i in chosen))
    reader = pq.ParquetFile(source)
    dates: set[Any] = set()
    for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=[TIME]):
        dates.update(pa.compute.unique(batch.column(0)).to_pylist())
    cutoff = pa.scalar(sorted(dates)[-horizon], type=reader.schema_arrow.field(TIME).type)
    column = reader.schema_arrow.get_field_index(TARGET)
    with pq.ParquetWriter(target, reader.schema_arrow, compression="zstd") as writer:
        for batch in reader.iter_batches(batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            key = pa.compute.binary_join_element_wise(pa.compute.cast(table[KEYS[0]], pa.string()),
                                                      pa.compute.cast(table[KEYS[1]], pa.string()), "|")
            hit = pa.compute.is_in(key, value_set=wanted).to_numpy(zero_copy_only=False)
            late = pa.compute.greater_equal(table[TIME], cutoff).to_numpy(zero_copy_only=False)
            sales = table[TARGET].to_numpy(zero_copy_only=False).astype(np.float64)
            mask = hit & late
            sales[mask] = np.round(sales[mask] * 1.1, 2)
            table = table.set_column(column, table.schema.field(column),
                                     pa.array(sales).cast(table.schema.field(column).type))
            writer.write_table(table)
    return len(wanted)


def first_partitions(panel: Path, partitions: int) -> pd.DataFrame:
    """The rows of the file's first `partitions` series (the generator writes series one after
    another: read batch by batch, and stop at the first batch that reaches past them)."""
    frames, chosen = [], set()
    for batch in pq.ParquetFile(panel).iter_batches(batch_size=500_000):
        frame = batch.to_pandas()
        keys = list(zip(frame[KEYS[0]], frame[KEYS[1]]))
        for key in dict.fromkeys(keys):
            if len(chosen) >= partitions:
                break
            chosen.add(key)
        inside = [k in chosen for k in keys]
        frames.append(frame[inside])
        if not all(inside):
            break
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- ours, as delivered


def delivered_wape(workdir: Path, score_id: str | None, actual: pd.DataFrame, sample: pd.DataFrame,
                   cols: Columns) -> dict[str, Any]:
    """WAPE of what `score` delivered (read back from the SQL store) on all held-out rows and on the
    sample's; a held-out row without a delivered prediction counts as 0 (benchmarks/accuracy.py)."""
    delivered, names, note = read_predictions(workdir, score_id)
    joined = join_delivered(actual, delivered, cols)
    inside = join_delivered(sample, delivered, cols)
    sources, _ = source_shares(joined, names)
    return {"wape_all": round(wape(joined[TARGET].to_numpy(), joined["prediction"].to_numpy()), 5),
            "wape_sample": round(wape(inside[TARGET].to_numpy(), inside["prediction"].to_numpy()), 5),
            "delivered_rows": int(joined["prediction"].notna().sum()), "holdout_rows": len(joined),
            "sources": {k: round(v, 4) for k, v in sources.items()}, "note": note}


def promoted_share(summary: dict[str, Any], partitions: int) -> float:
    """Share of the partitions whose model of this run is in production after `promote` (or `run`)."""
    promoted = summary.get("in_production")
    if promoted is None:  # `run` reports promoted (new + unchanged)
        promoted = summary.get("promoted", 0)
    return promoted / max(partitions, 1)


def say_promoted(summary: dict[str, Any], partitions: int) -> float:
    share = promoted_share(summary, partitions)
    reasons = summary.get("reasons") or summary.get("rejection_reasons") or {}
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    print(f"    promoted share: {share:.1%} of {partitions:,} partitions"
          + (f" (rejected: {why})" if why else ""), flush=True)
    return share


def say_delivered(ours: dict[str, Any], n: int, sample_series: int) -> None:
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(ours["sources"].items(), key=lambda kv: -kv[1]))
    print(f"    delivered on the held-out rows: WAPE {ours['wape_all']} (all {n:,} partitions), "
          f"{ours['wape_sample']} (the {sample_series:,}-series sample); {ours['delivered_rows']:,}/"
          f"{ours['holdout_rows']:,} rows delivered; by source: {shares or 'n/a'}", flush=True)


# --------------------------------------------------------------------------- peers


def joblib_peer(train: pd.DataFrame, actual: pd.DataFrame, shape: Shape, candidates: list[str],
                workers: int) -> dict[str, Any]:
    """What a user writes: joblib.Parallel over partitions, pandas features, the same candidates; the
    last h rows of each partition (the held-out rows) are its test window."""
    from joblib import Parallel, delayed

    from shared.config import ProjectConfig
    from shared.data.validation import validate
    from shared.keys import PARTITION_ID

    cfg = ProjectConfig().with_overrides({"data.freq": shape.freq, "data.covariates": list(COVARIATES),
                                          "forecast.horizon": shape.horizon,
                                          "forecast.test_periods": shape.horizon,
                                          "validation.gaps": "keep"})  # no added rows: the last h are the held-out
    rows = pd.concat([train, actual], ignore_index=True).sort_values([*KEYS, TIME], kind="stable")
    validated, _ = validate(rows.reset_index(drop=True), cfg)
    parts = [part.reset_index(drop=True) for _, part in validated.groupby(PARTITION_ID, sort=False)]
    with Parallel(n_jobs=workers) as parallel:
        # the workers started and their imports done before the clock starts (a steady loop's cost,
        # not the pool's start-up, which a 100-series smoke sample would otherwise be dominated by)
        parallel(delayed(peer_partition)(parts[0], cfg, candidates, shape.horizon) for _ in range(workers))
        began = time.perf_counter()
        sums = parallel(delayed(peer_partition)(part, cfg, candidates, shape.horizon)
                        for part in parts)
        wall = time.perf_counter() - began
    err, act = (float(sum(s[i] for s in sums)) for i in (0, 1))
    return {"series": len(parts), "wall_s": round(wall, 2), "ms_per_series": round(1000 * wall / len(parts), 2),
            "test_wape": round(err / act, 5) if act else None}


def peer_partition(part: pd.DataFrame, cfg: Any, candidates: list[str], h: int) -> tuple[float, float]:
    """One partition the obvious way: pandas features, each candidate fitted before the validation
    window and scored on it, the best refitted before the test window (the last h rows) and scored,
    then on all rows. Returns sum |error| and sum |actual| over the test window."""
    from shared.models.candidates import make_candidate
    from shared.models.features import FeatureSpec, pandas_partition_features

    features = pandas_partition_features(part, cfg)
    X = features.to_numpy(dtype=float)
    y = part[cfg.data.target].to_numpy(dtype=float)
    spec = FeatureSpec.from_config(cfg)
    v = int(cfg.forecast.validation_periods)
    test, val = len(y) - h, len(y) - h - v
    if val < int(cfg.forecast.min_train_periods):  # too short for the models: the moving average
        candidates = ["baseline"]
        val = max(1, val)
    best, best_err = candidates[0], np.inf
    for name in candidates:
        model = make_candidate(name, cfg, spec).fit(X[:val], y[:val])
        err = np.abs(model.predict(X[val:test]) - y[val:test]).sum()
        if err < best_err:
            best, best_err = name, err
    model = make_candidate(best, cfg, spec).fit(X[:test], y[:test])
    prediction = np.nan_to_num(np.asarray(model.predict(X[test:]), dtype=float), nan=0.0)
    make_candidate(best, cfg, spec).fit(X, y)
    return float(np.abs(prediction - y[test:]).sum()), float(np.abs(y[test:]).sum())


def autoets_peer(train: pd.DataFrame, actual: pd.DataFrame, shape: Shape, workers: int) -> dict[str, Any]:
    """statsforecast's AutoETS per series (season from the frequency, at most 24 as statsforecast
    allows ETS; weekly: non-seasonal), n_jobs = workers, naive fallback for series too short."""
    from statsforecast import StatsForecast
    from statsforecast.models import AutoETS, Naive

    from benchmarks.field_references import DS, UID, Y, _by_step, long_frames, series_labels, sf_freq

    cols = columns(shape)
    future = actual.drop(columns=[TARGET])
    tr, _, steps, freq = long_frames(train, future, KEYS, TIME, TARGET, COVARIATES, shape.freq)
    season = cols.season_length if 1 < cols.season_length <= 24 else 1
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = StatsForecast(models=[AutoETS(season_length=season)], freq=sf_freq(freq), n_jobs=workers,
                           fallback_model=Naive()).forecast(df=tr[[UID, DS, Y]], h=int(steps.max()))
    wall = time.perf_counter() - began
    fc = fc.reset_index() if UID not in fc.columns else fc
    prediction = _by_step(fc, "AutoETS", series_labels(future, KEYS).to_numpy(), steps)
    series = int(tr[UID].nunique())
    return {"series": series, "wall_s": round(wall, 2), "ms_per_series": round(1000 * wall / series, 2),
            "test_wape": round(wape(actual[TARGET].to_numpy(), prediction), 5), "season_length": season}


def mlforecast_peer(train: pd.DataFrame, actual: pd.DataFrame, shape: Shape, seed: int) -> dict[str, Any]:
    """mlforecast + LightGBM, one global model (benchmarks/field_references.py's reference)."""
    from benchmarks.field_references import mlforecast_lightgbm

    cols = columns(shape)
    future = actual.drop(columns=[TARGET])
    prediction, wall = mlforecast_lightgbm(train, future, KEYS, TIME, TARGET, COVARIATES, shape.freq,
                                           cols.season_length, seed)
    series = int(actual[list(KEYS)].drop_duplicates().shape[0])
    return {"series": series, "wall_s": round(wall, 2), "ms_per_series": round(1000 * wall / series, 2),
            "test_wape": round(wape(actual[TARGET].to_numpy(), prediction), 5)}


def ridge_before_after(train: pd.DataFrame, shape: Shape) -> dict[str, Any]:
    """The per-partition ridge systems solved directly (now) against scikit-learn's Ridge.fit
    (before release 0.2), on the sample's training rows: test-window WAPE and time of each."""
    from sklearn.linear_model import Ridge

    import shared.models.candidates as candidates
    from shared.config import ProjectConfig
    from shared.data.validation import validate
    from shared.models.training import train_batch

    cfg = ProjectConfig().with_overrides({"data.freq": shape.freq, "data.covariates": list(COVARIATES),
                                          "forecast.horizon": shape.horizon,
                                          "forecast.test_periods": shape.horizon, "training.candidates": ["loglinear"],
                                          "training.ensemble": False})
    frame, _ = validate(train, cfg)
    out = {}
    direct = candidates.ridge_fit
    for label, fit in (("before: scikit-learn Ridge.fit", lambda X, y, a: Ridge(alpha=a).fit(X, y)),
                       ("after: direct normal-equation solve", direct)):
        candidates.ridge_fit = fit
        try:
            began = time.perf_counter()
            results = train_batch(frame, cfg)
            seconds = time.perf_counter() - began
        finally:
            candidates.ridge_fit = direct
        err = act = 0.0
        for r in results:
            for point in r.to_row().get("backtest") or []:
                if point.get("actual") is not None and point.get("prediction") is not None:
                    err += abs(point["prediction"] - point["actual"])
                    act += abs(point["actual"])
        out[label] = {"test_wape": round(err / act, 5) if act else None,
                      "ms_per_partition": round(1000 * seconds / max(len(results), 1), 2)}
    return out


def run_peers(files: PanelFiles, shape: Shape, args: argparse.Namespace, ours: dict[str, Any],
              sample: tuple[pd.DataFrame, pd.DataFrame]) -> dict[str, Any]:
    """Every peer on the sample; ratios ours / peer (time per series and WAPE)."""
    train, actual = sample
    series = int(actual[list(KEYS)].drop_duplicates().shape[0])
    print(f"  peers on the first {series:,} series ({len(train):,} training rows, {len(actual):,} held-out "
          f"rows; {args.workers} workers):", flush=True)
    peers: dict[str, Any] = {}
    for name, run in (("joblib (baseline + loglinear)",
                       lambda: joblib_peer(train, actual, shape, ["baseline", "loglinear"], args.workers)),
                      ("statsforecast AutoETS", lambda: autoets_peer(train, actual, shape, args.workers)),
                      ("mlforecast LightGBM", lambda: mlforecast_peer(train, actual, shape, args.seed))):
        load = load_average()
        try:
            peers[name] = {**run(), "load_1m": load}
        except Exception as exc:  # noqa: BLE001 - one broken peer must not hide the others' figures
            peers[name] = {"error": f"{type(exc).__name__}: {exc}", "load_1m": load}
            print(f"    {name:<34} ERROR {peers[name]['error']}", flush=True)
            continue
        p = peers[name]
        p["time_ratio_ours"] = round(ours["ms_per_series"] / p["ms_per_series"], 3) if p["ms_per_series"] else None
        p["wape_ratio_ours"] = (round(ours["wape_sample"] / p["test_wape"], 3)
                                if p.get("test_wape") and ours.get("wape_sample") is not None else None)
        print(f"    {name:<34} {p['wall_s']:8.1f} s  {p['ms_per_series']:9.2f} ms/series  WAPE "
              f"{p['test_wape']}  (load {load:.1f})", flush=True)
    print(f"    {'ours: train + promote + score':<34} {ours['seconds']:8.1f} s  {ours['ms_per_series']:9.2f} "
          f"ms/series  WAPE {ours['wape_sample']}  (all {ours['partitions']:,} partitions; train alone "
          f"{ours['train_ms_per_series']:.2f} ms/series)", flush=True)
    if args.ridge:
        peers["ridge before/after"] = ridge_before_after(train, shape)
        for label, fig in peers["ridge before/after"].items():
            print(f"    {label:<38} test WAPE {fig['test_wape']}  {fig['ms_per_partition']} ms/partition")
    return peers


# --------------------------------------------------------------------------- one panel


def measure_panel(files: PanelFiles, shape: Shape, args: argparse.Namespace, work: Path, first: bool,
                  n: int) -> dict[str, Any]:
    """Every stage of one panel (clean or noisy), then ours on the held-out rows, incremental, peers."""
    cols = columns(shape)
    out: dict[str, Any] = {"split": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(files).items()}}
    stages: list[dict[str, Any]] = []
    kind = files.kind
    train_rows, h = files.train_rows, shape.horizon
    future = ["--data", str(files.future)]
    ws = work / f"ws-{kind}-default"
    shutil.rmtree(ws, ignore_errors=True)
    config = work / f"{kind}-default.toml"
    config.write_text(project_toml(None, args.workers, shape))
    if shape.name == "long":
        if kind == "clean" and not args.skip_loglinear:
            print("  loglinear-only candidates:", flush=True)
            lin = work / f"ws-{kind}-loglinear"
            shutil.rmtree(lin, ignore_errors=True)
            (work / "loglinear.toml").write_text(project_toml(["loglinear"], args.workers, shape))
            stages.append(stage("ingest", ["ingest", "--data", str(files.train), "--workdir", str(lin),
                                           "--config", str(work / "loglinear.toml")], work, train_rows, "rows"))
            stages.append(stage("train (loglinear only)", ["train", "--workdir", str(lin), "--no-progress"],
                                work, n, "models"))
            out["loglinear"] = {"test_wape": stages[-1]["summary"].get("model_wape")}
            if not args.keep:
                shutil.rmtree(lin, ignore_errors=True)
        print("  default candidates (the whole pipeline, stage by stage):", flush=True)
        default = [
            stage("ingest", ["ingest", "--data", str(files.train), "--workdir", str(ws), "--config", str(config)],
                  work, train_rows, "rows"),
            stage("train (default candidates)", ["train", "--workdir", str(ws), "--no-progress"], work, n, "models"),
            stage("promote", ["promote", "--workdir", str(ws)], work, n, "models"),
        ]
        out["promoted_share"] = say_promoted(default[-1]["summary"], n)
        default.append(stage(f"score ({h} held-out days, into SQL)",
                             ["score", "--workdir", str(ws), "--no-progress", *future], work, files.holdout_rows,
                             "rows"))
        for s, key in zip(default, ("ingest", "train", "promote", "score")):
            s["key"] = key
        stages += default
        pipeline = sum(s["wall_s"] for s in default)
        seconds = {s["key"]: s["wall_s"] for s in default}
        score_id = default[-1]["summary"].get("score_id")
        out["default"] = {"test_wape": default[1]["summary"].get("model_wape"),
                          "baseline_wape": default[1]["summary"].get("baseline_wape"), "pipeline_s": pipeline}
        print(f"  {'whole pipeline, default candidates':<36} {pipeline:8.1f} s", flush=True)
    else:
        print("  default candidates (`manymodels run`: ingest, train, promote, score, report):", flush=True)
        run = stage("run (default candidates)", ["run", "--data", str(files.train), "--scoring-data", str(files.future),
                                                 "--workdir", str(ws), "--config", str(config), "--no-progress"],
                    work, n, "models")
        run["key"] = "run"
        stages.append(run)
        seconds = {k: float(v) for k, v in (run["summary"].get("seconds") or {}).items()}
        print("    its stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), flush=True)
        out["promoted_share"] = say_promoted(run["summary"], n)
        score_id = run["summary"].get("score_id")
        pipeline = run["wall_s"]
        out["default"] = {"test_wape": run["summary"].get("model_wape"),
                          "baseline_wape": run["summary"].get("baseline_wape"), "run_s": pipeline,
                          "stage_seconds": seconds}
    print(f"    test-window WAPE of the trained models: {out['default']['test_wape']} (baseline "
          f"{out['default']['baseline_wape']})", flush=True)

    # the sample (the peers' series): its delivered WAPE is printed with or without the peers
    sample_train = first_partitions(files.train, args.peer_partitions)
    sample_actual = first_partitions(files.actual, args.peer_partitions)
    actual = pd.read_parquet(files.actual)
    ours = delivered_wape(ws, score_id, actual, sample_actual, cols)
    del actual
    spent = sum(seconds.get(k, 0.0) for k in ("train", "promote", "score"))
    ours.update({"partitions": n, "seconds": round(spent, 1), "ms_per_series": round(1000 * spent / n, 3),
                 "train_ms_per_series": round(1000 * seconds.get("train", 0.0) / n, 3)})
    out["ours"] = ours
    say_delivered(ours, n, int(sample_actual[list(KEYS)].drop_duplicates().shape[0]))

    if first and not args.skip_incremental:
        print(f"  incremental: {CHANGED_SHARE:.0%} of the partitions corrected (their last {h} training "
              f"rows +10 %):", flush=True)
        began = time.perf_counter()
        corrected = files.train.with_name("train-corrected.parquet")
        changed = corrected_copy(files.train, corrected, CHANGED_SHARE, h, args.seed)
        print(f"    corrected copy written in {time.perf_counter() - began:.1f} s ({changed} partitions changed)",
              flush=True)
        if shape.name == "long":
            inc = [
                stage("ingest (corrected file)", ["ingest", "--data", str(corrected), "--workdir", str(ws)],
                      work, train_rows, "rows"),
                stage("train (incremental)", ["train", "--workdir", str(ws), "--no-progress"], work, changed,
                      "models"),
                stage("promote (incremental)", ["promote", "--workdir", str(ws)], work, changed, "models"),
                stage("score (incremental)", ["score", "--workdir", str(ws), "--no-progress", *future], work,
                      files.holdout_rows, "rows"),
            ]
            total = sum(s["wall_s"] for s in inc)
            out["incremental"] = {"changed": changed, "train_s": inc[1]["wall_s"], "pipeline_s": total,
                                  "train_share": round(inc[1]["wall_s"] / max(seconds["train"], 1e-9), 4),
                                  "share_of_full": round(total / max(pipeline, 1e-9), 4),
                                  "summary": inc[1]["summary"]}
            print(f"    incremental train {out['incremental']['train_share']:.1%} of the full train; the "
                  f"incremental pipeline {total:.1f} s, {out['incremental']['share_of_full']:.1%} of the full one",
                  flush=True)
        else:
            inc = [stage("run (incremental)", ["run", "--data", str(corrected), "--scoring-data", str(files.future),
                                               "--workdir", str(ws), "--no-progress"], work, changed, "models")]
            its = inc[0]["summary"].get("seconds") or {}
            print("    its stages: " + ", ".join(f"{k} {float(v):.1f} s" for k, v in its.items()), flush=True)
            out["incremental"] = {"changed": changed, "run_s": inc[0]["wall_s"], "stage_seconds": its,
                                  "share_of_full": round(inc[0]["wall_s"] / max(pipeline, 1e-9), 4),
                                  "trained": inc[0]["summary"].get("trained")}
            print(f"    incremental run {out['incremental']['share_of_full']:.1%} of the full run", flush=True)
        stages += inc
        if not args.keep:
            corrected.unlink(missing_ok=True)
    out["stages"] = stages
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)

    if not args.skip_peer:
        out["peers"] = run_peers(files, shape, args, ours, (sample_train, sample_actual))
    return out


# --------------------------------------------------------------------------- targets


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def checks_of(shape: Shape, panels: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """Issue 22's targets on what was measured, as (text, passed)."""
    t = TARGETS[shape.name]
    checks: list[tuple[str, bool]] = []
    for kind, res in panels.items():
        by = {s["key"]: s for s in res["stages"] if "key" in s}  # the default set's first pass
        if shape.name == "long":
            lin = next((s for s in res["stages"] if s["stage"] == "train (loglinear only)"), None)
            if lin is not None:
                checks.append((f"{kind}: train loglinear-only {lin['wall_s']} s <= {t['train_loglinear_s']:.0f} s",
                               lin["wall_s"] <= t["train_loglinear_s"]))
            s = by["train"]
            checks.append((f"{kind}: train default {s['wall_s']} s <= {t['train_default_s']:.0f} s",
                           s["wall_s"] <= t["train_default_s"]))
            s = by["score"]
            checks.append((f"{kind}: score {s['wall_s']} s <= {t['score_s']:.0f} s (promoted share "
                           f"{res['promoted_share']:.0%})", s["wall_s"] <= t["score_s"]))
            total = res["default"]["pipeline_s"]
            checks.append((f"{kind}: whole pipeline {total:.1f} s <= {t['pipeline_s']:.0f} s", total <= t["pipeline_s"]))
            peak = max(s["peak_rss_gb"] for s in res["stages"] if s["stage"].startswith("ingest"))
            checks.append((f"{kind}: ingest peak RSS {peak} GB <= {t['ingest_peak_gb']} GB",
                           peak <= t["ingest_peak_gb"]))
        else:
            s = by["run"]
            checks.append((f"{kind}: whole run (default) {s['wall_s']} s <= {t['run_s']:.0f} s (promoted share "
                           f"{res['promoted_share']:.0%})", s["wall_s"] <= t["run_s"]))
            peak = max(s["peak_rss_gb"] for s in res["stages"])
            checks.append((f"{kind}: peak RSS {peak} GB <= {t['peak_gb']} GB", peak <= t["peak_gb"]))
            if "incremental" in res:
                share = res["incremental"]["share_of_full"]
                checks.append((f"{kind}: incremental run ({CHANGED_SHARE:.0%} changed) {share:.1%} of the full run "
                               f"<= {t['incremental_share']:.0%}", share <= t["incremental_share"]))
        ours, peers = res["ours"], res.get("peers") or {}
        ets = peers.get("statsforecast AutoETS") or {}
        mlf = peers.get("mlforecast LightGBM") or {}
        if "ms_per_series" in ets:
            checks.append((f"{kind}: ours {ours['ms_per_series']:.2f} ms/series (train + promote + score) faster "
                           f"than AutoETS {ets['ms_per_series']:.2f}", ours["ms_per_series"] < ets["ms_per_series"]))
        for name, peer in (("AutoETS", ets), ("mlforecast LightGBM", mlf)):
            if peer.get("test_wape") is not None:
                checks.append((f"{kind}: ours WAPE {ours['wape_sample']} < {name} {peer['test_wape']} on the sample",
                               ours["wape_sample"] < peer["test_wape"]))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="long",
                        help="long: 10,000 x 4,000 days, horizon 28; short: 100,000 x 104 weeks, horizon 13")
    parser.add_argument("--panel", choices=("clean", "noisy", "both"), default="clean")
    parser.add_argument("--partitions", type=int, help="series (default: the shape's)")
    parser.add_argument("--periods", type=int, help="periods per series (default: the shape's)")
    parser.add_argument("--horizon", type=int, help="held-out rows and forecast horizon (default: the shape's)")
    parser.add_argument("--noise-sd", type=float, default=NOISE_SD,
                        help=f"sd of the noisy panel's lognormal noise (default {NOISE_SD})")
    parser.add_argument("--peer-partitions", type=int, default=PEER_PARTITIONS,
                        help=f"series of the peers' sample (default {PEER_PARTITIONS:,})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loglinear", action="store_true", help="skip the loglinear-only workdir (long shape)")
    parser.add_argument("--skip-incremental", action="store_true")
    parser.add_argument("--skip-peer", action="store_true", help="no peers")
    parser.add_argument("--ridge", action="store_true",
                        help="also the ridge solve before/after (scikit-learn Ridge.fit vs direct) on the sample")
    parser.add_argument("--work", type=Path, help="folder for inputs and workdirs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and workdirs")
    parser.add_argument("--json", dest="json_out", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    base = SHAPES[args.shape]
    shape = Shape(base.name, args.partitions or base.partitions, args.periods or base.periods, base.freq,
                  args.horizon or base.horizon)
    kinds = ["clean", "noisy"] if args.panel == "both" else [args.panel]
    work = args.work or Path(tempfile.mkdtemp(prefix="mm-reference-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    figures: dict[str, Any] = {"shape": shape.name, "partitions": shape.partitions, "periods": shape.periods,
                               "freq": shape.freq, "horizon": shape.horizon, "workers": args.workers,
                               "panels": kinds, "noise_sd": args.noise_sd, "peer_partitions": args.peer_partitions,
                               "cpus": os.cpu_count(), "load_before": list(os.getloadavg())}
    try:
        print(f"reference scale, {shape.name} shape: {shape.partitions:,} partitions x {shape.periods:,} periods "
              f"(freq {shape.freq}), horizon {shape.horizon}, panels {', '.join(kinds)}, {args.workers} workers, "
              f"{os.cpu_count()} CPUs, load average {load_before:.2f}, in {work}", flush=True)
        panel = work / "panel.parquet"
        gen = generate(panel, shape.partitions, shape.periods, shape.freq, args.seed, work)
        figures["generate"] = gen
        figures["rows"] = int(gen["summary"].get("rows", shape.partitions * shape.periods))
        results: dict[str, dict[str, Any]] = {}
        for i, kind in enumerate(kinds):
            noise = args.noise_sd if kind == "noisy" else None
            files = split_panel(panel, work / kind, kind, shape, noise, args.seed)
            n = files.series
            print(f"\n{kind} panel" + (f" (lognormal noise sd {noise})" if noise else "") + f": the last "
                  f"{shape.horizon} rows of each series held out in {files.seconds:.1f} s: {files.train_rows:,} "
                  f"training rows, {files.holdout_rows:,} held-out rows, {n:,} series"
                  + (f" ({files.dropped_series} too short, dropped)" if files.dropped_series else ""), flush=True)
            results[kind] = measure_panel(files, shape, args, work, i == 0, n)
            if not args.keep:
                shutil.rmtree(work / kind, ignore_errors=True)
        figures["results"] = results

        load_after = load_average()
        figures["load_after"] = list(os.getloadavg())
        checks = checks_of(shape, results)
        print(f"\ntargets (issue 22, {shape.name} shape, 2 cores):")
        for text, ok in checks:
            print(f"  {verdict(ok)}  {text}")
        figures["checks"] = [{"check": t, "pass": ok} for t, ok in checks]
        print("\nratios ours / peer (below 1: ours faster / more accurate; time per series, ours: train + "
              "promote + score; WAPE on the sample's held-out rows):")
        for kind, res in results.items():
            for name, peer in (res.get("peers") or {}).items():
                if "time_ratio_ours" in peer:
                    print(f"  {kind:<6} {name:<34} time {peer['time_ratio_ours']:>8.3f}   WAPE "
                          f"{peer['wape_ratio_ours']}")
        print(f"\nload average before {load_before:.2f}, after {load_after:.2f} ({os.cpu_count()} CPUs)")
        if args.json_out:
            args.json_out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
            print(f"figures written to {args.json_out}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
