"""The batch-scoring entry script under the Azure ML parallel job contract: init() parses the
arguments, run(mini_batch) scores files, writes predictions atomically and resumes after a crash.

Models are trained for real on the synthetic panel and registered in real registries.
"""
from __future__ import annotations

import io
import json
import sys

import pickle
import pandas as pd
import pytest

from shared.config import ProjectConfig, RunnerSpec
from shared.entry import score as entry
from shared.keys import PARTITION_ID
from shared.lake import LocalLake, read_parquet
from shared.data.partitioning import prepare_dataset
from shared.registries.registry import ModelRegistry
from shared.runs.runner import run_parallel
from shared.forecasts.scoring import prepare_scoring, prediction_columns
from shared.data.synthetic import generate_panel
from shared.models.training import train_batch
from shared.data.validation import validate

HORIZON_N = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 partitions trained and registered in dev, 5 promoted to prod, horizon requests in 3 files."""
    root = tmp_path_factory.mktemp("entry")
    cfg = ProjectConfig().with_overrides({
        "forecast.horizon": HORIZON_N, "forecast.test_periods": 6, "forecast.validation_periods": 6,
        "forecast.min_train_periods": 20, "training.candidates": ["baseline", "loglinear"],
        "runner.rows_per_file": 9, "data.covariates": ["price", "promo"]})
    panel = pd.concat(generate_panel(partitions=8, periods=60, seed=5), ignore_index=True)
    validated, report = validate(panel, cfg)
    lake = LocalLake(root / "lake")
    ds = prepare_dataset(lake, validated, cfg, report)
    meta = json.loads(lake.read_bytes(f"{ds.root}/dataset.json"))
    dev, prod = ModelRegistry(root / "dev", "dev"), ModelRegistry(root / "prod", "prod")
    items = []
    for path in ds.batch_paths:
        for result in train_batch(read_parquet(lake, path), cfg, meta):
            buf = io.BytesIO()
            pickle.dump(result.bundle, buf, protocol=pickle.HIGHEST_PROTOCOL)
            items.append(({**result.to_row(), "run_id": "r1"}, buf.getvalue()))
    records = sorted(dev.register_many(items), key=lambda r: r.partition_id)
    prod.copy_many(dev, records[:5])
    files = [lake.local_path(p) for p in prepare_scoring(lake, cfg, ds, None, "s1")]
    config_file = root / "manymodels.toml"
    cfg.save(config_file)
    return {"root": root, "cfg": cfg, "files": files, "dev": dev, "prod": prod,
            "meta_file": lake.local_path(f"{ds.root}/dataset.json"), "config_file": config_file}


def args_for(world, out, dev=True):
    args = ["--config", str(world["config_file"]), "--dataset-meta", str(world["meta_file"]),
            "--prod-registry", str(world["prod"].root), "--output-dir", str(out), "--score-id", "s1"]
    return args + (["--dev-registry", str(world["dev"].root)] if dev else [])


def test_init_then_run_scores_each_file_and_returns_one_status_line_per_partition(world, tmp_path, monkeypatch):
    out = tmp_path / "predictions"
    # Azure ML appends arguments of its own: parse_known_args must let them through
    monkeypatch.setattr(sys, "argv", ["score.py", *args_for(world, out), "--logging_level", "INFO"])
    entry.init()
    assert len(world["files"]) == 3
    lines = entry.run([str(f) for f in world["files"][:2]])
    rows = [json.loads(line) for line in lines]
    frames = {f.stem: pd.read_parquet(out / f"{f.stem}.parquet") for f in world["files"][:2]}
    requested = pd.concat([pd.read_parquet(f) for f in world["files"][:2]])
    assert sorted(r[PARTITION_ID] for r in rows) == sorted(requested[PARTITION_ID])
    assert all(r["score_id"] == "s1" and r["status"] in ("scored", "fallback") for r in rows)
    predictions = pd.concat(frames.values(), ignore_index=True)
    assert predictions.columns.tolist() == [*prediction_columns(world["cfg"]), "score_id"]
    assert len(predictions) == len(requested) * HORIZON_N
    assert sum(r["rows"] for r in rows) == len(predictions)
    fallback = {r[PARTITION_ID] for r in rows if r["status"] == "fallback"}
    assert set(predictions.loc[predictions["is_fallback"] == 1, PARTITION_ID]) == fallback

    stamp = (out / f"{world['files'][0].stem}.parquet").stat().st_mtime_ns
    again = entry.run([str(world["files"][0])])  # done already: the stored status lines come back
    assert again == lines[: len(again)] and (out / f"{world['files'][0].stem}.parquet").stat().st_mtime_ns == stamp


def test_without_a_dev_registry_partitions_lacking_a_production_model_have_no_model(world, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["score.py", *args_for(world, tmp_path / "out", dev=False)])
    entry.init()
    rows = [json.loads(line) for f in world["files"] for line in entry.run([str(f)])]
    assert sum(r["status"] == "scored" for r in rows) == 5
    missing = [r for r in rows if r["status"] == "no_model"]
    assert len(missing) == 3 and all("no development registry" in r["reason"] for r in missing)


def test_the_local_runner_runs_the_entry_script_in_worker_processes_and_resumes(world, tmp_path):
    out, results = tmp_path / "predictions", tmp_path / "results"
    spec = RunnerSpec(workers=2, mini_batch_size=1, retries=0, progress=False)
    files = [str(f) for f in world["files"]]
    first = run_parallel("shared.entry.score", files, args_for(world, out), spec, results)
    assert first.ok and first.batches_done == 3
    statuses = pd.Series([r["status"] for r in first.rows]).value_counts().to_dict()
    assert statuses == {"scored": 5, "fallback": 3}
    written = sorted(p.name for p in out.glob("*.parquet"))
    assert written == [f"{f.stem}.parquet" for f in world["files"]]
    total = sum(len(pd.read_parquet(p)) for p in out.glob("*.parquet"))
    assert total == 8 * HORIZON_N

    # a crash lost the last file's predictions and its journal entry: the rerun redoes only that file
    victim = world["files"][-1].stem
    (out / f"{victim}.parquet").unlink()
    (out / f"{victim}{entry.STATUS_SUFFIX}").unlink()
    (results / f"{victim}.jsonl").unlink()
    kept = (out / f"{world['files'][0].stem}.parquet").stat().st_mtime_ns
    second = run_parallel("shared.entry.score", files, args_for(world, out), spec, results)
    assert second.ok and (second.batches_done, second.batches_skipped) == (1, 2)
    assert second.rows == first.rows
    assert (out / f"{victim}.parquet").is_file()
    assert (out / f"{world['files'][0].stem}.parquet").stat().st_mtime_ns == kept
