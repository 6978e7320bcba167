"""The accuracy benchmark's references are right on data whose answer is known (no CLI, no ../shared)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks import accuracy as bench

COLS = bench.Columns(keys=("store",), time="week", target="sales", covariates=("price", "promo"), freq="int",
                     season_length=52)


def _panel(values: dict[str, np.ndarray], price: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """A long frame of integer-week series, with a price and a 0/1 promo covariate."""
    parts = []
    for store, y in values.items():
        n = len(y)
        parts.append(pd.DataFrame({
            "store": store, "week": np.arange(1, n + 1), "sales": y,
            "price": price[store] if price else np.full(n, 2.0), "promo": np.arange(n) % 5 == 0,
        }))
    return pd.concat(parts, ignore_index=True)


def test_naive_and_mean4_are_exact_on_constant_series():
    frame = bench.prepare_frame(_panel({"A": np.full(30, 7.0), "B": np.full(30, 3.0)}), COLS)
    split = bench.holdout_split(frame, COLS, 12)
    assert len(split.train) == 36 and len(split.future) == 24 and COLS.target not in split.future
    for ref in (bench.naive_reference, bench.mean4_reference):
        pred = ref(split.train, split.future, COLS)
        assert bench.wape(split.actual["sales"].to_numpy(), pred) == pytest.approx(0.0)


def test_holdout_drops_series_too_short_to_train():
    frame = bench.prepare_frame(_panel({"A": np.ones(30), "B": np.ones(12)}), COLS)
    split = bench.holdout_split(frame, COLS, 12)
    assert split.dropped_series == 1 and set(split.actual["store"]) == {"A"}


def test_loglog_recovers_a_known_price_elasticity():
    rng = np.random.default_rng(3)
    n = 120
    price = np.exp(rng.normal(1.0, 0.25, n))
    promo = (np.arange(n) % 5 == 0).astype(float)
    y = np.exp(6.0 - 2.0 * np.log(price) + 0.3 * promo + rng.normal(0, 0.02, n))
    frame = bench.prepare_frame(_panel({"A": y}, price={"A": price}), COLS)
    transforms = bench.covariate_transforms(frame, COLS)
    assert transforms == {"price": "log", "promo": "raw"}
    fit = bench.fit_loglog(frame, COLS, transforms)
    assert fit is not None
    assert fit.coef("log(price)") == pytest.approx(-2.0, abs=0.1)
    assert fit.coef("promo") == pytest.approx(0.3, abs=0.05)
    split = bench.holdout_split(frame, COLS, 12)
    pred = bench.loglog_reference(split.train, split.future, COLS)
    assert bench.wape(split.actual["sales"].to_numpy(), pred) < 0.05


def test_global_gbm_predicts_every_held_out_row():
    rng = np.random.default_rng(0)
    values = {f"S{i}": 50 + 10 * i + rng.normal(0, 1, 40) for i in range(3)}
    frame = bench.prepare_frame(_panel(values), COLS)
    split = bench.holdout_split(frame, COLS, 12)
    pred = bench.global_gbm_reference(split.train, split.future, COLS, horizon=12)
    assert np.isfinite(pred).all() and len(pred) == 36
    assert bench.wape(split.actual["sales"].to_numpy(), pred) < 0.2


def test_dataset_option_and_period_index():
    spec = bench.parse_dataset_option("mine=/d/x.csv:keys=a,b;time=t;target=y;covariates=p;freq=W-FRI")
    assert spec.path is not None and str(spec.path) == "/d/x.csv"
    assert spec.cols.keys == ("a", "b") and spec.cols.covariates == ("p",) and spec.cols.season_length == 52
    weeks = pd.Series(pd.to_datetime(["2012-01-06", "2012-01-13", "2012-01-27"]))
    assert np.diff(bench.period_index(weeks, "W-FRI")).tolist() == [1, 2]


def test_delivered_rows_join_sources_and_intervals():
    cols = bench.Columns(keys=("store", "dept"), time="date", target="sales", freq="W-FRI")
    actual = pd.DataFrame({"store": [1, 1], "dept": [2, 2], "date": pd.to_datetime(["2012-01-06", "2012-01-13"]),
                           "sales": [10.0, 20.0]})
    delivered = pd.DataFrame({"store": ["1", "1"], "dept": ["2", "2"], "date": ["2012-01-06", "2012-01-13"],
                              "prediction": [12.0, 20.0], "source": ["production", "global"],
                              "lower": [5.0, 21.0], "upper": [15.0, 30.0]})
    joined = bench.join_delivered(actual, delivered, cols)
    assert bench.wape(joined["sales"].to_numpy(), joined["prediction"].to_numpy()) == pytest.approx(2 / 30)
    shares, has_source = bench.source_shares(joined, list(delivered.columns))
    assert has_source and shares == {"production": 0.5, "global": 0.5}
    assert bench.interval_coverage(joined, list(delivered.columns), "sales") == 0.5
    no_intervals = ["prediction", "is_fallback"]
    assert bench.interval_coverage(joined.assign(is_fallback=[0, 1]), no_intervals, "sales") is None
    shares, has_source = bench.source_shares(joined.assign(is_fallback=[0, 1]), no_intervals)
    assert not has_source and shares == {"is_fallback=0": 0.5, "is_fallback=1": 0.5}


def test_interval_coverage_ignores_rows_without_bounds():
    joined = pd.DataFrame({"sales": [1.0, 2.0, 3.0], "lower": [0.0, None, None], "upper": [2.0, None, None]})
    columns = ["sales", "lower", "upper"]
    assert bench.interval_coverage(joined, columns, "sales") == 1.0
    assert bench.interval_note(joined, columns) == "1/3 held-out rows have both bounds"
    assert bench.interval_coverage(joined.assign(lower=None, upper=None), columns, "sales") is None


def test_a_candidate_alone_is_trained_alone_and_scored_by_itself_through_the_cli_config():
    import tomllib

    from shared.config import ProjectConfig

    assert bench.default_candidates() == list(ProjectConfig().training.candidates)
    own = tomllib.loads(bench.alone_config("loglm"))
    assert own == {"training": {"candidates": ["loglm"], "ensemble": False},
                   "scoring": {"chain": ["latest", "baseline"]}}
    cfg = ProjectConfig.from_dict(tomllib.loads(bench.alone_config("global")))  # valid as a project file
    assert cfg.scoring_chain == ["latest", "baseline"] and cfg.training.candidates == ["global"]
