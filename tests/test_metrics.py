"""Forecast metrics: the definitions every stage (selection, promotion, report) relies on."""
from __future__ import annotations

import math

import numpy as np
import pytest

from shared.models.metrics import evaluate, evaluate_grouped, selection_key


def test_metrics_match_hand_computed_values():
    m = evaluate([10.0, 20.0, 30.0, 40.0], [12.0, 18.0, 33.0, 40.0])
    assert m["wape"] == pytest.approx((2 + 2 + 3 + 0) / 100)
    assert m["mape"] == pytest.approx((0.2 + 0.1 + 0.1 + 0.0) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((4 + 4 + 9 + 0) / 4))
    assert m["accuracy"] == pytest.approx(1 - 0.07)  # 1 - WAPE, the retail definition
    assert m["mape_accuracy"] == pytest.approx(1 - 0.1)


def test_mape_ignores_zero_actuals_but_wape_and_rmse_count_them():
    m = evaluate([0.0, 10.0], [5.0, 8.0])
    assert m["mape"] == pytest.approx(0.2)  # only the non-zero actual
    assert m["wape"] == pytest.approx(7 / 10)
    assert m["rmse"] == pytest.approx(math.sqrt((25 + 4) / 2))


def test_all_zero_actuals_leave_percentage_metrics_undefined():
    m = evaluate([0.0, 0.0, 0.0], [1.0, 0.0, 2.0])
    assert math.isnan(m["mape"]) and math.isnan(m["accuracy"]) and math.isnan(m["wape"])
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))


def test_accuracy_is_clipped_to_the_unit_interval():
    assert evaluate([1.0, 1.0], [5.0, 5.0])["accuracy"] == 0.0  # MAPE 400 %
    assert evaluate([3.0], [3.0])["accuracy"] == 1.0


def test_nan_rows_are_ignored_and_empty_input_is_all_nan():
    assert evaluate([10.0, np.nan, 20.0], [11.0, 5.0, np.nan])["wape"] == pytest.approx(0.1)
    assert all(math.isnan(v) for v in evaluate([], []).values())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        evaluate([1.0, 2.0], [1.0])


def test_grouped_metrics_equal_one_evaluate_per_group():
    rng = np.random.default_rng(0)
    groups = np.repeat(["b", "a", "c"], [5, 7, 4])
    actual = rng.integers(0, 20, size=16).astype(float)
    actual[12:] = 0.0  # group "c" has only zero actuals
    predicted = actual + rng.normal(0, 3, size=16)
    table = evaluate_grouped(groups, actual, predicted)
    assert list(table.index) == ["a", "b", "c"]
    for g in ("a", "b", "c"):
        expected = evaluate(actual[groups == g], predicted[groups == g])
        for name, value in expected.items():
            assert table.loc[g, name] == pytest.approx(value, nan_ok=True), (g, name)


def test_selection_key_orders_lower_is_better_and_puts_nan_last():
    assert selection_key(0.1, "wape") < selection_key(0.2, "wape") < selection_key(float("nan"), "wape")
    assert selection_key(0.9, "accuracy") < selection_key(0.8, "accuracy")


def test_the_robust_wape_is_the_wape_without_outliers_and_caps_them_with_them():
    from shared.models.metrics import OUTLIER_SCALE, robust_wape, typical_level

    a, p = np.array([10.0, 12.0, 8.0]), np.array([11.0, 12.0, 6.0])
    assert robust_wape(a, p) == pytest.approx(evaluate(a, p)["wape"])
    wild = np.array([10.0, 12.0, 1e15])
    assert typical_level(wild) == 12.0
    # the outlier's actual and its error each count at most OUTLIER_SCALE x the typical level
    assert robust_wape(wild, np.array([10.0, 12.0, 10.0])) == pytest.approx(
        OUTLIER_SCALE * 12 / (22 + OUTLIER_SCALE * 12))
    assert np.isnan(robust_wape(np.zeros(3), np.ones(3)))


def test_the_forecast_ceiling_ignores_one_wild_value_and_follows_growth():
    from shared.models.metrics import CEILING_FACTOR, forecast_ceiling

    history = np.r_[np.full(50, 60.0), 1e15, np.full(10, 62.0)]
    assert forecast_ceiling(history) == pytest.approx(CEILING_FACTOR * 62.0)
    growing = np.linspace(10, 500, 100)  # grew 50-fold: its recent level keeps the growth plausible
    assert forecast_ceiling(growing) == pytest.approx(CEILING_FACTOR * 500.0)
    assert forecast_ceiling(np.array([np.nan])) == np.inf


def test_every_metric_evaluate_computes_has_one_direction_and_selection_follows_it():
    from shared.models.metric_names import ERROR_METRICS, METRICS, lower_is_better

    assert set(evaluate([1.0, 2.0], [1.5, 2.0])) == set(METRICS)
    assert [m for m in METRICS if lower_is_better(m)] == list(ERROR_METRICS) == ["wape", "mape", "rmse"]
    for metric in METRICS:
        smaller_first = selection_key(0.1, metric) < selection_key(0.2, metric)
        assert smaller_first is lower_is_better(metric), metric
    with pytest.raises(KeyError, match="unknown metric 'r2'"):
        selection_key(0.5, "r2")
