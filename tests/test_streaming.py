"""Streaming ingestion gives what the in-memory path gives: same files, manifest, report, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.lake import LocalLake
from shared.data.stream_parts import _kth
from shared.data.streaming import StreamPlan, fits_in_memory, ingest_source
from shared.data.synthetic import generate_panel
from shared.data.validation import DataValidationError

CFG = ProjectConfig().with_overrides({"runner.rows_per_file": 1500, "data.covariates": ["price", "promo"]})
# many small parts: several buckets per part, parts validated in two worker processes
SMALL = StreamPlan(batch_rows=997, buckets=16, part_rows=700, workers=2, worker_mb=64)


def messy_panel(seed: int = 5) -> pd.DataFrame:
    """A generated panel with every repair validation makes, spread over the input."""
    frame = pd.concat(generate_panel(partitions=60, periods=80, seed=seed), ignore_index=True)
    rng = np.random.default_rng(seed)
    n = len(frame)
    frame.loc[rng.choice(n, 25, replace=False), "sales"] = np.nan
    frame.loc[rng.choice(n, 25, replace=False), "sales"] = -3.0
    frame.loc[rng.choice(n, 30, replace=False), "price"] = np.nan
    frame = frame.astype({"promo": "float64"})
    frame.loc[rng.choice(n, 20, replace=False), "promo"] = np.nan
    # a partition with no price at all: the whole input's median
    first = frame[["store", "item"]].drop_duplicates().iloc[7]
    frame.loc[(frame["store"] == first["store"]) & (frame["item"] == first["item"]), "price"] = np.nan
    dups = frame.sample(40, random_state=seed)
    frame = pd.concat([frame, dups.assign(sales=dups["sales"] + 1)], ignore_index=True)
    frame.loc[rng.choice(len(frame), 6, replace=False), "item"] = None
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # not sorted by key


def snapshot(lake: LocalLake) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in lake.list("prepared"):
        data = lake.read_bytes(path)
        if path.endswith("dataset.json"):
            meta = json.loads(data)
            meta.pop("created_at")
            out[path] = meta
        else:
            out[path] = hashlib.sha256(data).hexdigest()
    return out


def both(tmp_path, source, cfg=CFG, plan=SMALL):
    a, b = LocalLake(tmp_path / "memory"), LocalLake(tmp_path / "stream")
    ds_a, rep_a = ingest_source(a, source, cfg, stream=False)
    ds_b, rep_b = ingest_source(b, source, cfg, stream=True, plan=plan, tmp_root=tmp_path)
    return (a, ds_a, rep_a), (b, ds_b, rep_b)


def assert_same(tmp_path, source, cfg=CFG, plan=SMALL):
    (a, ds_a, rep_a), (b, ds_b, rep_b) = both(tmp_path, source, cfg, plan)
    assert rep_b.to_dict() == rep_a.to_dict()
    assert ds_b.dataset_id == ds_a.dataset_id
    pd.testing.assert_frame_equal(ds_b.manifest, ds_a.manifest)
    assert snapshot(b) == snapshot(a)
    assert not list(tmp_path.glob("ingest-*")), "the spill folder is removed"
    return ds_a, rep_a


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_streaming_gives_the_same_dataset_and_report_as_in_memory(tmp_path, suffix):
    source = tmp_path / f"panel{suffix}"
    frame = messy_panel()
    frame.to_parquet(source, index=False) if suffix == ".parquet" else frame.to_csv(source, index=False)
    cfg = CFG.with_overrides({"validation.null_keys": "drop"})
    ds, report = assert_same(tmp_path, source, cfg)
    # the data exercised every repair, and several parts and batch files
    assert {
        "dropped_null_keys",
        "dropped_null_target",
        "clipped_negative_target",
        "merged_duplicates",
        "filled_null_covariates",
        "median_filled_null_covariates",
        "filled_gaps",
    } <= set(report.counts)
    assert len(ds.batch_paths) > 3 and ds.n_partitions == 60


@pytest.mark.parametrize(
    "policy",
    [
        {"validation.duplicates": "last", "validation.gaps": "interpolate", "validation.null_target": "zero"},
        {"validation.gaps": "keep", "validation.negative_target": "drop", "validation.null_covariates": "zero"},
    ],
)
def test_other_policies_stream_identically(tmp_path, policy):
    source = tmp_path / "panel.parquet"
    messy_panel(seed=11).to_parquet(source, index=False)
    assert_same(tmp_path, source, CFG.with_overrides({"validation.null_keys": "drop", **policy}))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_columns_typed_differently_in_some_batches_read_as_the_whole_input(tmp_path, suffix):
    """A null late in an integer column: the whole column is float (or nullable Int64 from pandas'
    Parquet metadata) when read at once, so every part must read it so too; a bool key as well."""
    frame = clean()
    frame["promo"] = frame["promo"].astype("int64")
    frame.loc[len(frame) - 3, "promo"] = None  # the last scan batch only
    frame["flag"] = (frame.index % 2 == 0).astype(object)  # an extra column, only shown in examples
    frame.loc[len(frame) - 4, "flag"] = None
    frame.loc[[2, 900], "sales"] = np.nan
    source = tmp_path / f"panel{suffix}"
    if suffix == ".parquet":
        frame.astype({"promo": "Int64"}).to_parquet(source, index=False)
    else:
        frame.to_csv(source, index=False)
    ds, report = assert_same(tmp_path, source)
    assert report.counts["filled_null_covariates"] == 1 and report.examples["dropped_null_target"]


def test_integer_periods_and_one_part_per_bucket(tmp_path):
    frame = pd.concat(generate_panel(partitions=30, periods=40, freq="int", seed=2), ignore_index=True)
    source = tmp_path / "panel.parquet"
    frame.to_parquet(source, index=False)
    cfg = CFG.with_overrides({"data.freq": "int"})
    assert_same(tmp_path, source, cfg, StreamPlan(batch_rows=500, buckets=32, part_rows=1, workers=1, worker_mb=64))


def errors(tmp_path, frame: pd.DataFrame, cfg=CFG, suffix=".csv") -> tuple[str, str]:
    source = tmp_path / f"bad{suffix}"
    frame.to_parquet(source, index=False) if suffix == ".parquet" else frame.to_csv(source, index=False)
    messages = []
    for stream in (False, True):
        with pytest.raises(DataValidationError) as caught:
            ingest_source(LocalLake(tmp_path / f"lake{stream}"), source, cfg, stream=stream, plan=SMALL, tmp_root=tmp_path)
        messages.append(str(caught.value))
    assert not LocalLake(tmp_path / "lakeTrue").list("prepared")
    return messages[0], messages[1]


def clean() -> pd.DataFrame:
    return pd.concat(generate_panel(partitions=40, periods=30, seed=3), ignore_index=True)


def test_a_missing_column_fails_with_the_same_message(tmp_path):
    memory, stream = errors(tmp_path, clean().drop(columns=["price"]))
    assert memory == stream and "missing column(s) 'price' (covariate)" in stream


def test_type_errors_fail_with_the_same_message_counts_and_examples(tmp_path):
    frame = clean().astype({"sales": object, "date": str})
    frame.loc[[5, 700, 1100], "sales"] = "many"
    memory, stream = errors(tmp_path, frame)
    assert memory == stream and "target is not numeric (3 rows)" in stream
    frame = clean().astype({"date": str})
    frame.loc[[3, 400, 401, 1000], "date"] = "someday"
    memory, stream = errors(tmp_path, frame)
    assert memory == stream and "not a date" in stream and "(4 rows)" in stream


def test_policy_errors_sum_rows_over_parts(tmp_path):
    frame = clean()
    copies = pd.concat([frame, frame.iloc[::97]], ignore_index=True)  # the same rows twice: refused by default
    memory, stream = errors(tmp_path, copies, CFG, ".parquet")
    assert memory == stream and "rows repeat earlier rows exactly" in stream
    dup = pd.concat([frame, frame.iloc[::97].assign(sales=lambda f: f["sales"] + 1)], ignore_index=True)
    memory, stream = errors(tmp_path, dup, CFG.with_overrides({"validation.duplicates": "error"}), ".parquet")
    assert memory == stream and "duplicate rows" in stream
    nulls = frame.copy()
    nulls.loc[[10, 500, 900], "store"] = None
    memory, stream = errors(tmp_path, nulls, CFG, ".parquet")
    assert memory == stream and "partition key is null" in stream and "(3 rows)" in stream
    memory, stream = errors(tmp_path, frame.assign(price=np.nan), CFG, ".parquet")
    assert memory == stream and "covariate is null in every row" in stream
    memory, stream = errors(tmp_path, frame.iloc[:0], CFG, ".parquet")
    assert memory == stream and "empty input" in stream


def test_the_path_is_chosen_by_size_and_the_memory_setting(tmp_path):
    source = tmp_path / "panel.parquet"
    clean().to_parquet(source, index=False)
    assert fits_in_memory(source, CFG)
    assert not fits_in_memory(source, CFG.with_overrides({"ingest.memory_mb": 64, "ingest.workers": 1}))


def test_reingesting_streamed_data_reuses_the_dataset(tmp_path):
    source = tmp_path / "panel.parquet"
    clean().to_parquet(source, index=False)
    lake = LocalLake(tmp_path / "lake")
    first, _ = ingest_source(lake, source, CFG, stream=True, plan=SMALL, tmp_root=tmp_path)
    again, _ = ingest_source(lake, source, CFG, stream=True, plan=SMALL, tmp_root=tmp_path)
    assert again.reused and again.dataset_id == first.dataset_id


def test_kth_selection_over_sorted_arrays_matches_numpy():
    rng = np.random.default_rng(0)
    arrays = [np.sort(rng.normal(size=n).round(1)) for n in (0, 1, 7, 100, 55)]
    every = np.sort(np.concatenate(arrays))
    for k in (0, 1, 50, 81, len(every) - 1):
        assert _kth([a for a in arrays if len(a)], k) == every[k]
