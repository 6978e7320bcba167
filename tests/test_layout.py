"""The lake layout: one module builds every path, and the paths are the documented contract."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared import layout
from shared.runs.compute import job_id_for
from shared.lake import check_path


def test_the_layout_is_the_documented_contract() -> None:
    """Workdirs written by earlier releases are read by this one: these strings never change."""
    assert layout.LATEST_DATASET == "prepared/LATEST" and layout.LATEST_RUN == "runs/LATEST"
    assert layout.dataset_meta("d1") == "prepared/d1/dataset.json"
    assert layout.dataset_manifest("d1") == "prepared/d1/manifest.parquet"
    assert layout.batch("d1", "batch-00000.parquet") == "prepared/d1/batches/batch-00000.parquet"
    assert layout.run_meta("r1") == "runs/r1/run.json"
    assert layout.run_config("r1") == "runs/r1/config/manymodels.toml"
    assert layout.global_model("r1") == "runs/r1/global/global.pkl"
    assert layout.model_artifact("r1", "p1") == "runs/r1/models/p1.pkl"
    assert layout.run_results("r1") == "runs/r1/results"
    assert layout.group_results("r1", 3) == "runs/r1/results/g00003"
    assert layout.run_predictions("s1") == "runs/s1/predictions"
    assert layout.job_record("r1", "train-r1-g00000") == "runs/r1/jobs/train-r1-g00000.json"
    assert layout.group_inputs("r1", 2) == "runs/r1/inputs/g00002"
    assert layout.registry_slice("s1", 0, "prod") == "runs/s1/registry/g00000/prod"
    assert layout.scoring_batches("s1") == "scoring/s1/batches"
    assert layout.predictions("s1") == "predictions/s1/predictions.parquet"
    assert layout.registry_index("prod") == "registry/prod/index.sqlite"


def test_every_path_is_a_valid_lake_path_in_a_known_container() -> None:
    paths = [layout.LATEST_DATASET, layout.LATEST_RUN, layout.dataset_meta("d1"), layout.batch("d1", "b.parquet"),
             layout.run_meta("r1"), layout.model_artifact("r1", "p1"), layout.job_record("r1", "j"),
             layout.registry_slice("s1", 1, "dev"), layout.scoring_batches("s1"), layout.predictions("s1")]
    for path in paths:
        assert check_path(path) == path
        assert layout.container(path) in layout.CONTAINERS


def test_a_job_id_names_its_run() -> None:
    for run_id in ("r5f403173afb70f5f", "s6550b4e25323be26"):
        assert layout.run_of_job(job_id_for("train", run_id, 12)) == run_id


def test_sources_are_what_upstream_lands() -> None:
    assert layout.is_source("raw/sales/2024.parquet") and layout.is_source("scoring/next.csv")
    assert not layout.is_source("runs/r1/run.json") and not layout.is_source("sales.csv")


def test_unknown_registry_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown registry"):
        layout.registry_dir("staging")


def test_the_modules_that_still_spell_paths_agree_with_the_layout() -> None:
    from shared.data.partitioning import PREPARED, dataset_root
    from shared.forecasts.scoring import SCORING

    assert dataset_root("d1") == layout.dataset_dir("d1") and PREPARED == layout.PREPARED
    assert SCORING == layout.SCORING


def test_a_demo_workdir_has_exactly_the_layouts_paths(tmp_path: Path) -> None:
    """Ingest, train, promote and score a small panel; every file of the lake is one the layout names."""
    from shared.models.incremental import training_config_digest
    from shared.runs.pipeline import run_all
    from shared.data.synthetic import write_panel
    from shared.runs.workspace import Workspace

    data = tmp_path / "sales.parquet"
    write_panel(data, partitions=4, periods=60, freq="W", seed=3)
    ws = Workspace.open(tmp_path / "ws", overrides={"runner.progress": False, "runner.workers": 1,
                                                    "forecast.horizon": 4, "forecast.test_periods": 4,
                                                    "forecast.validation_periods": 4})
    out = run_all(ws, data)
    d, r, s = out["dataset_id"], out["run_id"], out["score_id"]
    files = set(ws.lake.list("prepared")) | set(ws.lake.list("runs")) | set(ws.lake.list("predictions"))
    expected_prefixes = (layout.dataset_dir(d) + "/", layout.run_dir(r) + "/", layout.run_dir(s) + "/")
    assert {layout.LATEST_DATASET, layout.LATEST_RUN, layout.dataset_meta(d), layout.dataset_manifest(d),
            layout.run_meta(r), layout.run_config(r), layout.global_model(r), layout.run_meta(s),
            layout.predictions(s)} <= files
    marker = layout.dataset_run(d, training_config_digest(ws.config))
    assert ws.lake.read_bytes(marker).decode() == r
    for path in files - {layout.LATEST_DATASET, layout.LATEST_RUN, layout.predictions(s), marker}:
        assert path.startswith(expected_prefixes), path
    assert ws.lake.read_bytes(layout.LATEST_RUN).decode() == r
    assert (ws.root / layout.registry_index("prod")).is_file()
