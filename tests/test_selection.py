"""Interval calibration over a batch: the step profile and the test-window factor."""
from __future__ import annotations

import numpy as np
import pytest

from shared.models.selection import _Residuals, calibrated_intervals, step_profile, widening


def _residuals(rng: np.random.Generator, fold_sd: float, test_sd: float, grow: bool = True) -> _Residuals:
    res = _Residuals()
    steps = np.tile(np.arange(1, 13), 3)
    scale = np.sqrt(steps) if grow else np.ones(len(steps))
    actual = np.exp(rng.normal(0, fold_sd, len(steps)) * scale) * 100
    res.add("model", actual, np.full(len(steps), 100.0), np.zeros(len(steps), bool), steps)
    t_steps = np.arange(1, 13)
    t_scale = np.sqrt(t_steps) if grow else np.ones(12)
    t_actual = np.exp(rng.normal(0, test_sd, 12) * t_scale) * 100
    res.add("model", t_actual, np.full(12, 100.0), np.zeros(12, bool), t_steps, test=True)
    return res


def test_the_step_profile_grows_with_the_step_and_averages_one_over_the_horizon():
    rng = np.random.default_rng(0)
    batch = [_residuals(rng, 0.1, 0.1) for _ in range(40)]
    profile = step_profile(batch, 12)
    assert (np.diff(profile) >= 0).all() and profile[:12].mean() == pytest.approx(1.0)
    assert profile[11] > 1.5 * profile[0]
    assert np.array_equal(step_profile([], 6), np.ones(6))
    assert widening(profile, np.array([24]))[0] == pytest.approx(profile[-1] * np.sqrt(2))


def test_test_windows_that_err_more_than_the_folds_widen_every_interval_and_never_narrow_them():
    rng = np.random.default_rng(1)
    calm = [_residuals(rng, 0.1, 0.1, grow=False) for _ in range(60)]
    wild = [_residuals(rng, 0.1, 0.3, grow=False) for _ in range(60)]
    flat = np.ones(12)
    same = calibrated_intervals(calm, 0.8, flat)
    wider = calibrated_intervals(wild, 0.8, flat)
    width = lambda found: np.median([hi - lo for o in found for lo, hi in [o["model"]]])  # noqa: E731
    assert width(wider) > 2.0 * width(same)
    # coverage of the test residuals themselves is about the level once calibrated
    inside = [np.mean((lo <= r) & (r <= hi)) for res, o in zip(wild, wider) for lo, hi in [o["model"]]
              for r in [res.parts("model", test=True)[0]]]
    assert 0.75 <= float(np.mean(inside)) <= 0.95
    # calmer test windows than folds: the fold offsets stand (the factor is at least 1)
    calmer = [_residuals(rng, 0.3, 0.05, grow=False) for _ in range(60)]
    own = [np.quantile(res.parts("model", test=False)[0], [0.1, 0.9]) for res in calmer]
    got = calibrated_intervals(calmer, 0.8, flat)
    assert np.median([o["model"][1] for o in got]) >= 0.9 * np.median([q[1] for q in own])
