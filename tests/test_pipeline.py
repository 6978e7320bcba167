"""The whole local pipeline: data in, models trained, promoted, scored, in SQL; reruns change nothing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from shared.runs.pipeline import run_all
from shared.runs.workspace import Workspace
from shared.data.synthetic import write_panel

pytestmark = pytest.mark.slow

OVERRIDES = {"runner.progress": False, "runner.rows_per_file": 1500, "runner.workers": 2,
             "data.covariates": ["price", "promo"]}


@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sales.parquet"
    write_panel(path, partitions=40, periods=156, freq="W", seed=3)
    return path


@pytest.fixture(scope="module")
def first_run(panel, tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    ws = Workspace.open(root, overrides=OVERRIDES)
    return root, run_all(ws, panel, min_accuracy=0.5)


def _sql(root: Path, query: str):
    with sqlite3.connect(root / "results.sqlite") as con:
        return con.execute(query).fetchall()


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "results.sqlite" not in p.name and p.suffix != ".html":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_every_partition_is_trained_failed_or_skipped_with_a_reason(first_run):
    root, summary = first_run
    assert summary["partitions"] == 40
    assert summary["trained"] + summary["failed"] + summary["skipped"] == summary["partitions"]
    rows = _sql(root, "select status, reason from model_metrics")
    assert len(rows) == 40
    assert all(reason for status, reason in rows if status in ("failed", "skipped"))


def test_predictions_are_one_row_per_scored_partition_and_horizon_period(first_run):
    root, summary = first_run
    (count,) = _sql(root, "select count(*) from predictions")[0]
    (parts,) = _sql(root, "select count(distinct partition_id) from predictions")[0]
    assert count == summary["predictions"] == parts * 12
    cols = [r[1] for r in _sql(root, "pragma table_info(predictions)")]
    for col in ("store", "item", "date", "prediction", "model", "model_version", "run_id"):
        assert col in cols


def test_chosen_models_beat_the_baseline_wape_clearly(first_run):
    _, summary = first_run
    print(f"WAPE chosen {summary['model_wape']} vs baseline {summary['baseline_wape']}")
    assert summary["model_wape"] < 0.85 * summary["baseline_wape"]


def test_partitions_without_a_production_model_are_scored_with_the_flagged_fallback(first_run):
    root, summary = first_run
    fallback = _sql(root, "select count(distinct partition_id) from predictions where is_fallback = 1")[0][0]
    promoted = _sql(root, "select count(*) from promotions where decision = 'promoted'")[0][0]
    assert fallback == summary["fallback_partitions"]
    assert promoted + fallback == summary["scored_partitions"]


def test_a_second_identical_run_changes_nothing_and_duplicates_nothing(first_run, panel):
    root, summary = first_run
    before_tables = {t: _sql(root, f"select count(*) from {t}")[0][0]
                     for t in ("predictions", "model_metrics", "promotions", "backtests")}
    before_files = _tree_digest(root)
    ws = Workspace.open(root, overrides=OVERRIDES)
    again = run_all(ws, panel, min_accuracy=0.5)
    for key in ("dataset_id", "run_id", "partitions", "trained", "promoted", "predictions"):
        assert again[key] == summary[key], key
    assert again["newly_promoted"] == 0
    after_tables = {t: _sql(root, f"select count(*) from {t}")[0][0] for t in before_tables}
    assert after_tables == before_tables
    changed = {k for k, v in _tree_digest(root).items() if before_files.get(k) != v}
    changed = {k for k in changed if not k.endswith(("LATEST", "run.json")) and "/jobs/" not in k}
    assert not changed, sorted(changed)[:10]


def test_a_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(first_run, panel, tmp_path):
    reference_root, _ = first_run
    root = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shared.cli", "run", "--data", str(panel), "--workdir", str(root),
           "--min-accuracy", "0.5", "--rows-per-file", "1500", "--workers", "2", "--no-progress",
           "--covariates", "price,promo"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    results = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(root.glob("lake/runs/*/results/*.jsonl"))
        if found:
            results = found
            break
        time.sleep(0.05)
    assert results, "the run never produced a mini-batch result before it ended"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "results.sqlite").exists() or not _sql(root, "select count(*) from predictions")[0][0]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    query = "select partition_id, date, round(prediction, 6), model, is_fallback from predictions order by 1, 2"
    assert _sql(root, query) == _sql(reference_root, query)
    metrics = "select partition_id, status, model, round(wape, 9) from model_metrics order by 1"
    assert _sql(root, metrics) == _sql(reference_root, metrics)
    models = list((root / "registry" / "dev" / "artifacts").rglob("*.pkl"))
    assert len(models) == len({m.parent.name for m in models})  # one version per partition: no duplicates


def test_scoring_file_rows_are_predicted_exactly(first_run, tmp_path):
    root, _ = first_run
    from shared.runs.pipeline import score

    ws = Workspace.open(root, overrides=OVERRIDES)
    with sqlite3.connect(root / "results.sqlite") as con:
        target = pd.read_sql("select store, item, max(date) as date from predictions group by store, item limit 3", con)
    future = target.assign(date=pd.to_datetime(target["date"]), price=4.2, promo=1)
    path = tmp_path / "future.csv"
    future.to_csv(path, index=False)
    plan, loaded = score(ws, data=path, progress=False)
    assert loaded.rows == 3


@pytest.mark.azurite
def test_on_a_blob_lake_a_rerun_of_a_group_uploads_only_what_it_rewrote(azurite_blob, tmp_path):
    from shared.runs.pipeline import ingest, plan_training, train_group
    from shared.settings import Settings

    data = tmp_path / "sales.parquet"
    write_panel(data, partitions=8, periods=80, freq="W", seed=21)
    settings = Settings(workdir=tmp_path / "ws", lake_backend="blob",
                        lake_connection_string=azurite_blob.connection_string)
    ws = Workspace.open(settings=settings, overrides={"runner.progress": False, "forecast.horizon": 6,
                                                      "forecast.test_periods": 6})
    plan = plan_training(ws, ingest(ws, data).dataset_id)
    files = [p for g in plan.groups for p in g]
    first = train_group(ws, plan.run_id, files)
    assert first.partitions == 8 and not first.failed_batches
    models = ws.lake.list(f"runs/{plan.run_id}/models")
    # a pack and a sidecar per chunk of partitions (8 partitions: a chunk per batch file)
    assert 1 <= len([p for p in models if p.endswith(".pack")]) <= len(files)
    assert len([p for p in models if p.endswith(".jsonl")]) == len(files)

    uploaded: list[str] = []
    write = ws.lake.write_bytes
    ws.lake.write_bytes = lambda path, body: (uploaded.append(path), write(path, body))[1]
    again = train_group(ws, plan.run_id, files)
    assert again.partitions == 8
    assert uploaded == [f"runs/{plan.run_id}/config/manymodels.toml"]


@pytest.mark.azurite
def test_on_a_blob_lake_a_spark_folder_is_ingested_whole_and_its_markers_and_temporaries_skipped(
        azurite_blob, tmp_path):
    """A folder dataset in raw/ (part files, _SUCCESS, a leftover _temporary/): staged part by part."""
    from shared.runs.pipeline import ingest
    from shared.settings import Settings

    data = tmp_path / "sales.parquet"
    write_panel(data, partitions=5, periods=40, freq="W", seed=3)
    frame = pd.read_parquet(data)
    settings = Settings(workdir=tmp_path / "ws", lake_backend="blob",
                        lake_connection_string=azurite_blob.connection_string)
    ws = Workspace.open(settings=settings, overrides={"runner.progress": False})
    for i, (a, b) in enumerate([(0, 70), (70, 140), (140, len(frame))]):
        part = tmp_path / f"part-{i}.parquet"
        frame.iloc[a:b].to_parquet(part, index=False)
        ws.lake.write_bytes(f"raw/weekly/part-{i:05d}-c000.snappy.parquet", part.read_bytes())
    ws.lake.write_bytes("raw/weekly/_SUCCESS", b"")
    ws.lake.write_bytes("raw/weekly/_temporary/0/part-00000-c000.snappy.parquet", b"not parquet")
    whole = ingest(ws, "raw/weekly")
    assert whole.rows == len(frame) and whole.partitions == 5
    assert ingest(ws, "raw/weekly").dataset_id == whole.dataset_id  # the same folder again: the same dataset


def test_each_series_is_forecast_on_its_own_weekday(tmp_path):
    """M4's weekly panel: series dated on different weekdays. One anchor for the panel (the most common
    weekday) stamped the others' forecasts on it: they matched no row of their own calendar."""
    from shared.runs.pipeline import score

    weekly = pd.read_parquet(_small_weekly(tmp_path))
    stores = sorted(weekly["store"].unique())
    fridays = weekly["store"] == stores[0]  # a minority on Fridays, the rest on Wednesdays
    weekly.loc[fridays, "date"] = weekly.loc[fridays, "date"] - pd.Timedelta(days=2)  # Sundays -> Fridays
    weekly.loc[~fridays, "date"] = weekly.loc[~fridays, "date"] - pd.Timedelta(days=4)  # -> Wednesdays
    data = tmp_path / "mixed.parquet"
    weekly.to_parquet(data, index=False)
    ws = Workspace.open(tmp_path / "ws", overrides={**OVERRIDES, "data.covariates": ["price", "promo"]})
    run_all(ws, data, min_accuracy=0.0)
    days = dict(_sql(tmp_path / "ws", "select store, group_concat(distinct strftime('%w', date)) from "
                                      "predictions group by store"))
    assert days[stores[0]] == "5" and {days[s] for s in stores[1:]} == {"3"}  # Friday; Wednesday
    tested = dict(_sql(tmp_path / "ws", "select store, group_concat(distinct strftime('%w', date)) from "
                                        "backtests group by store"))
    assert tested[stores[0]] == "5" and {tested[s] for s in stores[1:]} == {"3"}
    # explicit rows on a series' own days are stored on them, not moved to another weekday
    last = weekly.groupby(["store", "item"], as_index=False).agg(date=("date", "max"), price=("price", "last"))
    future = last.assign(date=last["date"] + pd.Timedelta(weeks=1), promo=0)
    path = tmp_path / "future.csv"
    future.to_csv(path, index=False)
    _, loaded = score(ws, data=path, progress=False)
    got = _sql(tmp_path / "ws", "select store, date from predictions_latest")
    assert loaded.rows == len(future)
    assert sorted((s, d) for s, d in got) == sorted(
        (s, d.strftime("%Y-%m-%d")) for s, d in future[["store", "date"]].itertuples(index=False))


