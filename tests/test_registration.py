"""Registration's row mapping: result rows become registry records, SQL rows and backtests, bundles unopened."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.lake import LocalLake
from shared.registries.registry import ArtifactIntegrityError, ArtifactRange
from shared.registries.registration import (ManifestLookup, RunArtifacts, aggregate_wape, artifact_source, backtests_frame, global_record, keys_of,
                                 metrics_row, record_for, result_rows)

KEYS = ["store", "item"]


@pytest.fixture
def manifest() -> pd.DataFrame:
    return pd.DataFrame({"partition_id": ["p1", "p2"], "store": ["S1", "S2"], "item": ["I1", "I2"],
                         "n_observed": [40, 12], "fingerprint": ["f1", "f2"]}).set_index("partition_id")


def row(pid: str = "p1", **extra) -> dict:
    return {"partition_id": pid, "status": "trained", "model_name": "loglinear", "n_observed": 40,
            "metrics": {"wape": 0.2, "mape": 0.3, "rmse": 1.0, "accuracy": 0.8}, "baseline_metrics": {"wape": 0.4},
            "fit_seconds": 0.01,
            "backtest": [{"_period": 10, "actual": 10.0, "prediction": 8.0, "baseline": 5.0, "global": 9.0},
                         {"_period": 11, "actual": 10.0, "prediction": 12.0, "baseline": 5.0, "global": 11.0}],
            **extra}


def test_a_record_carries_keys_tags_and_the_manifests_history(manifest) -> None:
    record = record_for(row(), "r1", manifest, KEYS)
    assert record_for(row(), "r1", ManifestLookup(manifest), KEYS) == record  # the dict lookup registration uses
    assert keys_of(ManifestLookup(manifest), "p1", KEYS) == keys_of(manifest, "p1", KEYS) == {"store": "S1", "item": "I1"}
    assert record["keys"] == {"store": "S1", "item": "I1"} and record["fingerprint"] == "f1"
    assert record["metrics"]["n_observed"] == 40 and record["metrics"]["baseline_wape"] == 0.4
    assert record["tags"] == {"store": "S1", "item": "I1", "partition_id": "p1", "run_id": "r1",
                              "model_type": "loglinear", "fingerprint": "f1", "status": "trained", "n_observed": "40"}


def test_a_metrics_row_has_the_registered_version_and_the_partitions_keys(manifest) -> None:
    out = metrics_row(row(), "r1", manifest, KEYS, {"p1": 3})
    assert out["model_version"] == 3 and out["store"] == "S1" and out["wape"] == 0.2 and out["registry"] == "dev"
    assert metrics_row(row("p9"), "r1", manifest, KEYS, {})["model_version"] is None
    assert keys_of(manifest, "p9", KEYS) == {}


def test_pooled_wape_weights_by_volume() -> None:
    assert aggregate_wape([row()]) == (0.2, 0.5)
    assert aggregate_wape([{"backtest": []}]) == (None, None)


def test_backtests_become_time_stamps_with_the_keys(manifest) -> None:
    cfg = ProjectConfig()
    frame = backtests_frame(cfg, "r1", [row(), {"partition_id": "p2"}], manifest, KEYS, anchor=None)
    assert list(frame["partition_id"]) == ["p1", "p1"] and set(frame["store"]) == {"S1"}
    assert "global_forecast" in frame and "_period" not in frame and (frame["run_id"] == "r1").all()
    assert frame[cfg.data.time].is_monotonic_increasing
    assert backtests_frame(cfg, "r1", [{"partition_id": "p1"}], manifest, KEYS, None) is None


def test_result_rows_keep_the_last_row_of_each_partition(tmp_path) -> None:
    lake = LocalLake(tmp_path)
    lake.write_bytes("runs/r1/results/a.jsonl", (json.dumps(row(status="failed")) + "\n\n").encode())
    lake.write_bytes("runs/r1/results/b.jsonl", (json.dumps(row()) + "\n").encode())
    lake.write_bytes("runs/r1/results/b.status", b"ignored")
    rows = result_rows(lake, "runs/r1/results")
    assert [r["status"] for r in rows] == ["trained"]


def test_artifacts_are_read_in_place_on_a_local_lake_and_without_a_global_model_there_is_no_record(tmp_path) -> None:
    lake = LocalLake(tmp_path)
    lake.write_bytes("runs/r1/models/p1.pkl", b"x")
    assert artifact_source(lake, "runs/r1/models/p1.pkl") == lake.local_path("runs/r1/models/p1.pkl")
    assert global_record(lake, "r1", [row()]) is None


def test_a_runs_models_are_read_from_their_chunks_pack_and_older_runs_from_their_own_files(tmp_path) -> None:
    lake = LocalLake(tmp_path)
    lake.write_bytes("runs/r1/models/b0.0123456789abcdef.pack", b"AAAABBBBBB")
    lake.write_bytes("runs/r1/models/p9.pkl", b"older release")
    artifacts = RunArtifacts(lake, "r1")
    second = {"partition_id": "p2", "artifact": "b0.0123456789abcdef.pack", "byte_offset": 4, "byte_length": 6}
    source = artifacts.source(second)  # a local pack: its range, read when registered
    assert isinstance(source, ArtifactRange) and artifacts.exists(second) and source.read() == b"BBBBBB"
    older = {"partition_id": "p9", "artifact": "p9.pkl"}  # no byte range: a file per partition
    assert artifacts.exists(older) and artifacts.source(older).read_bytes() == b"older release"
    assert not artifacts.exists({**second, "artifact": "b1.0123456789abcdef.pack"})
    for bad in ("../../prod/x.pack", "sub/x.pack", "x.pkl", ""):  # a row names a pack of this run's folder only
        with pytest.raises(ValueError, match="not a pack"):
            artifacts.exists({**second, "artifact": bad})
    cut = {**second, "byte_length": 60}
    with pytest.raises(ArtifactIntegrityError, match="shorter than the range"):
        artifacts.source(cut).read()
