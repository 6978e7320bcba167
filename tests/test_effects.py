"""Price elasticity and promotion lift, asked of a partition's trained model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.models.effects import covariate_effects
from shared.keys import PARTITION_ID, partition_ids
from shared.data.timegrid import PERIOD, anchor_offset, to_periods
from shared.models.training import train_batch

ELASTICITY, LIFT = -2.0, 0.30  # log-scale promotion effect: sales x exp(0.3) when on promotion


def _panel(n_series: int = 3, periods: int = 130, seed: int = 5) -> pd.DataFrame:
    """Weekly series that follow a log-log price response and a promotion multiplier exactly, plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_series):
        price = 4.0 * np.exp(rng.normal(0, 0.15, periods))
        promo = (rng.random(periods) < 0.25).astype(float)
        level = 200.0 * (s + 1)
        sales = level * (price / 4.0) ** ELASTICITY * np.exp(LIFT * promo) * np.exp(rng.normal(0, 0.02, periods))
        rows.append(pd.DataFrame({"store": f"S{s}", "item": "I", "price": price, "promo": promo, "sales": sales,
                                  "date": pd.date_range("2022-01-02", periods=periods, freq="W")}))
    frame = pd.concat(rows, ignore_index=True)
    frame[PARTITION_ID] = partition_ids(frame, ["store", "item"]).to_numpy()
    frame[PERIOD] = to_periods(frame["date"], "W")
    frame["_filled"] = False
    return frame.sort_values([PARTITION_ID, PERIOD], ignore_index=True)


def _train(candidates: list[str]) -> list:
    cfg = ProjectConfig().with_overrides({
        "data.target": "sales", "data.covariates": ["price", "promo"], "training.candidates": candidates,
        "training.ensemble": False, "training.folds": 1, "training.selection_margin": 0.0})
    frame = _panel()
    return train_batch(frame, cfg, {"dataset_id": "dtest", "anchor": anchor_offset(frame["date"], "W")})


def test_a_log_log_model_reports_the_elasticity_and_lift_the_data_were_made_with():
    results = _train(["loglm"])
    for r in results:
        assert r.status == "trained" and r.model_name == "loglm"
        found = {e["measure"]: e for e in r.effects}
        assert found["elasticity"]["covariate"] == "price"
        assert found["elasticity"]["value"] == pytest.approx(ELASTICITY, abs=0.15)
        assert found["lift"]["covariate"] == "promo"
        assert found["lift"]["value"] == pytest.approx(np.exp(LIFT) - 1, abs=0.05)
        row = r.to_row()
        assert row["effects"] == r.effects and len(row["history"]) == 52  # a season before the test window
        assert max(h[PERIOD] for h in row["history"]) < min(b[PERIOD] for b in row["backtest"])


def test_a_model_that_ignores_the_covariates_reports_no_effect_rather_than_zero():
    results = _train(["naive"])
    assert all(r.status == "trained" and r.effects == [] for r in results)


def test_effects_and_history_can_be_turned_off_for_very_many_partitions():
    cfg = ProjectConfig().with_overrides({
        "data.target": "sales", "data.covariates": ["price", "promo"], "training.candidates": ["loglm"],
        "training.ensemble": False, "training.folds": 1, "training.effects": False,
        "training.history_periods": 0})
    frame = _panel(n_series=1)
    [result] = train_batch(frame, cfg, {"dataset_id": "dtest", "anchor": anchor_offset(frame["date"], "W")})
    assert result.status == "trained" and result.effects == [] and result.history == []


def test_no_covariates_no_effects():
    class Bare:
        covariates = ()
        history_covariates = np.empty((10, 0))

    assert covariate_effects(Bare()) == []
