"""Prepared datasets in the lake: mini-batch files of whole partitions, manifest, idempotent ids."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.data.ingest import read_source
from shared.keys import partition_id
from shared.lake import LakeError, LocalLake, read_parquet
from shared.data.partitioning import file_rows, fingerprint, latest_dataset, load_dataset, pack_batches, prepare_dataset
from shared.data.synthetic import generate_panel, write_panel
from shared.data.validation import validate

CFG = ProjectConfig().with_overrides({"runner.rows_per_file": 2000})


@pytest.fixture(scope="module")
def panel() -> pd.DataFrame:
    return pd.concat(generate_panel(partitions=200, periods=60, seed=7), ignore_index=True)


@pytest.fixture(scope="module")
def validated(panel):
    return validate(panel, CFG)


def prepare(lake: LocalLake, raw: pd.DataFrame, cfg: ProjectConfig = CFG):
    frame, report = validate(raw, cfg)
    return prepare_dataset(lake, frame, cfg, report)


def files_with_mtimes(lake: LocalLake) -> dict[str, int]:
    return {p: lake.local_path(p).stat().st_mtime_ns for p in lake.list("prepared")}


def test_generated_panel_is_prepared_into_few_batch_files_with_a_matching_manifest(tmp_path, validated):
    frame, report = validated
    lake = LocalLake(tmp_path)
    ds = prepare_dataset(lake, frame, CFG, report)
    manifest = ds.manifest

    assert re.fullmatch(r"d[0-9a-f]{16}", ds.dataset_id) and not ds.reused
    assert len(manifest) == report.partitions == frame["partition_id"].nunique() == 200
    assert manifest["n_rows"].sum() == len(frame) == ds.n_rows
    assert (manifest["n_rows"] - manifest["n_observed"]).sum() == report.counts.get("filled_gaps", 0)
    assert manifest["fingerprint"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert list(manifest.columns) == [
        "partition_id",
        "store",
        "item",
        "n_rows",
        "n_observed",
        "first_period",
        "last_period",
        "last_time",
        "fingerprint",
        "batch",
    ]

    # whole partitions, packed to about rows_per_file: far fewer files than partitions
    # ~12,000 rows and 2 workers: files of 1,000 rows (the floor of file_rows), about 12 of them
    target = file_rows(len(frame), CFG)
    assert target == 1000
    assert len(frame) / target <= len(ds.batch_paths) <= 1.2 * len(frame) / target + 1
    assert [p.rsplit("/", 1)[1] for p in ds.batch_paths] == [
        f"batch-{i:05d}.parquet" for i in range(len(ds.batch_paths))
    ]
    rows_seen = 0
    for path in ds.batch_paths:
        batch = read_parquet(lake, path)
        rows_seen += len(batch)
        in_manifest = manifest[manifest["batch"] == path.rsplit("/", 1)[1]]
        assert set(batch["partition_id"]) == set(in_manifest["partition_id"])
        assert len(batch) == in_manifest["n_rows"].sum()
        assert len(batch) <= CFG.runner.rows_per_file or len(in_manifest) == 1
        for _, row in in_manifest.iterrows():
            part = batch[batch["partition_id"] == row["partition_id"]]
            assert (
                part["_period"].min() == row["first_period"] and part["_period"].max() == row["last_period"]
            )
            assert part["date"].iloc[-1] == row["last_time"]
    assert rows_seen == len(frame)

    meta = json.loads(lake.read_bytes(f"prepared/{ds.dataset_id}/dataset.json"))
    assert meta["n_partitions"] == 200 and meta["n_rows"] == len(frame)
    assert meta["anchor"] == ds.anchor == "start:518400"
    assert (
        meta["validation"]["input_rows"] == report.input_rows
        and meta["validation"]["counts"] == report.counts
    )
    assert meta["config"]["runner"]["rows_per_file"] == 2000


def test_batch_files_round_trip_the_validated_frame(tmp_path, validated):
    frame, report = validated
    lake = LocalLake(tmp_path)
    ds = prepare_dataset(lake, frame, CFG, report)
    back = pd.concat([read_parquet(lake, p) for p in ds.batch_paths], ignore_index=True)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)


def test_reingesting_the_same_data_is_a_no_op_returning_the_existing_dataset(tmp_path, panel):
    lake = LocalLake(tmp_path)
    first = prepare(lake, panel)
    before = files_with_mtimes(lake)
    again_frame, again_report = validate(panel.sample(frac=1.0, random_state=1), CFG)  # same rows, new order
    second = prepare_dataset(lake, again_frame, CFG, again_report)
    assert second.dataset_id == first.dataset_id and second.reused
    assert files_with_mtimes(lake) == before
    pd.testing.assert_frame_equal(second.manifest, first.manifest)


def test_changed_data_gets_a_new_dataset_and_only_the_changed_partition_a_new_fingerprint(tmp_path, panel):
    lake = LocalLake(tmp_path)
    first = prepare(lake, panel)
    changed = panel.copy()
    changed.loc[10, "sales"] += 1.0
    second = prepare(lake, changed)
    assert second.dataset_id != first.dataset_id and not second.reused
    merged = first.manifest.merge(second.manifest, on="partition_id", suffixes=("_a", "_b"))
    differs = merged[merged["fingerprint_a"] != merged["fingerprint_b"]]
    assert differs["partition_id"].tolist() == [partition_id([panel.loc[10, "store"], panel.loc[10, "item"]])]


def test_the_same_data_from_csv_and_parquet_gives_the_same_dataset_id(tmp_path):
    write_panel(tmp_path / "p.csv", partitions=15, periods=30, seed=3)
    write_panel(tmp_path / "p.parquet", partitions=15, periods=30, seed=3)
    from_csv = fingerprint(validate(read_source(tmp_path / "p.csv", CFG), CFG)[0], CFG)
    from_parquet = fingerprint(validate(read_source(tmp_path / "p.parquet", CFG), CFG)[0], CFG)
    pd.testing.assert_series_equal(from_csv, from_parquet)


def test_a_different_data_config_gives_a_different_dataset(tmp_path, panel):
    lake = LocalLake(tmp_path)
    first = prepare(lake, panel)
    second = prepare(lake, panel, CFG.with_overrides({"data.covariates": ["price"]}))
    assert second.dataset_id != first.dataset_id


def test_load_dataset_returns_what_prepare_wrote_and_latest_dataset_finds_the_newest(tmp_path, panel):
    lake = LocalLake(tmp_path)
    assert latest_dataset(lake) is None
    first = prepare(lake, panel.iloc[:3000])
    second = prepare(lake, panel.iloc[3000:])
    loaded = load_dataset(lake, first.dataset_id)
    pd.testing.assert_frame_equal(loaded.manifest, first.manifest)
    assert loaded.batch_paths == first.batch_paths and all(lake.exists(p) for p in loaded.batch_paths)
    assert loaded.anchor == first.anchor and loaded.config == CFG.to_dict()
    assert loaded.validation["partitions"] == len(first.manifest)
    assert latest_dataset(lake) == second.dataset_id
    with pytest.raises(LakeError, match="no prepared dataset d0000000000000000"):
        load_dataset(lake, "d0000000000000000")
    with pytest.raises(LakeError, match="invalid dataset id"):
        load_dataset(lake, "../../etc")


def test_odd_key_values_never_reach_file_names_and_the_manifest_maps_ids_back(tmp_path):
    keys = ["a/b", "x'; DROP TABLE sales;--", "Café ☕", "../../etc/passwd", "007"]
    dates = pd.date_range("2023-01-01", periods=8, freq="W")
    frame = pd.DataFrame(
        [(k, "i 1", d, float(n), 2.0, 0) for k in keys for n, d in enumerate(dates)],
        columns=["store", "item", "date", "sales", "price", "promo"],
    )
    lake = LocalLake(tmp_path)
    ds = prepare(lake, frame)
    assert sorted(ds.manifest["store"]) == sorted(keys)
    for _, row in ds.manifest.iterrows():
        assert row["partition_id"] == partition_id([row["store"], row["item"]])
    for path in lake.list("prepared"):
        assert re.fullmatch(
            r"prepared/d[0-9a-f]{16}/(batches/batch-\d{5}\.parquet|manifest\.parquet|dataset\.json)", path
        )
    assert {p.name for p in tmp_path.iterdir()} == {"prepared"}


def test_numeric_keys_are_stored_as_text_in_the_manifest(tmp_path):
    frame = pd.DataFrame(
        {
            "store": [7] * 5,
            "item": [42] * 5,
            "date": pd.date_range("2023-01-01", periods=5, freq="W"),
            "sales": np.arange(5.0),
            "price": 1.0,
            "promo": 0,
        }
    )
    ds = prepare(LocalLake(tmp_path), frame)
    assert ds.manifest.loc[0, "store"] == "7" and ds.manifest.loc[0, "item"] == "42"
    assert ds.manifest.loc[0, "partition_id"] == partition_id(["7", "42"])


def test_pack_batches_fills_files_greedily_and_gives_a_big_partition_its_own_file():
    assert pack_batches(np.array([5, 5, 5, 20, 1, 1]), 10).tolist() == [0, 0, 1, 2, 3, 3]
    assert pack_batches(np.array([3, 3, 3]), 100).tolist() == [0, 0, 0]
    assert pack_batches(np.array([30]), 10).tolist() == [0]


def test_prepare_refuses_a_frame_that_was_not_validated_and_writes_nothing(tmp_path, panel):
    lake = LocalLake(tmp_path)
    with pytest.raises(ValueError, match="needs a validated frame"):
        prepare_dataset(lake, panel, CFG, validate(panel, CFG)[1])
    frame, report = validate(panel, CFG)
    with pytest.raises(ValueError, match="must be sorted by partition_id"):
        prepare_dataset(lake, frame.iloc[::-1], CFG, report)
    assert lake.list("prepared") == []


def test_file_size_keeps_about_sixteen_files_per_worker_within_the_configured_cap():
    cfg = ProjectConfig().with_overrides({"runner.workers": 2, "runner.rows_per_file": 5000})
    assert file_rows(78_000, cfg) == 2_438  # 32 files for 2 workers
    assert file_rows(10_000_000, cfg) == 5_000  # never above rows_per_file
    assert file_rows(5_000, cfg) == 1_000  # never below 1,000 rows
