"""Incremental retraining: only partitions whose data or training config changed are retrained."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from shared import layout
from shared.models.global_model import GLOBAL_ID
from shared.models.incremental import CONFIG_TAG, carried_forward, training_config_digest
from shared.lake import read_parquet
from shared.runs.pipeline import ingest, promote, score, train
from shared.data.synthetic import write_panel
from shared.runs.workspace import Workspace

pytestmark = pytest.mark.slow

OVERRIDES = {"runner.progress": False, "runner.rows_per_file": 600, "runner.workers": 2}


def _corrected(source: Path, target: Path, stores_items: list[tuple[str, str]]) -> None:
    """The same panel with late corrections (+10 % on the last 4 weeks) for some partitions."""
    frame = pd.read_parquet(source)
    last = frame["date"].max() - pd.Timedelta(weeks=3)
    hit = frame.set_index(["store", "item"]).index.isin(stores_items) & (frame["date"] >= last).to_numpy()
    frame.loc[hit, "sales"] = (frame.loc[hit, "sales"] * 1.1).round()
    frame.to_parquet(target, index=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    panel = data / "sales.parquet"
    write_panel(panel, partitions=12, periods=104, freq="W", seed=17)
    ws = Workspace.open(tmp_path_factory.mktemp("ws"), overrides=OVERRIDES)
    ingest(ws, panel)
    plan, _, registered = train(ws)
    promote(ws, plan.run_id, min_accuracy=0.0)
    first_score, _ = score(ws)
    return ws, panel, data, plan, registered, first_score


def _predictions(ws, score_id: str) -> pd.DataFrame:
    return read_parquet(ws.lake, layout.predictions(score_id))


def test_a_first_run_trains_everything_and_tags_its_models_with_the_config_digest(base):
    ws, _, _, plan, registered, _ = base
    assert plan.carried == 0 and registered.carried == 0
    digest = training_config_digest(ws.config)
    records = ws.dev.find(run_id=plan.run_id)
    assert records and all(r.tags[CONFIG_TAG] == digest for r in records)


def test_corrected_partitions_retrain_the_others_keep_their_versions_and_forecasts(base):
    ws, panel, data, first, _, first_score = base
    manifest = read_parquet(ws.lake, layout.dataset_manifest(first.dataset_id))
    changed = [(str(s), str(i)) for s, i in manifest[["store", "item"]].head(2).itertuples(index=False)]
    before = {r.partition_id: r.version for r in ws.dev.find(run_id=first.run_id)}
    corrected = data / "corrected.parquet"
    _corrected(panel, corrected, changed)
    ingest(ws, corrected)
    plan, groups, registered = train(ws)
    changed_ids = set(manifest.set_index(["store", "item"]).loc[changed, "partition_id"])
    assert plan.partitions == 2 and plan.carried == 10
    assert registered.trained + registered.baseline_only == 2 and registered.carried == 10
    meta = json.loads(ws.lake.read_bytes(layout.run_meta(plan.run_id)))
    assert set(json.loads(ws.lake.read_bytes(meta["partitions_file"]))) == changed_ids
    assert meta["global_from"] == first.run_id  # the latest run's global model, not a new fit
    retrained = {r.partition_id for r in ws.dev.find(run_id=plan.run_id)} - {GLOBAL_ID}
    assert retrained == changed_ids
    for pid, version in before.items():
        if pid not in changed_ids and pid != GLOBAL_ID:
            assert ws.dev.latest(pid).version == version  # carried forward: the same version
    with sqlite3.connect(ws.root / "results.sqlite") as con:
        rows = dict(con.execute("SELECT partition_id, status FROM model_metrics WHERE run_id = ?",
                                (plan.run_id,)).fetchall())
    assert {pid for pid, status in rows.items() if status == "carried"} == set(before) - changed_ids - {GLOBAL_ID}
    promote(ws, plan.run_id, min_accuracy=0.0)
    second_score, _ = score(ws)
    old, new = _predictions(ws, first_score.score_id), _predictions(ws, second_score.score_id)
    assert set(new["partition_id"]) == set(old["partition_id"])
    keep = ~new["partition_id"].isin(changed_ids)
    merged = new[keep].merge(old, on=["partition_id", "date"], suffixes=("", "_old"))
    assert len(merged) == int(keep.sum())
    assert (merged["model_version"] == merged["model_version_old"]).all()
    assert merged["prediction"].tolist() == pytest.approx(merged["prediction_old"].tolist())


def test_a_rerun_is_the_same_run_unchanged_data_trains_nothing_and_full_retrains_everything(base):
    ws, panel, data, _, _, _ = base
    latest = ws.lake.read_bytes(layout.LATEST_RUN).decode().strip()
    again, _, _ = train(ws)  # the corrected dataset again: the same (incremental) run
    assert again.run_id == latest and again.partitions == 2
    fewer = data / "fewer.parquet"  # a new extract without one series: nothing else changed
    frame = pd.read_parquet(data / "corrected.parquet")
    first = frame[["store", "item"]].iloc[0]
    frame[(frame["store"] != first["store"]) | (frame["item"] != first["item"])].to_parquet(fewer, index=False)
    ingest(ws, fewer)
    plan, groups, registered = train(ws)
    assert plan.partitions == 0 and plan.groups == [] and plan.carried == 11 and registered.carried == 11
    full_plan, _, full = train(ws, full=True)
    assert full_plan.carried == 0 and full.trained + full.baseline_only == 11


def test_a_training_config_change_retrains_everything(base):
    ws, _, _, _, _, _ = base
    changed = ws.config.with_overrides({"training.selection_margin": 0.2})
    assert training_config_digest(changed) != training_config_digest(ws.config)
    manifest = read_parquet(ws.lake, layout.dataset_manifest(
        ws.lake.read_bytes(layout.LATEST_DATASET).decode().strip()))
    assert carried_forward(ws.dev, manifest, training_config_digest(changed)) == {}
    assert len(carried_forward(ws.dev, manifest, training_config_digest(ws.config))) == len(manifest)
