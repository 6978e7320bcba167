"""Forecasts that can be trusted, end to end through the CLI and the serving predictor (issue 18,
items 1-3 of "what to build"): one wild value in one series cannot make the served forecast wild,
and a newer extract never gets forecasts dated before its newest data."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.cli import main
from shared.serving import ServingOptions
from shared.serving.predictor import open_predictor
from shared.data.synthetic import write_panel
from shared.runs.workspace import Workspace

pytestmark = pytest.mark.timeout(600)

FLAGS = ["--keys", "store,item", "--time", "date", "--target", "sales", "--covariates", "price,promo",
         "--freq", "W", "--horizon", "12", "--test-periods", "12", "--workers", "1", "--no-progress"]


def _panel(tmp: Path, partitions: int = 24, periods: int = 130) -> pd.DataFrame:
    path = tmp / "panel.parquet"
    write_panel(path, partitions=partitions, periods=periods, freq="W", seed=11)
    return pd.read_parquet(path)


def _latest_predictions(work: Path) -> pd.DataFrame:
    with sqlite3.connect(work / "results.sqlite") as conn:
        return pd.read_sql_query("SELECT * FROM predictions WHERE scored_at = (SELECT MAX(scored_at) "
                                 "FROM predictions)", conn)


def _served(work: Path, keys: dict[str, str], horizon: int) -> list[dict]:
    predictor = open_predictor(Workspace.open(work), ServingOptions(check_interval_ms=0))
    try:
        answer = predictor.handle({"keys": keys, "horizon": horizon})
    finally:
        predictor.close()
    assert answer.status == 200, answer.body
    return answer.body["predictions"]


def test_one_wild_value_in_one_series_leaves_its_forecasts_at_the_level_of_its_data(tmp_path):
    raw = _panel(tmp_path)
    series = raw.groupby(["store", "item"])["sales"].transform("median")
    regular = raw[(series > 20) & (raw.groupby(["store", "item"])["sales"].transform("size") == 130)]
    store, item = regular.iloc[0][["store", "item"]]
    mine = (raw["store"] == store) & (raw["item"] == item)
    level = float(raw.loc[mine, "sales"].median())
    # one week inside the validation folds, read by the test window's lags, recorded as 1e15 (a unit
    # or decimal error upstream)
    wild = raw.index[mine][-20]
    raw.loc[wild, "sales"] = 1e15
    data = tmp_path / "wild.csv"
    raw.to_csv(data, index=False)
    work = tmp_path / "w"
    assert main(["run", "--data", str(data), "--workdir", str(work), *FLAGS]) in (0, 3)
    predictions = _latest_predictions(work)
    theirs = predictions[(predictions["store"] == store) & (predictions["item"] == item)]
    assert len(theirs) == 12
    assert theirs["prediction"].max() < 10 * level, theirs[["prediction", "source", "model"]]
    assert theirs["upper"].max() < 100 * level
    served = _served(work, {"store": store, "item": item}, 12)
    assert max(p["prediction"] for p in served) < 10 * level
    # the other series are untouched by it: every forecast stays within its own history's scale
    history = raw[raw.index != wild].groupby(["store", "item"])["sales"].max()
    joined = predictions.join(history.rename("history_max"), on=["store", "item"])
    assert (joined["prediction"] <= np.e * joined["history_max"] + 1e-9).all()


def test_a_newer_extract_is_forecast_from_its_own_end_whatever_model_answers(tmp_path):
    raw = _panel(tmp_path, partitions=20, periods=140)
    first_end = raw["date"].max() - pd.Timedelta(weeks=14)
    older, newer = tmp_path / "older.parquet", tmp_path / "newer.parquet"
    raw[raw["date"] <= first_end].to_parquet(older, index=False)
    raw.to_parquet(newer, index=False)
    work = tmp_path / "w"
    assert main(["run", "--data", str(older), "--workdir", str(work), *FLAGS]) in (0, 3)
    assert main(["run", "--data", str(newer), "--workdir", str(work), *FLAGS]) in (0, 3)
    predictions = _latest_predictions(work)
    ends = raw.groupby(["store", "item"])["date"].max().rename("data_end")
    joined = predictions.assign(date=pd.to_datetime(predictions["date"])).join(ends, on=["store", "item"])
    assert len(joined) == 12 * len(ends)
    first = joined.groupby(["store", "item"])["date"].min()
    assert (first == ends + pd.Timedelta(weeks=1)).all(), joined.loc[joined["date"] <= joined["data_end"]]
    # a partition whose production model is older than the newest data is served from its end too
    store, item = ends.index[0]
    served = _served(work, {"store": store, "item": item}, 3)
    assert pd.Timestamp(served[0]["date"]) == ends.iloc[0] + pd.Timedelta(weeks=1), served
