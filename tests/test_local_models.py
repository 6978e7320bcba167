"""The per-series statistical candidates: right where the answer is known, bounded, cheap to serve."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from shared.models.features import FeatureSpec
from shared.models.local_models import PATH_STEPS, SeasonalNaive, StatsForecaster

SPEC = FeatureSpec(horizon=7, season_length=7, lags=(7, 8), windows=(4,), fourier_terms=3, covariates=())


def _rows(positions: np.ndarray) -> np.ndarray:
    """Feature rows whose only column these models read is the trend (the period position)."""
    X = np.full((len(positions), len(SPEC.names)), np.nan)
    X[:, SPEC.columns("trend")[0]] = positions
    return X


def test_seasonal_naive_repeats_the_last_season_by_position_even_across_a_gap():
    t = np.arange(70.0)
    y = 10 + (t % 7)
    keep = t != 66  # one missing period inside the last season: the season before stands in
    model = SeasonalNaive(SPEC).fit(_rows(t[keep]), y[keep])
    future = np.arange(70, 84)
    assert np.allclose(model.predict(_rows(future)), 10 + (future % 7))
    # rows asked out of order and far ahead read the same path by distance
    assert model.predict(_rows(np.array([83, 70])))[0] == pytest.approx(10 + 83 % 7)


@pytest.mark.parametrize("kind", ["theta", "ets", "croston", "tsb"])
def test_statistical_models_forecast_a_level_series_at_its_level_and_never_below_zero(kind):
    rng = np.random.default_rng(1)
    t = np.arange(200.0)
    y = np.maximum(50 + rng.normal(0, 1, 200), 0)
    model = StatsForecaster(SPEC, kind).fit(_rows(t), y)
    pred = model.predict(_rows(np.arange(200, 214)))
    assert pred.shape == (14,) and (pred >= 0).all()
    assert np.allclose(pred, 50, atol=3), pred
    assert len(model.path_) == PATH_STEPS


def test_a_bundle_path_is_small_and_needs_no_statsforecast_to_predict():
    t = np.arange(300.0)
    y = 100 + 10 * np.sin(2 * np.pi * t / 7)
    model = StatsForecaster(SPEC, "theta").fit(_rows(t), y)
    blob = pickle.dumps(model)
    assert b"statsforecast" not in blob and len(blob) < 20_000
    assert np.allclose(pickle.loads(blob).predict(_rows(np.arange(300, 307))), y[-7:], rtol=0.05)


def test_a_constant_or_tiny_series_falls_back_to_its_level_instead_of_failing():
    for y in (np.full(40, 3.0), np.array([2.0, 5.0])):
        model = StatsForecaster(SPEC, "theta").fit(_rows(np.arange(len(y), dtype=float)), y)
        assert np.all(np.isfinite(model.predict(_rows(np.arange(len(y), len(y) + 3)))))
    with pytest.raises(ValueError, match="no rows with an observed target"):
        StatsForecaster(SPEC, "theta").fit(_rows(np.arange(3.0)), np.full(3, np.nan))
    with pytest.raises(ValueError, match="unknown statistical model kind"):
        StatsForecaster(SPEC, "prophet").fit(_rows(np.arange(50.0)), np.arange(50.0))
