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


def test_the_field_references_are_exact_where_the_answer_is_known():
    """statsforecast's naive / mean of 4 / seasonal naive on constant and purely seasonal series,
    and every reference predicting every held-out row, in the held-out rows' order."""
    season = np.tile([5.0, 9.0, 2.0, 7.0], 10)
    frame = bench.prepare_frame(_panel({"A": np.full(40, 7.0), "B": season}), COLS)
    cols = bench.Columns(COLS.keys, COLS.time, COLS.target, COLS.covariates, "int", 4)
    split = bench.holdout_split(frame, cols, 8)
    shuffled = split.future.sample(frac=1.0, random_state=1)
    refs = bench.run_references(bench.Split(split.train, split.future, split.actual), cols, 8, 0)
    assert {"naive", "mean of last 4", "seasonal naive", "AutoETS", "mlforecast LightGBM"} <= set(refs)
    assert any(name.startswith("AutoARIMA") for name in refs)
    assert refs["seasonal naive"]["wape"] == pytest.approx(0.0)
    from benchmarks.field_references import field_references
    found = field_references(split.train, shuffled, cols.keys, cols.time, cols.target, cols.covariates,
                             cols.freq, cols.season_length)
    actual = split.actual.set_index(["store", "week"]).loc[list(zip(shuffled["store"], shuffled["week"])), "sales"]
    assert bench.wape(actual.to_numpy(), found["seasonal naive"][0]) == pytest.approx(0.0)
    constant = (shuffled["store"] == "A").to_numpy()
    for name in ("naive", "mean of last 4"):
        assert np.allclose(found[name][0][constant], 7.0)
    for name, (pred, _) in found.items():
        assert len(pred) == len(shuffled) and np.isfinite(pred).all(), name


def test_intermittent_references_run_on_mostly_zero_series():
    rng = np.random.default_rng(0)
    y = np.where(rng.uniform(size=48) < 0.3, rng.integers(1, 5, 48), 0).astype(float)
    frame = bench.prepare_frame(_panel({"A": y, "B": np.roll(y, 3)}), COLS)
    split = bench.holdout_split(frame, COLS, 6)
    assert bench.is_intermittent(split.train, COLS)
    refs = bench.run_references(split, COLS, 6, 0)
    assert {"CrostonOptimized", "TSB"} <= set(refs)


def test_holdout_drops_series_too_short_to_train():
    frame = bench.prepare_frame(_panel({"A": np.ones(30), "B": np.ones(12)}), COLS)
    split = bench.holdout_split(frame, COLS, 12)
    assert split.dropped_series == 1 and set(split.actual["store"]) == {"A"}


def test_dataset_option_and_the_summary_verdicts():
    spec = bench.parse_dataset_option("mine=/d/x.csv:keys=a,b;time=t;target=y;covariates=p;freq=W-FRI")
    assert spec.path is not None and str(spec.path) == "/d/x.csv"
    assert spec.cols.keys == ("a", "b") and spec.cols.covariates == ("p",) and spec.cols.season_length == 52
    assert bench.geometric_mean([0.5, 2.0]) == pytest.approx(1.0)
    assert bench.covered(0.80) and not bench.covered(0.70) and not bench.covered(None)


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