def _small_weekly(tmp_path) -> Path:
    path = tmp_path / "weekly.parquet"
    write_panel(path, partitions=6, periods=60, freq="W", seed=8)
    return path


def test_a_promotion_that_lands_while_scoring_is_planned_makes_the_plan_cut_again(first_run, tmp_path):
    """The plan is prepared outside the writer lease and published under it: a registry that moved in
    between (a promotion holds the lease while it writes) sends the plan round again, with the new
    registry and so a new score id; only the plan that was published has a run.json."""
    from contextlib import contextmanager

    from shared import layout
    from shared.runs.pipeline import PipelineError, plan_scoring

    root, _ = first_run
    shutil.copytree(root, tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws", overrides=OVERRIDES)
    published: list[int] = []
    landed = iter(range(1, 100))

    @contextmanager
    def promotion_lands_first(times: int):
        if len(published) < times:  # a promotion wrote production after the plan read it
            ws.prod.register_many([({"partition_id": "p-late", "run_id": f"r{next(landed):016x}",
                                     "model_type": "ets"}, b"late")])
        published.append(ws.prod.index_version())
        yield

    def _planned(ws) -> set[str]:
        return {path.split("/")[1] for path in ws.lake.list("scoring") if path.endswith("/scoring.json")}

    before, planned_before = ws.prod.index_version(), _planned(ws)
    plan = plan_scoring(ws, writer=lambda: promotion_lands_first(1))
    assert published == [before + 1, before + 1]  # cut at `before`, refused; cut again and published
    meta = json.loads(ws.lake.read_bytes(layout.run_meta(plan.score_id)))
    assert meta["registry_versions"]["prod"] == before + 1
    assert _planned(ws) - planned_before == {plan.score_id}  # a new run, not the one planned before
    first_id = plan_scoring(ws, score_id=None, writer=lambda: promotion_lands_first(0)).score_id
    assert first_id == plan.score_id  # the same registries, data and horizon: the same run

    published.clear()
    with pytest.raises(PipelineError, match="changed 3 times while a scoring run was planned"):
        plan_scoring(ws, writer=lambda: promotion_lands_first(3))
