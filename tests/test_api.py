"""The Python API (`import manymodels`): a DataFrame in, forecasts and evaluation tables out, the
same numbers as the `manymodels` command on the same data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import manymodels
from manymodels import ManyModels
from shared.data.synthetic import generate_panel
from shared.results.result_store import SQLiteStore

REPO = Path(__file__).resolve().parents[1]
HORIZON = 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sales() -> pd.DataFrame:
    return next(generate_panel(partitions=6, periods=70, freq="W", seed=11))


@pytest.fixture(scope="module")
def fitted(sales, tmp_path_factory):
    mm = ManyModels(keys=["store", "item"], time="date", target="sales", covariates=["price", "promo"],
                    freq="W", horizon=HORIZON, workdir=tmp_path_factory.mktemp("api") / "mm")
    forecasts = mm.fit(sales).forecast()
    return mm, forecasts


def test_fit_and_forecast_give_the_cli_runs_predictions_for_the_same_data(sales, fitted, tmp_path):
    mm, forecasts = fitted
    data = tmp_path / "sales.parquet"
    sales.to_parquet(data, index=False)
    subprocess.run([sys.executable, "-m", "shared.cli", "run", "--data", str(data), "--workdir", str(tmp_path / "cli"),
                    "--keys", "store,item", "--time", "date", "--target", "sales", "--covariates", "price,promo",
                    "--freq", "W", "--horizon", str(HORIZON), "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    with SQLiteStore(tmp_path / "cli" / "results.sqlite", ["store", "item"], "date", "W") as store:
        cli = store.query("SELECT store, item, date, prediction, lower, upper, source FROM predictions")
    cli["date"] = pd.to_datetime(cli["date"])
    for key in ("store", "item"):
        cli[key] = cli[key].astype(sales[key].dtype)
    joined = forecasts.merge(cli, on=["store", "item", "date"], suffixes=("", "_cli"), validate="one_to_one")
    assert len(joined) == len(forecasts) == len(cli) == 6 * HORIZON
    np.testing.assert_allclose(joined["prediction"], joined["prediction_cli"], rtol=1e-9)
    np.testing.assert_allclose(joined["upper"], joined["upper_cli"], rtol=1e-9)
    assert (joined["source"] == joined["source_cli"]).all()


def test_forecasts_come_back_typed_with_intervals_and_sources(sales, fitted):
    _, forecasts = fitted
    assert {"store", "item", "date", "prediction", "lower", "upper", "source", "model"} <= set(forecasts.columns)
    assert pd.api.types.is_datetime64_any_dtype(forecasts["date"])
    assert forecasts["store"].dtype == sales["store"].dtype
    assert (forecasts["date"] > sales["date"].max()).all()
    assert (forecasts["lower"] <= forecasts["prediction"]).all() and (forecasts["prediction"] <= forecasts["upper"]).all()
    assert set(forecasts["source"]) <= {"production", "unpromoted", "global", "baseline"}


def test_the_evaluation_tables_are_dataframes_per_series(fitted):
    mm, _ = fitted
    metrics, promotions, backtests = mm.metrics(), mm.promotions(), mm.backtests()
    assert len(metrics) == 6 and {"store", "item", "model", "wape", "baseline_wape", "status"} <= set(metrics.columns)
    assert len(promotions) == 6 and set(promotions["decision"]) <= {"promoted", "rejected", "unchanged"}
    assert len(backtests) >= 6 and pd.api.types.is_datetime64_any_dtype(backtests["date"])
    assert mm.summary["trained"] == 6 and mm.summary["run_id"] == mm.run_id
    series, effects = mm.series(), mm.effects()
    assert len(series) == 6 and {"model", "source", "wape", "last_decision"} <= set(series.columns)
    assert set(effects["covariate"]) <= {"price", "promo"} and set(effects["measure"]) <= {"elasticity", "lift"}
    assert (effects.query("measure == 'elasticity'")["value"] < 0).mean() > 0.5  # demand falls as price rises


def test_every_forecast_is_kept_by_vintage_and_a_new_one_comes_back_alone(fitted):
    mm, _ = fitted
    before = mm.history()
    shorter = mm.forecast(h=2)
    after = mm.history()
    assert len(shorter) == 6 * 2 and shorter["score_id"].nunique() == 1
    assert after["score_id"].nunique() == before["score_id"].nunique() + 1
    kept = after[after["score_id"].isin(before["score_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before)


def test_future_rows_with_their_covariates_are_forecast_as_given(sales, fitted):
    mm, _ = fitted
    last = sales.groupby(["store", "item"], as_index=False)["date"].max()
    future = last.assign(date=last["date"] + pd.Timedelta(weeks=2), price=9.99, promo=1)
    out = mm.forecast(future=future)
    assert len(out) == len(future)
    assert (out.set_index(["store", "item"])["date"] == future.set_index(["store", "item"])["date"]).all()
    pl = pytest.importorskip("polars")
    same = mm.forecast(future=pl.from_pandas(future))  # a polars frame is read as the pandas one
    np.testing.assert_allclose(same["prediction"], out["prediction"], rtol=1e-12)


def test_nixtlas_long_format_is_read_without_naming_columns():
    rng = np.random.default_rng(0)
    ds = pd.date_range("2023-01-01", periods=60, freq="D")
    frame = pd.concat([pd.DataFrame({"unique_id": uid, "ds": ds, "y": rng.poisson(20 + 10 * uid, len(ds))})
                       for uid in (1, 2, 3)], ignore_index=True)
    with ManyModels(freq="D", horizon=7) as mm:
        out = mm.fit(frame).forecast()
        workdir = mm.workdir
        assert list(out.columns[:2]) == ["unique_id", "ds"]
        assert out["unique_id"].dtype == frame["unique_id"].dtype and len(out) == 3 * 7
        assert workdir.is_dir()
    assert not workdir.exists()  # a temporary workdir goes with the object


def test_what_is_wrong_with_the_input_is_named(tmp_path):
    mm = ManyModels(keys="store", time="date", target="sales", workdir=tmp_path / "mm")
    with pytest.raises(ValueError, match=r"no column\(s\) \['sales'\]"):
        mm.fit(pd.DataFrame({"store": [1], "date": ["2024-01-07"], "units": [3]}))
    with pytest.raises(TypeError, match="DataFrame"):
        mm.fit([{"store": 1}])
    with pytest.raises(RuntimeError, match="fit"):
        ManyModels(workdir=tmp_path / "empty").forecast()
    with pytest.raises(ValueError, match="name the keys, time, target"):
        ManyModels(workdir=tmp_path / "other").fit(pd.DataFrame({"a": [1]}))


def test_the_package_says_its_version():
    assert isinstance(manymodels.__version__, str) and manymodels.__version__


def test_the_readmes_python_example_runs_as_written(tmp_path):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- python-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prediction" in done.stdout and "baseline_wape" in done.stdout


def test_numeric_columns_are_not_covariates_unless_named(tmp_path):
    """No covariates unless asked (issue 19, item 3): the generated panel's price and promo, and any
    other numeric column, are left out of the models; the run's config says so."""
    import json

    from shared import layout
    from shared.runs.workspace import Workspace

    sales = next(generate_panel(partitions=3, periods=60, freq="W", seed=4))
    sales["footfall"] = np.arange(len(sales), dtype=float)
    mm = ManyModels(keys=["store", "item"], time="date", target="sales", freq="W", horizon=4,
                    workdir=tmp_path / "mm", config={"training.candidates": ["baseline", "loglinear"],
                                                     "forecast.test_periods": 6, "forecast.validation_periods": 6})
    forecasts = mm.fit(sales).forecast()
    assert len(forecasts) == 3 * 4 and mm.summary["trained"] == 3
    ws = Workspace.open(mm.workdir, remember=False)
    run = json.loads(ws.lake.read_bytes(layout.run_meta(mm.run_id)))
    assert run["config"]["data"]["covariates"] == [] and ws.config.data.covariates == []
    records = ws.dev.find()
    assert len(records) == 3
    for record in records:
        bundle = ws.dev.load(record)
        assert bundle.spec.covariates == () and not any(n.startswith("cov_") for n in bundle.spec.names)
    assert forecasts.columns.intersection(["price", "promo", "footfall"]).empty
