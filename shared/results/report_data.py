"""What the dashboard shows, read from the SQL result store once (:func:`gather` -> :class:`ReportData`).

Everything comes from the store's tables (``model_metrics``, ``promotions``, ``backtests``,
``predictions``, ``runs``): the latest training run (the newest ``train`` entry of the ``runs``
table that has metrics, else the run with the most metric rows) and every stored prediction.
Two tables are read when the store has them (older stores do not, and the report says less):
``actuals`` (observed history before the forecast origin, drawn before the test window) and
``effects`` (each partition's price elasticity and promotion lift). The renderer
(:mod:`shared.results.report_render`) never queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shared.config import default_season_length
from shared.keys import PARTITION_ID
from shared.results.report_series import _num, build_series, model_wins, served_by
from shared.results.result_store import ResultStore, quote


@dataclass
class ReportData:
    """What the report shows, read from the store once (the renderer never queries)."""

    keys: list[str]
    time_column: str
    run_id: str | None = None
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    promotions: pd.DataFrame = field(default_factory=pd.DataFrame)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    backtests: pd.DataFrame = field(default_factory=pd.DataFrame)
    future: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_predictions: int = 0
    n_predicted_partitions: int = 0
    n_fallback_partitions: int = 0
    pooled: dict[str, float | None] = field(default_factory=dict)
    threshold: float | None = None
    promotion_metric: str | None = None
    best: list[str] = field(default_factory=list)
    worst: list[str] = field(default_factory=list)
    sources: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per scoring source
    series: pd.DataFrame = field(default_factory=pd.DataFrame)  # every series, worst WAPE first, with why
    wins: pd.DataFrame = field(default_factory=pd.DataFrame)  # per model: series won and served
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # actuals of the example series
    effects: pd.DataFrame = field(default_factory=pd.DataFrame)  # elasticity / lift per partition
    season_length: int = 1
    has_actuals: bool = False
    has_effects: bool = False

    @property
    def empty(self) -> bool:
        return self.metrics.empty and self.n_predictions == 0 and self.runs.empty


# -- reading the store --------------------------------------------------------------------------
def gather(store: ResultStore, n_examples: int = 3) -> ReportData:
    data = ReportData(keys=list(store.keys), time_column=store.time_column,
                      season_length=default_season_length(store.freq))
    data.runs = store.query("SELECT run_id, stage, started_at, finished_at, seconds, counts FROM runs")
    if not data.runs.empty:
        data.runs = data.runs.sort_values("started_at", ascending=False, kind="stable")
    data.run_id = _latest_training_run(store, data.runs)
    if data.run_id is not None:
        data.metrics = store.query("SELECT * FROM model_metrics WHERE run_id = ?", [data.run_id])
        data.promotions = store.query("SELECT * FROM promotions WHERE run_id = ?", [data.run_id])
        for col in ("wape", "mape", "rmse", "accuracy", "baseline_wape", "fit_seconds", "n_observed"):
            data.metrics[col] = pd.to_numeric(data.metrics[col], errors="coerce")
        pooled = store.query(
            "SELECT SUM(ABS(prediction - actual)) AS err, SUM(ABS(baseline - actual)) AS base_err, "
            "SUM(ABS(actual)) AS total, COUNT(baseline) AS n_base, COUNT(*) AS n "
            "FROM backtests WHERE run_id = ? AND actual IS NOT NULL AND prediction IS NOT NULL", [data.run_id])
        row = pooled.iloc[0]
        total = _num(row["total"])
        if total:
            data.pooled["model_wape"] = _num(row["err"]) / total
            if int(row["n_base"] or 0) == int(row["n"] or 0):  # only when every point has a baseline
                data.pooled["baseline_wape"] = _num(row["base_err"]) / total
    if not data.promotions.empty:
        data.threshold = _num(pd.to_numeric(data.promotions["threshold"], errors="coerce").dropna().median())
        metric = data.promotions["metric"].dropna()
        data.promotion_metric = str(metric.mode().iloc[0]) if len(metric) else None
    counts = store.query("SELECT COUNT(*) AS n, COUNT(DISTINCT partition_id) AS parts FROM predictions")
    data.n_predictions = int(counts["n"].iloc[0] or 0)
    data.n_predicted_partitions = int(counts["parts"].iloc[0] or 0)
    fallback = store.query("SELECT COUNT(DISTINCT partition_id) AS parts FROM predictions WHERE is_fallback = 1")
    data.n_fallback_partitions = int(fallback["parts"].iloc[0] or 0)
    served = _served(store)
    data.sources = _sources(store, data.run_id, served)
    data.series = build_series(data.metrics, data.promotions, served, data.keys)
    data.wins = model_wins(data.series)
    data.has_actuals, data.has_effects = has_table(store, "actuals"), has_table(store, "effects")
    if data.has_effects:
        data.effects = _effects(store, served, data.run_id)
    data.best, data.worst = _examples(data.metrics, n_examples)
    chosen = data.best + data.worst
    if chosen and data.run_id is not None:
        marks = ", ".join("?" for _ in chosen)
        t = quote(store.time_column, store.dialect)
        data.backtests = store.query(
            f"SELECT partition_id, {t}, actual, prediction, baseline FROM backtests "
            f"WHERE run_id = ? AND partition_id IN ({marks})", [data.run_id, *chosen])
        data.future = store.query(
            f"SELECT partition_id, {t}, prediction, is_fallback, model, lower, upper FROM predictions "
            f"WHERE partition_id IN ({marks})", chosen)
    if chosen and data.has_actuals:
        t = quote(store.time_column, store.dialect)
        data.history = store.query(f"SELECT partition_id, {t}, actual FROM actuals "
                                   f"WHERE partition_id IN ({', '.join('?' for _ in chosen)})", chosen)
    return data


def has_table(store: ResultStore, name: str) -> bool:
    """Does the store hold this table? (Tables added in later releases are read only when present.)"""
    if name in getattr(store, "tables", {}):  # opening the store creates every table it knows
        return True
    if store.dialect == "sqlite":
        return not store.query("SELECT name FROM sqlite_master WHERE name = ?", [name]).empty
    try:
        store.query(f"SELECT * FROM {quote(name, store.dialect)} WHERE 1 = 0")
        return True
    except Exception:  # noqa: BLE001  (any driver's "no such table"; a failed read aborts the transaction)
        store.conn.rollback()
        return False


def _served(store: ResultStore) -> pd.DataFrame:
    """One row per partition: the source and model of its newest stored forecast (with its keys)."""
    keys = ", ".join(quote(k, store.dialect) for k in store.keys)
    grouped = store.query(
        f"SELECT partition_id, {keys}, source, is_fallback, model, run_id, MAX(scored_at) AS scored_at, "
        f"COUNT(*) AS n FROM predictions GROUP BY partition_id, {keys}, source, is_fallback, model, run_id")
    return served_by(grouped)


def _effects(store: ResultStore, served: pd.DataFrame, run_id: str | None) -> pd.DataFrame:
    """One elasticity / lift per (partition, covariate, measure): the serving model's own (the run of
    the partition's newest forecast), else the latest training run's, else the newest stored."""
    frame = store.query("SELECT * FROM effects")
    if frame.empty:
        return frame
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    if "run_id" not in frame.columns:
        return frame.drop_duplicates([PARTITION_ID, "covariate", "measure"], keep="last").reset_index(drop=True)
    serving = (served.set_index(PARTITION_ID)["run_id"] if "run_id" in served.columns and not served.empty
               else pd.Series(dtype=object))
    own = frame["run_id"].astype(str).to_numpy() == frame[PARTITION_ID].map(serving).astype(str).to_numpy()
    rank = np.where(own, 0, np.where(frame["run_id"] == run_id, 1, 2))
    frame = frame.assign(_rank=rank, _run=frame["run_id"].astype(str))
    frame = frame.sort_values(["_rank", "_run"], ascending=[True, False], kind="stable")
    frame = frame.drop_duplicates([PARTITION_ID, "covariate", "measure"], keep="first")
    return frame.drop(columns=["_rank", "_run"]).sort_values(PARTITION_ID, kind="stable").reset_index(drop=True)


SOURCE_ORDER = ("production", "unpromoted", "latest", "global", "baseline")
_BACKTEST_OF = {"production": "prediction", "unpromoted": "prediction", "latest": "prediction",
                "global": "global_forecast", "baseline": "baseline"}


def _sources(store: ResultStore, run_id: str | None, served: pd.DataFrame) -> pd.DataFrame:
    """Per scoring source: partitions and rows predicted (each partition under the source of its
    newest forecast), and the test-window WAPE of that source on exactly those partitions
    (production and unpromoted: the partition's model; global: the global model; baseline: the
    moving average)."""
    if served.empty:
        return pd.DataFrame()
    out = served.groupby("source").agg(partitions=(PARTITION_ID, "nunique"), rows=("n", "sum"))
    out["share"] = out["rows"] / max(int(out["rows"].sum()), 1)
    out["wape"] = np.nan
    if run_id is not None:
        bt = store.query("SELECT partition_id, actual, prediction, baseline, global_forecast FROM backtests "
                         "WHERE run_id = ? AND actual IS NOT NULL", [run_id])
        if not bt.empty:
            merged = bt.merge(served[[PARTITION_ID, "source"]].drop_duplicates(PARTITION_ID), on=PARTITION_ID)
            for source, rows in merged.groupby("source"):
                column = _BACKTEST_OF.get(str(source), "prediction")
                pred = pd.to_numeric(rows[column], errors="coerce")
                actual = pd.to_numeric(rows["actual"], errors="coerce")
                ok = pred.notna() & actual.notna()
                total = float(actual[ok].abs().sum())
                if total > 0:
                    out.loc[source, "wape"] = float((pred[ok] - actual[ok]).abs().sum()) / total
    order = [s for s in SOURCE_ORDER if s in out.index] + [s for s in out.index if s not in SOURCE_ORDER]
    return out.loc[order].reset_index()


def _latest_training_run(store: ResultStore, runs: pd.DataFrame) -> str | None:
    with_metrics = store.query("SELECT run_id, COUNT(*) AS n FROM model_metrics GROUP BY run_id")
    if with_metrics.empty:
        return None
    known = set(with_metrics["run_id"])
    if not runs.empty:
        for run_id in runs.loc[runs["stage"] == "train", "run_id"]:
            if run_id in known:
                return str(run_id)
    return str(with_metrics.sort_values(["n", "run_id"], ascending=False)["run_id"].iloc[0])


def _examples(metrics: pd.DataFrame, n: int) -> tuple[list[str], list[str]]:
    """The n best and n worst partitions by WAPE among those with a model and a test window."""
    if metrics.empty:
        return [], []
    # baseline-only series have tiny test windows: show them only when nothing was trained
    status = "trained" if metrics["status"].eq("trained").any() else "baseline_only"
    ranked = metrics[metrics["wape"].notna() & metrics["status"].eq(status)]
    ranked = ranked.sort_values(["wape", PARTITION_ID])[PARTITION_ID].tolist()
    best = ranked[:n]
    worst = [p for p in ranked[::-1][:n] if p not in best]
    return best, worst
