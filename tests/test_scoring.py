"""Batch scoring: requests prepared from a scoring file or the horizon, scored by production
models (or the baseline fallback), each partition's outcome reported.

The models are real: trained by ``shared.models.training`` on the synthetic panel and registered in
real registries (files + SQLite index) in a temporary folder.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.keys import PARTITION_ID, partition_id
from shared.lake import LocalLake, read_parquet
from shared.data.partitioning import prepare_dataset
from shared.registries.registry import ModelRegistry
from shared.forecasts.scoring import HORIZON, KNOWN, prediction_columns, prepare_scoring, score_batch, score_frame
from shared.data.synthetic import generate_panel
from shared.data.timegrid import PERIOD
from shared.data.validation import DataValidationError, validate

HORIZON_N = 4


def config(**overrides) -> ProjectConfig:
    base = {"forecast.horizon": HORIZON_N, "forecast.test_periods": 8, "forecast.validation_periods": 8,
            "forecast.min_train_periods": 20, "training.candidates": ["baseline", "loglinear"],
            "runner.rows_per_file": 400, "data.covariates": ["price", "promo"]}
    return ProjectConfig().with_overrides({**base, **overrides})


@pytest.fixture(scope="module")
def panel() -> pd.DataFrame:
    return pd.concat(generate_panel(partitions=6, periods=70, seed=3), ignore_index=True)


@pytest.fixture
def dataset(tmp_path, panel):
    cfg = config()
    validated, report = validate(panel, cfg)
    lake = LocalLake(tmp_path / "lake")
    return lake, cfg, validated, prepare_dataset(lake, validated, cfg, report)


def future_rows(panel: pd.DataFrame, periods: int = 3) -> pd.DataFrame:
    """A scoring file: the next `periods` weeks of every series, with prices and promos, no target."""
    last = panel.groupby(["store", "item"], as_index=False).agg(date=("date", "max"), price=("price", "last"))
    rows = []
    for h in range(1, periods + 1):
        rows.append(last.assign(date=last["date"] + pd.Timedelta(weeks=h), promo=h % 2, price=last["price"] * 0.9))
    return pd.concat(rows, ignore_index=True)


# -- preparing requests ---------------------------------------------------------------------------
def test_horizon_mode_writes_one_request_per_partition_of_the_manifest(dataset):
    lake, cfg, _, ds = dataset
    paths = prepare_scoring(lake, cfg, ds, None, "s1", rows_per_file=8)
    assert all(p.startswith("scoring/s1/batches/batch-") for p in paths)
    requests = pd.concat([read_parquet(lake, p) for p in paths], ignore_index=True)
    assert len(paths) == 3  # 6 partitions x 4 periods, about 8 predictions per file
    assert sorted(requests[PARTITION_ID]) == sorted(ds.manifest[PARTITION_ID])
    assert requests[HORIZON].eq(HORIZON_N).all() and requests[KNOWN].all()
    manifest = ds.manifest.set_index(PARTITION_ID)
    assert (requests[PERIOD].to_numpy() == manifest.loc[requests[PARTITION_ID], "last_period"].to_numpy() + 1).all()
    assert requests["store"].tolist() == manifest.loc[requests[PARTITION_ID], "store"].tolist()
    meta = json.loads(lake.read_bytes("scoring/s1/scoring.json"))
    assert meta["mode"] == "horizon" and meta["partitions"] == 6


def test_preparing_the_same_score_id_twice_is_a_no_op(dataset):
    lake, cfg, _, ds = dataset
    first = prepare_scoring(lake, cfg, ds, None, "s1", rows_per_file=8)
    stamp = lake.local_path(first[0]).stat().st_mtime_ns
    assert prepare_scoring(lake, cfg, ds, None, "s1", rows_per_file=8) == first
    assert lake.local_path(first[0]).stat().st_mtime_ns == stamp


def test_a_scoring_file_is_mapped_to_partitions_and_periods_and_keeps_unknown_partitions(dataset, panel):
    lake, cfg, _, ds = dataset
    future = future_rows(panel)
    stranger = future.iloc[:2].assign(store="S999")  # a store the models never saw
    scoring = pd.concat([future, stranger], ignore_index=True).assign(sales=1.0)  # a target column is ignored
    scoring["date"] = scoring["date"].dt.strftime("%Y-%m-%d")  # as read from CSV
    paths = prepare_scoring(lake, cfg, ds, scoring, "s2", rows_per_file=5)
    requests = pd.concat([read_parquet(lake, p) for p in paths], ignore_index=True)
    assert len(requests) == len(scoring) and "sales" not in requests.columns
    assert requests[HORIZON].eq(0).all()
    assert requests.groupby(PARTITION_ID).size().max() == 3
    for path in paths:  # whole partitions per file
        ids = set(read_parquet(lake, path)[PARTITION_ID])
        others = set().union(*(set(read_parquet(lake, p)[PARTITION_ID]) for p in paths if p != path))
        assert not ids & others
    # the plan's partitions file says which partitions each file holds (what the registries are sliced by)
    index = read_parquet(lake, "scoring/s2/partitions.parquet")
    assert {(b, pid) for b, pid in zip(index["batch"], index[PARTITION_ID])} == \
        {(p.rsplit("/", 1)[1], pid) for p in paths for pid in set(read_parquet(lake, p)[PARTITION_ID])}
    unknown = requests[~requests[KNOWN]]
    assert set(unknown[PARTITION_ID]) == {partition_id(["S999", item]) for item in stranger["item"]}
    known = requests[requests[KNOWN]]
    assert set(known[PARTITION_ID]) == set(ds.manifest[PARTITION_ID])
    assert pd.api.types.is_datetime64_any_dtype(requests["date"]) and requests["price"].dtype == "float64"
    meta = json.loads(lake.read_bytes("scoring/s2/scoring.json"))
    assert meta["unknown_partitions"] == stranger["item"].nunique() == 2


@pytest.mark.parametrize("break_it, column, message", [
    (lambda f: f.drop(columns=["price"]), "price", "lacks column"),
    (lambda f: f.assign(date=["2024-01-07"] * (len(f) - 1) + ["next tuesday"]), "date", "not a date"),
    (lambda f: f.assign(promo=["yes"] + [0] * (len(f) - 1)), "promo", "not numeric"),
    (lambda f: f.assign(store=[None] + list(f["store"].iloc[1:])), "store", "partition key is null"),
])
def test_bad_scoring_files_are_refused_with_the_column_named(dataset, panel, tmp_path, break_it, column, message):
    lake, cfg, _, ds = dataset
    future = future_rows(panel).astype({"date": object, "promo": object, "store": object})
    with pytest.raises(DataValidationError, match=message) as info:
        prepare_scoring(lake, cfg, ds, break_it(future), "bad", rows_per_file=50)
    assert column in str(info.value)
    assert not lake.list("scoring/bad")  # nothing written


def test_duplicate_requests_are_refused(dataset, panel):
    lake, cfg, _, ds = dataset
    future = future_rows(panel)
    with pytest.raises(DataValidationError, match="more than once"):
        prepare_scoring(lake, cfg, ds, pd.concat([future, future.iloc[:1]]), "dup")


# -- scoring with real models ----------------------------------------------------------------------
def build_world(root, panel, promoted: int = 4):
    """Train every partition, register all in dev, copy the first `promoted` into prod."""
    import io

    import pickle

    from shared.models.training import train_batch

    cfg = config()
    validated, report = validate(panel, cfg)
    lake = LocalLake(root / "lake")
    ds = prepare_dataset(lake, validated, cfg, report)
    meta = json.loads(lake.read_bytes(f"{ds.root}/dataset.json"))
    dev, prod = ModelRegistry(root / "dev", "dev"), ModelRegistry(root / "prod", "prod")
    items, bundles = [], {}
    for path in ds.batch_paths:
        for result in train_batch(read_parquet(lake, path), cfg, meta):
            assert result.bundle is not None, result.reason
            buf = io.BytesIO()
            pickle.dump(result.bundle, buf, protocol=pickle.HIGHEST_PROTOCOL)
            items.append(({**result.to_row(), "run_id": "r1"}, buf.getvalue()))
            bundles[result.partition_id] = result.bundle
    records = dev.register_many(items)
    champions = prod.copy_many(dev, sorted(records, key=lambda r: r.partition_id)[:promoted])
    return {"cfg": cfg, "lake": lake, "ds": ds, "dev": dev, "prod": prod, "bundles": bundles,
            "champions": {r.partition_id: r for r in champions}, "dev_records": {r.partition_id: r for r in records}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, panel):
    return build_world(tmp_path_factory.mktemp("world"), panel)


def requests_of(world, frame, score_id):
    paths = prepare_scoring(world["lake"], world["cfg"], world["ds"], frame, score_id)
    return pd.concat([read_parquet(world["lake"], p) for p in paths], ignore_index=True)


def test_horizon_scoring_uses_production_models_and_falls_back_to_the_dev_baseline(world):
    cfg, champions, dev_records = world["cfg"], world["champions"], world["dev_records"]
    predictions, statuses = score_frame(requests_of(world, None, "h1"), cfg, world["prod"], world["dev"], "baseline")
    assert predictions.columns.tolist() == prediction_columns(cfg)
    assert len(predictions) == 6 * HORIZON_N and predictions["prediction"].ge(0).all()
    by_status = pd.Series({s[PARTITION_ID]: s["status"] for s in statuses})
    assert sorted(by_status[by_status == "scored"].index) == sorted(champions)
    assert by_status.value_counts().to_dict() == {"scored": 4, "fallback": 2}

    manifest = world["ds"].manifest.set_index(PARTITION_ID)
    for pid, rows in predictions.groupby(PARTITION_ID):
        last = manifest.loc[pid, "last_time"]
        assert rows["date"].tolist() == [last + pd.Timedelta(weeks=h) for h in range(1, HORIZON_N + 1)]
        assert rows["store"].iloc[0] == manifest.loc[pid, "store"] and rows["item"].iloc[0] == manifest.loc[pid, "item"]
        bundle = world["bundles"][pid]
        if pid in champions:
            record = champions[pid]
            assert (rows["model"].iloc[0], rows["model_version"].iloc[0], rows["is_fallback"].iloc[0]) == (
                record.model_type, record.version, 0)
            expected = bundle.predict(horizon=HORIZON_N)["prediction"]
        else:
            assert (rows["model"].iloc[0], rows["model_version"].iloc[0], rows["is_fallback"].iloc[0]) == (
                "baseline", dev_records[pid].version, 1)
            expected = bundle.predict(horizon=HORIZON_N, use_baseline=True)["prediction"]
        assert rows["prediction"].to_numpy() == pytest.approx(expected.to_numpy())
        assert rows["run_id"].eq("r1").all()


def test_without_the_fallback_partitions_lacking_a_production_model_get_no_rows(world):
    predictions, statuses = score_frame(requests_of(world, None, "h2"), world["cfg"], world["prod"], world["dev"],
                                        "none")
    assert set(predictions[PARTITION_ID]) == set(world["champions"])
    no_model = [s for s in statuses if s["status"] == "no_model"]
    assert len(no_model) == 2 and all("no fallback" in s["reason"] for s in no_model)
    assert all(s["rows"] == 0 for s in no_model)


def test_a_scoring_file_gets_exactly_its_rows_predicted(world, panel):
    cfg = world["cfg"]
    future = future_rows(panel, periods=3)
    stranger = future.iloc[:1].assign(store="S404")
    requests = requests_of(world, pd.concat([future, stranger], ignore_index=True), "f1")
    predictions, statuses = score_frame(requests, cfg, world["prod"], world["dev"], "baseline")
    asked = {(s, i, d) for s, i, d in future[["store", "item", "date"]].itertuples(index=False)}
    got = {(s, i, d) for s, i, d in predictions[["store", "item", "date"]].itertuples(index=False)}
    assert got == asked and len(predictions) == len(future)
    unknown = [s for s in statuses if s["status"] == "no_model"]
    assert len(unknown) == 1 and unknown[0]["reason"] == "partition not in the training data"
    assert unknown[0]["keys"] == {"store": "S404", "item": stranger["item"].iloc[0]}
    pid = sorted(world["champions"])[0]
    mine = requests[requests[PARTITION_ID] == pid]
    expected = world["bundles"][pid].predict(future=mine[["date", "price", "promo"]])
    got_rows = predictions[predictions[PARTITION_ID] == pid].sort_values("date")
    assert got_rows["prediction"].to_numpy() == pytest.approx(expected["prediction"].to_numpy())
    assert score_batch(requests, cfg, world["prod"], world["dev"], "baseline").equals(predictions)


def test_rows_dated_inside_a_period_are_stored_under_that_period_own_date(world, panel):
    """A Thursday asked of weekly (W-SUN) data is that week: SQL must not hold one week under two dates."""
    future = future_rows(panel, periods=2)
    future["date"] = future["date"] - pd.Timedelta(days=3)
    predictions, _ = score_frame(requests_of(world, future, "mid1"), world["cfg"], world["prod"], world["dev"],
                                 "baseline")
    on_time = future_rows(panel, periods=2)
    expected = {(s, i, d) for s, i, d in on_time[["store", "item", "date"]].itertuples(index=False)}
    assert {(s, i, d) for s, i, d in predictions[["store", "item", "date"]].itertuples(index=False)} == expected


def test_a_partition_that_cannot_be_predicted_fails_alone_with_its_reason(world, panel):
    future = future_rows(panel, periods=2)
    victim = sorted(world["champions"])[1]
    requests = requests_of(world, future, "p1")
    past = requests[PARTITION_ID] == victim
    requests.loc[past, PERIOD] = requests.loc[past, PERIOD] - 10  # periods the model was trained on
    predictions, statuses = score_frame(requests, world["cfg"], world["prod"], world["dev"], "baseline")
    failed = [s for s in statuses if s["status"] == "failed"]
    assert [s[PARTITION_ID] for s in failed] == [victim]
    assert "ValueError" in failed[0]["reason"] and "after the last trained period" in failed[0]["reason"]
    assert victim not in set(predictions[PARTITION_ID]) and predictions[PARTITION_ID].nunique() == 5


def test_scoring_an_empty_request_frame_gives_an_empty_predictions_frame(world):
    predictions, statuses = score_frame(requests_of(world, None, "h3").iloc[:0], world["cfg"], world["prod"],
                                        world["dev"], "baseline")
    assert predictions.empty and predictions.columns.tolist() == prediction_columns(world["cfg"])
    assert statuses == []


def test_null_covariates_follow_the_ingestion_policy(world, panel):
    future = future_rows(panel)
    future.loc[future.index[:6], "price"] = np.nan  # the first requested period of every partition
    requests = requests_of(world, future, "ff")  # policy ffill: the model carries its last price forward
    assert requests["price"].isna().sum() == 6
    predictions, statuses = score_frame(requests, world["cfg"], world["prod"], world["dev"], "baseline")
    assert len(predictions) == len(future) and np.isfinite(predictions["prediction"]).all()
    assert {s["status"] for s in statuses} == {"scored", "fallback"}
    zero = prepare_scoring(world["lake"], config(**{"validation.null_covariates": "zero"}), world["ds"], future, "z")
    assert pd.concat([read_parquet(world["lake"], p) for p in zero])["price"].eq(0.0).sum() == 6
    with pytest.raises(DataValidationError, match="'price': covariate is null"):
        prepare_scoring(world["lake"], config(**{"validation.null_covariates": "error"}), world["ds"], future, "e")


def test_beating_the_baseline_is_judged_on_errors_one_outlier_cannot_swamp():
    """Issue 18 item 1: with a 1e15 week in its backtests, a model whose forecasts ran to 1e11 had a
    pooled backtest WAPE a hair below its baseline's (both swamped by the outlier) and was served."""
    from types import SimpleNamespace

    from shared.models.metrics import robust_wape
    from shared.forecasts.scoring import beats_baseline, lost_to_baseline

    actual = np.r_[np.full(35, 60.0), 1e15]
    model = np.r_[np.full(35, 3.4e10), 5e14]  # its lags read the outlier: it half-follows it
    baseline = np.r_[np.full(35, 62.0), 60.0]
    plain = {"backtest_wape": float(np.abs(actual - model).sum() / actual.sum()),
             "baseline_backtest_wape": float(np.abs(actual - baseline).sum() / actual.sum())}
    assert plain["backtest_wape"] < plain["baseline_backtest_wape"]  # the trap: plainly it "wins"
    metrics = {**plain, "robust_backtest_wape": robust_wape(actual, model),
               "baseline_robust_backtest_wape": robust_wape(actual, baseline)}
    record = SimpleNamespace(status="trained", metrics=metrics)
    assert not beats_baseline(record) and lost_to_baseline(record)
    assert robust_wape(actual[:35], baseline[:35]) == pytest.approx(2 / 60)


def test_a_batch_where_no_partition_answers_gives_typed_empty_predictions(world, tmp_path):
    empty_prod = ModelRegistry(tmp_path / "prod", "prod")
    predictions, statuses = score_frame(requests_of(world, None, "h4"), world["cfg"], empty_prod, world["dev"],
                                        "none")
    assert predictions.empty and predictions.columns.tolist() == prediction_columns(world["cfg"])
    assert str(predictions["model_version"].dtype) == "int64" and str(predictions["prediction"].dtype) == "float64"
    assert {s["status"] for s in statuses} == {"no_model"} and len(statuses) == 6
