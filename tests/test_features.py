"""Vectorised batch features must equal the obvious per-partition pandas computation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.models.features import (FeatureSpec, build_features, pandas_partition_features, rolling_windows,
                             series_features)
from shared.keys import PARTITION_ID, partition_ids
from shared.data.synthetic import generate_panel
from shared.data.timegrid import PERIOD, to_periods


def validated(frame: pd.DataFrame, cfg: ProjectConfig) -> pd.DataFrame:
    """The minimal part of validation that features need: ids, period ordinals, sort order."""
    out = frame.copy()
    out[PARTITION_ID] = partition_ids(out, cfg.data.keys).to_numpy()
    out[PERIOD] = to_periods(out[cfg.data.time], cfg.data.freq)
    out["_filled"] = False
    return out.sort_values([PARTITION_ID, PERIOD], ignore_index=True)


def naive_features(frame: pd.DataFrame, cfg: ProjectConfig) -> pd.DataFrame:
    """One pandas frame per partition, reindexed to its full period grid: the slow, obvious way."""
    parts = [pandas_partition_features(g, cfg) for _, g in frame.groupby(PARTITION_ID, sort=False)]
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def small_cfg() -> ProjectConfig:
    return ProjectConfig().with_overrides({"forecast.horizon": 3, "forecast.season_length": 8,
                                           "data.covariates": ["price", "promo"]})


@pytest.fixture(scope="module")
def panel_with_gaps(small_cfg: ProjectConfig) -> pd.DataFrame:
    raw = next(generate_panel(partitions=6, periods=40, seed=5))
    raw = raw.drop(index=raw.index[[3, 4, 17, 60, 61, 62, 150]])  # holes inside series (gaps kept)
    return validated(raw, small_cfg)


def test_batch_features_equal_a_naive_per_partition_computation(panel_with_gaps, small_cfg):
    ff = build_features(panel_with_gaps, small_cfg)
    expected = naive_features(panel_with_gaps, small_cfg)
    assert list(expected.columns) == list(ff.names)
    np.testing.assert_allclose(ff.X, expected.to_numpy(dtype=float), rtol=1e-9, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(ff.y, panel_with_gaps["sales"].to_numpy())


def test_lags_mean_value_at_period_minus_k_even_across_gaps(small_cfg):
    frame = pd.DataFrame({"store": "S1", "item": "I1", "date": [1, 2, 3, 6, 7],
                          "sales": [10.0, 20.0, 30.0, 60.0, 70.0], "price": 1.5, "promo": 0})
    cfg = small_cfg.with_overrides({"data.freq": "int"})
    ff = build_features(validated(frame, cfg), cfg)
    lag3 = ff.X[:, ff.names.index("lag_3")]
    np.testing.assert_array_equal(lag3, [np.nan, np.nan, np.nan, 30.0, np.nan])  # period 7-3=4 is missing


def test_no_feature_reads_another_partition(panel_with_gaps, small_cfg):
    ff = build_features(panel_with_gaps, small_cfg)
    first_rows = ff.bounds[:-1]
    level_cols = np.concatenate((ff.spec.columns("lag_"), ff.spec.columns("roll_")))
    assert np.isnan(ff.X[np.ix_(first_rows, level_cols)]).all()
    assert (ff.X[first_rows, ff.names.index("trend")] == 0).all()


def test_covariates_are_logged_only_when_positive_and_not_flags(small_cfg):
    frame = pd.DataFrame({"store": ["A"] * 4 + ["B"] * 4, "item": "x", "date": [1, 2, 3, 4] * 2,
                          "sales": 1.0, "price": [2.0, 4.0, 2.0, 4.0, 0.0, 1.0, 2.0, 3.0],
                          "promo": [0, 1, 1, 0] * 2})
    cfg = small_cfg.with_overrides({"data.freq": "int"})
    ff = build_features(validated(frame, cfg), cfg)
    price = ff.X[:, ff.names.index("cov_price")]
    promo = ff.X[:, ff.names.index("cov_promo")]
    np.testing.assert_allclose(price[:4], np.log([2.0, 4.0, 2.0, 4.0]))  # positive: log-log form
    np.testing.assert_array_equal(price[4:], [0.0, 1.0, 2.0, 3.0])  # has a zero: kept as is
    np.testing.assert_array_equal(promo, [0, 1, 1, 0] * 2)  # a 0/1 flag is never logged
    assert ff.log_covariates.tolist() == [[True, False], [False, False]]


def test_single_series_features_equal_the_batch_rows(panel_with_gaps, small_cfg):
    ff = build_features(panel_with_gaps, small_cfg)
    g = 2
    rows = ff.rows(g)
    X = series_features(ff.spec, ff.periods[rows], ff.y[rows],
                        panel_with_gaps[["price", "promo"]].to_numpy()[rows],
                        int(ff.trend_origin[g]), ff.log_covariates[g])
    np.testing.assert_allclose(X, ff.X[rows], rtol=1e-12, equal_nan=True)  # cumulative sums: rounding only


def test_spec_keeps_only_lags_usable_at_the_horizon():
    weekly = FeatureSpec.from_config(ProjectConfig())
    assert weekly.lags == (12, 13, 14, 15, 51, 52, 53)
    assert weekly.windows == (4, 8, 13, 26, 52)
    assert weekly.lookback == 12 + 52 - 1
    daily = ProjectConfig().with_overrides({"data.freq": "D", "forecast.horizon": 10})
    long_horizon = FeatureSpec.from_config(daily)
    assert min(long_horizon.lags) == 10 and 7 not in long_horizon.lags  # lag 7 is unknown 10 days ahead
    assert rolling_windows(12) == (6, 12, 24) and rolling_windows(1) == (2, 4, 8)
    annual = FeatureSpec.from_config(ProjectConfig().with_overrides({"data.freq": "Y"}))
    assert not any(n.startswith(("sin_", "cos_")) for n in annual.names)


def test_unsorted_or_duplicated_periods_are_rejected(panel_with_gaps, small_cfg):
    shuffled = panel_with_gaps.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="strictly increasing|sorted"):
        build_features(shuffled, small_cfg)
    dup = pd.concat([panel_with_gaps.iloc[:5], panel_with_gaps.iloc[4:5]], ignore_index=True)
    with pytest.raises(ValueError, match="strictly increasing"):
        build_features(dup, small_cfg)


def test_empty_batch_gives_empty_features(panel_with_gaps, small_cfg):
    ff = build_features(panel_with_gaps.iloc[:0], small_cfg)
    assert ff.X.shape == (0, len(ff.names)) and ff.n_partitions == 0
    assert ff.to_frame().empty


def test_daily_data_gets_the_year_its_weekly_season_leaves_out():
    daily = FeatureSpec.from_config(ProjectConfig().with_overrides({"data.freq": "D", "forecast.horizon": 14}))
    assert 364 in daily.lags  # a year back in whole weeks: the same weekday
    assert {"ysin_1", "ycos_1", "ysin_2", "ycos_2"} <= set(daily.names)
    weekly = FeatureSpec.from_config(ProjectConfig())
    assert not any(n.startswith(("ysin_", "ycos_")) for n in weekly.names)  # s=52 is the year already


def test_daily_batch_features_equal_the_naive_computation_yearly_terms_included():
    cfg = ProjectConfig().with_overrides({"data.freq": "D", "forecast.horizon": 7})
    raw = next(generate_panel(partitions=3, periods=420, freq="D", seed=2))
    raw = raw.drop(index=raw.index[[5, 6, 300]])
    frame = validated(raw, cfg)
    ff = build_features(frame, cfg)
    expected = naive_features(frame, cfg)
    assert list(expected.columns) == list(ff.names)
    np.testing.assert_allclose(ff.X, expected.to_numpy(dtype=float), rtol=1e-9, atol=1e-9, equal_nan=True)
    year_back = ff.to_frame()["lag_364"].to_numpy()
    first_year = ff.X[:, ff.names.index("trend")] < 364
    assert np.isnan(year_back[first_year]).all() and not np.isnan(year_back[~first_year]).all()


def test_hourly_data_gets_the_week_as_its_longer_cycle():
    """Issue 17: on M4 hourly the day alone (season 24) left the weekly cycle out (0.032 -> 0.025)."""
    cfg = ProjectConfig().with_overrides({"data.freq": "h", "forecast.horizon": 48})
    spec = FeatureSpec.from_config(cfg)
    assert spec.season_length == 24 and spec.year_length == 168.0 and spec.yearly_terms > 0
    assert 168 in spec.lags and {"ysin_1", "ycos_1"} <= set(spec.names)
    weekly = FeatureSpec.from_config(ProjectConfig().with_overrides({"data.freq": "W"}))
    assert weekly.year_length == 0.0 and not weekly.yearly_terms
