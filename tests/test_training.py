"""Training a mini-batch: selection, statuses, failures, determinism, and the bundle's forecasts."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, RegressorMixin

from shared.models.candidates import (
    BoostedTreesForecaster,
    CandidateError,
    LogLinearForecaster,
    MovingAverageBaseline,
)
from shared.config import ProjectConfig
from shared.models.features import build_features
from shared.keys import PARTITION_ID, partition_ids
from shared.models.metrics import evaluate
from shared.data.synthetic import generate_panel
from shared.data.timegrid import PERIOD, anchor_offset, from_periods, to_periods
from shared.models.bundle import period_times
from shared.models.training import (
    ForecastBundle,
    choose,
    pooled_prior,
    backtest_summary,
    recursive_forecast,
    time_breakdown,
    train_batch,
)

MARKER = 777.0


class FragileRegressor(RegressorMixin, BaseEstimator):
    """A plug-in regressor that cannot fit a series containing the marker value (one bad partition)."""

    def fit(self, X, y):
        if np.any(y == MARKER):
            raise RuntimeError("fragile regressor cannot fit this series")
        self.mean_ = float(np.mean(y))
        return self

    def predict(self, X):
        return np.full(len(X), self.mean_)


def validated(frame: pd.DataFrame, cfg: ProjectConfig) -> pd.DataFrame:
    """The minimal part of validation that training needs: ids, period ordinals, sort order."""
    out = frame.copy()
    out[PARTITION_ID] = partition_ids(out, cfg.data.keys).to_numpy()
    out[PERIOD] = to_periods(out[cfg.data.time], cfg.data.freq)
    out["_filled"] = False
    return out.sort_values([PARTITION_ID, PERIOD], ignore_index=True)


def relabel(frame: pd.DataFrame, store: str) -> pd.DataFrame:
    return frame.assign(store=store)


@pytest.fixture(scope="module")
def cfg() -> ProjectConfig:
    # the single-window selection among the original three candidates, each partition on its own
    # (no batch favourite); the newer candidates, folds, ensemble, global model and the batch
    # favourite have their own tests (here at the end and tests/test_global_model.py)
    return ProjectConfig().with_overrides({"training.candidates": ["baseline", "loglinear", "gbm"],
                                           "training.folds": 1, "training.ensemble": False,
                                           "training.selection_margin": 0.0, "data.covariates": ["price", "promo"]})


@pytest.fixture(scope="module")
def panel(cfg) -> pd.DataFrame:
    raw = next(generate_panel(partitions=40, periods=156, seed=11))
    first = raw[(raw["store"] == raw["store"].iloc[0]) & (raw["item"] == raw["item"].iloc[0])]
    tiny = relabel(first.tail(3), "TINY")  # 3 observed periods < min_periods=4
    short = relabel(first.tail(40), "SHORT")  # 16 observed before validation < min_train_periods=26
    return validated(pd.concat([raw, tiny, short], ignore_index=True), cfg)


@pytest.fixture(scope="module")
def trained(panel, cfg):
    meta = {"dataset_id": "dtest", "anchor": anchor_offset(panel["date"], "W")}
    return {r.keys["store"] + "/" + r.keys["item"]: r for r in train_batch(panel, cfg, meta)}


def loglinear_bundle(trained) -> ForecastBundle:
    return next(r.bundle for r in trained.values() if r.model_name == "loglinear")


def test_every_partition_gets_a_result_with_an_explicit_status(trained, panel):
    assert len(trained) == panel[PARTITION_ID].nunique()
    assert {r.status for r in trained.values()} <= {"trained", "baseline_only", "skipped"}
    tiny = next(r for k, r in trained.items() if k.startswith("TINY/"))
    assert tiny.status == "skipped" and "min_periods=4" in tiny.reason and tiny.bundle is None
    short = next(r for k, r in trained.items() if k.startswith("SHORT/"))
    assert short.status == "baseline_only" and "min_train_periods=26" in short.reason
    assert short.model_name == "baseline" and short.bundle is not None and short.metrics["wape"] >= 0
    assert sum(r.status == "trained" for r in trained.values()) >= 35


def test_chosen_models_beat_the_baseline_clearly_on_the_test_window(trained):
    summary = backtest_summary(trained.values())
    model, baseline = summary["model"]["wape"], summary["baseline"]["wape"]
    print(f"pooled test WAPE: chosen models {model:.3f}, moving-average baseline {baseline:.3f}")
    assert model < 0.7 * baseline
    assert {r.model_name for r in trained.values() if r.status == "trained"} & {"loglinear", "gbm"}


def test_the_winner_has_the_best_validation_score(trained):
    for r in trained.values():
        if r.status == "trained":
            assert set(r.candidate_scores) == {"baseline", "loglinear", "gbm"}
            finite = {k: v for k, v in r.candidate_scores.items() if not math.isnan(v)}
            assert r.candidate_scores[r.model_name] == min(finite.values())
            assert set(r.baseline_metrics) == {"wape", "robust_wape", "mape", "rmse", "accuracy", "mape_accuracy"}
            assert set(r.metrics) == set(r.baseline_metrics) | {"backtest_wape", "baseline_backtest_wape",
                                                                    "robust_backtest_wape",
                                                                    "baseline_robust_backtest_wape"}


def test_with_a_margin_the_winner_is_its_best_unless_that_barely_beats_the_batch_favourite(panel, cfg):
    margin = 0.10
    results = train_batch(panel, cfg.with_overrides({"training.selection_margin": margin}))
    favourites = set()
    for r in results:
        if r.status == "trained":
            finite = {k: v for k, v in r.candidate_scores.items() if not math.isnan(v)}
            best = min(finite.values())
            chosen = r.candidate_scores[r.model_name]
            assert chosen == best or best >= chosen * (1 - margin) - 1e-12, (r.partition_id, finite)
            if chosen != best:
                favourites.add(r.model_name)
    assert len(favourites) <= 1  # whoever was overruled went to the one batch favourite


def test_result_rows_are_json_and_carry_timings(trained):
    for r in trained.values():
        row = json.loads(json.dumps(r.to_row(), allow_nan=False))
        assert row["status"] == r.status and "bundle" not in row
        assert r.fit_seconds > 0 and set(r.timings) == {"features", "estimators", "overhead"}
    tb = time_breakdown(trained.values())
    assert tb["partitions"] == len(trained)
    parts = tb["features_seconds"] + tb["estimators_seconds"] + tb["overhead_seconds"]
    assert parts == pytest.approx(tb["total_seconds"])
    assert tb["estimators_seconds"] > tb["features_seconds"]


def test_a_partition_that_raises_is_recorded_as_failed_while_the_others_train(cfg):
    frame = validated(next(generate_panel(partitions=5, periods=100, seed=2)), cfg)
    victim = frame[PARTITION_ID].unique()[1]
    frame.loc[frame.index[frame[PARTITION_ID] == victim][10], "sales"] = MARKER
    fragile = cfg.with_overrides({
        "training.extra_candidates": [{"name": "fragile", "estimator": f"{__name__}.FragileRegressor"}],
        "training.estimator_packages": ["sklearn", __name__],  # this test module's regressor is allowed
        "training.candidates": ["baseline", "loglinear", "fragile"],
    })
    results = {r.partition_id: r for r in train_batch(frame, fragile, {})}
    failed = results.pop(victim)
    assert failed.status == "failed" and failed.bundle is None and failed.model_name is None
    assert failed.reason == "RuntimeError: fragile regressor cannot fit this series"
    assert json.loads(json.dumps(failed.to_row()))["reason"].startswith("RuntimeError")
    assert all(r.status == "trained" and "fragile" in r.candidate_scores for r in results.values())


def test_a_misconfigured_candidate_fails_the_whole_batch_up_front(cfg):
    frame = validated(next(generate_panel(partitions=2, periods=60, seed=2)), cfg)
    bad = cfg.with_overrides({"training.extra_candidates": [{"name": "nope",
                                                             "estimator": "sklearn.nope.Model"}]})
    with pytest.raises(CandidateError, match="sklearn.nope.Model"):
        train_batch(frame, bad, {})


def test_same_seed_gives_identical_models_and_forecasts(cfg):
    frame = validated(next(generate_panel(partitions=4, periods=120, seed=8)), cfg)
    only_gbm = cfg.with_overrides({"training.candidates": ["gbm"], "training.seed": 5})
    first, second = train_batch(frame, only_gbm, {}), train_batch(frame, only_gbm, {})
    for a, b in zip(first, second, strict=True):
        assert a.to_row()["metrics"] == b.to_row()["metrics"]
        pd.testing.assert_frame_equal(a.bundle.predict(), b.bundle.predict())


def test_filled_rows_are_data_but_not_scored_or_averaged(cfg):
    frame = validated(next(generate_panel(partitions=1, periods=120, seed=4)), cfg)
    observed = frame["sales"].to_numpy().copy()
    gap = frame.index[[-9, -5, -2, -1]]
    frame.loc[gap, "sales"] = 0.0
    frame.loc[gap, "_filled"] = True
    (r,) = train_batch(frame, cfg, {})
    assert r.n_observed == len(frame) - 4
    bt = r.bundle.backtest
    keep = ~frame["_filled"].to_numpy()[-len(bt):]
    expected = evaluate(bt["actual"][keep], bt["prediction"][keep])
    assert {k: r.metrics[k] for k in expected} == expected
    assert r.bundle.baseline.level_ == pytest.approx(observed[[-7, -6, -4, -3]].mean())


def test_models_never_learn_from_filled_targets(cfg):
    frame = validated(next(generate_panel(partitions=1, periods=120, seed=4)), cfg)
    gap = frame.index[[20, 21, 60, 100, -3]]
    frame.loc[gap, "sales"] = MARKER  # the fragile regressor raises if it ever sees this target
    frame.loc[gap, "_filled"] = True
    fragile = cfg.with_overrides({
        "training.extra_candidates": [{"name": "fragile", "estimator": f"{__name__}.FragileRegressor"}],
        "training.estimator_packages": ["sklearn", __name__],  # this test module's regressor is allowed
        "training.candidates": ["fragile"],
    })
    (r,) = train_batch(frame, fragile, {})
    assert r.status == "trained" and r.model_name == "fragile"


def test_windows_longer_than_the_horizon_are_forecast_recursively(cfg):
    long = cfg.with_overrides({"forecast.horizon": 4, "forecast.test_periods": 10,
                               "forecast.validation_periods": 6})
    frame = validated(next(generate_panel(partitions=3, periods=110, seed=6)), long)
    results = train_batch(frame, long, {})
    assert [r.status for r in results] == ["trained"] * 3
    for r in results:
        periods = frame.loc[frame[PARTITION_ID] == r.partition_id, PERIOD]
        assert r.bundle.backtest[PERIOD].tolist() == periods[periods > periods.max() - 10].tolist()
    summary = backtest_summary(results)
    assert summary["model"]["wape"] < summary["baseline"]["wape"]


def test_recursive_forecast_reproduces_the_batch_features_within_the_horizon(panel, cfg):
    ff = build_features(panel, cfg)
    g = 0
    rows = ff.rows(g)
    X, y, periods = ff.X[rows], ff.y[rows], ff.periods[rows]
    cov = panel[["price", "promo"]].to_numpy()[rows]
    cut = len(y) - 12
    model = LogLinearForecaster(ff.spec).fit(X[:cut], y[:cut])
    direct = model.predict(X[cut:])
    recursive = recursive_forecast(model, ff.spec, int(ff.trend_origin[g]), ff.log_covariates[g],
                                   periods[:cut], y[:cut], cov[:cut], int(periods[cut - 1]),
                                   periods[cut:], cov[cut:])
    np.testing.assert_allclose(recursive, direct, rtol=1e-9)


def test_bundle_forecasts_the_next_horizon_with_covariates_carried_forward(trained, panel):
    bundle = loglinear_bundle(trained)
    out = bundle.predict()
    assert list(out.columns) == [PERIOD, "date", "prediction", "lower", "upper"]
    assert (out["lower"] <= out["prediction"]).all() and (out["prediction"] <= out["upper"]).all()
    assert out[PERIOD].tolist() == list(range(bundle.last_period + 1, bundle.last_period + 13))
    last_date = panel.loc[panel[PARTITION_ID] == bundle.partition_id, "date"].max()
    expected_dates = pd.date_range(last_date + pd.Timedelta(days=7), periods=12, freq="7D")
    assert (pd.DatetimeIndex(out["date"]) == expected_dates).all()
    assert np.isfinite(out["prediction"]).all() and (out["prediction"] >= 0).all()
    longer = bundle.predict(horizon=30)
    assert len(longer) == 30 and (longer["prediction"] >= 0).all()
    # the first block reads history only, so looking further ahead does not change it
    np.testing.assert_allclose(longer["prediction"][:12], out["prediction"])


def test_bundle_forecasts_given_future_rows_and_responds_to_price(trained):
    bundle = loglinear_bundle(trained)
    carried = bundle.predict()
    price, promo = bundle.history_covariates[-1]
    future = pd.DataFrame({"date": carried["date"], "price": price, "promo": promo})
    np.testing.assert_allclose(bundle.predict(future)["prediction"], carried["prediction"])
    dearer = bundle.predict(future.assign(price=price * 1.5))["prediction"]
    assert (dearer < carried["prediction"]).all()  # the log-log model learned a negative elasticity
    by_period = bundle.predict(pd.DataFrame({PERIOD: [bundle.last_period + 20, bundle.last_period + 2],
                                             "price": price, "promo": 0}))
    assert by_period[PERIOD].tolist() == [bundle.last_period + 2, bundle.last_period + 20]


def test_bundle_rejects_bad_future_rows(trained):
    bundle = loglinear_bundle(trained)
    with pytest.raises(ValueError, match="after the last trained period"):
        bundle.predict(pd.DataFrame({PERIOD: [bundle.last_period], "price": 1.0, "promo": 0}))
    with pytest.raises(ValueError, match=r"lack covariate column\(s\) \['promo'\]"):
        bundle.predict(pd.DataFrame({PERIOD: [bundle.last_period + 1], "price": 1.0}))
    with pytest.raises(ValueError, match="repeat"):
        bundle.predict(pd.DataFrame({PERIOD: [bundle.last_period + 1] * 2, "price": 1.0, "promo": 0}))
    with pytest.raises(ValueError, match="time column 'date'"):
        bundle.predict(pd.DataFrame({"price": [1.0], "promo": [0]}))


def test_bundle_baseline_fallback_is_flat(trained):
    bundle = loglinear_bundle(trained)
    out = bundle.predict(horizon=5, use_baseline=True)
    assert out["prediction"].tolist() == [pytest.approx(bundle.baseline.level_)] * 5


def test_bundles_are_small_and_survive_pickling(trained, tmp_path):
    for r in trained.values():
        if r.bundle is None:
            continue
        path = tmp_path / f"{r.partition_id}.pkl"
        path.write_bytes(pickle.dumps(r.bundle, protocol=pickle.HIGHEST_PROTOCOL))
        assert path.stat().st_size < 100_000, (r.model_name, path.stat().st_size)
        assert not any(isinstance(v, pd.DataFrame) for v in vars(r.bundle).values())
    bundle = loglinear_bundle(trained)
    (tmp_path / "b.pkl").write_bytes(pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL))
    again = pickle.loads((tmp_path / "b.pkl").read_bytes())
    pd.testing.assert_frame_equal(again.predict(), bundle.predict())
    assert list(again.backtest.columns) == [PERIOD, "date", "actual", "prediction", "baseline"]
    assert len(again.backtest) == 12


def test_integer_periods_work_end_to_end():
    cfg = ProjectConfig().with_overrides({"data.freq": "int", "forecast.season_length": 52})
    frame = validated(next(generate_panel(partitions=2, periods=100, freq="int", seed=1)), cfg)
    results = train_batch(frame, cfg, {})
    assert [r.status for r in results] == ["trained", "trained"]
    out = results[0].bundle.predict(horizon=3)
    assert out["date"].tolist() == [101, 102, 103]


class LibraryPredict:
    """A fitted candidate predicting through scikit-learn's own ``predict`` (every input check on):
    the arithmetic the candidates' shortcut calls must reproduce bit for bit."""

    def __init__(self, estimator):
        self.estimator = estimator

    def predict(self, X):
        est = self.estimator
        if isinstance(est, LogLinearForecaster):
            Z = est._design(X)
            Z = np.where(np.isnan(Z), est.fill_, Z)
            raw = np.minimum(est.ridge_.predict((Z - est.mean_) / est.scale_), est.cap_)
            return np.maximum(np.expm1(raw), 0.0)
        if isinstance(est, BoostedTreesForecaster):
            return np.maximum(np.expm1(est.model_.predict(X[:, est.columns_])), 0.0)
        return est.predict(X)


def reference_predict(bundle: ForecastBundle, periods: np.ndarray, cov: np.ndarray,
                      use_baseline: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What ``ForecastBundle.predict`` computed before its fast path: sort, library predict, clip to
    [0, the bundle's ceiling]."""
    order = np.argsort(periods, kind="stable")
    periods, cov = periods[order], cov[order]
    if use_baseline or isinstance(bundle.estimator, MovingAverageBaseline):
        model = bundle.baseline if use_baseline else bundle.estimator
        return periods, np.clip(model.predict(len(periods)), 0.0, bundle.ceiling)
    pred = recursive_forecast(LibraryPredict(bundle.estimator), bundle.spec, bundle.trend_origin,
                              bundle.log_covariates, bundle.history_periods, bundle.history_target,
                              bundle.history_covariates, bundle.last_period, periods, cov,
                              ceiling=bundle.ceiling)
    return periods, np.clip(pred, 0.0, bundle.ceiling)


def test_predict_arrays_gives_exactly_predict_and_the_library_numbers_for_every_bundle(trained):
    bundles = [r.bundle for r in trained.values() if r.bundle is not None]
    assert {b.model_name for b in bundles} >= {"loglinear", "gbm", "baseline"}
    rng = np.random.default_rng(3)
    for bundle in bundles:
        last_cov = bundle.history_covariates[-1]
        for use_baseline in (False, True):
            for horizon in (1, 4, 12, 13, 30):  # 13 and 30 go beyond the horizon: recursive blocks
                periods, pred = bundle.predict_arrays(horizon=horizon, use_baseline=use_baseline)
                frame = bundle.predict(horizon=horizon, use_baseline=use_baseline)
                assert np.array_equal(periods, frame[PERIOD].to_numpy())
                assert np.array_equal(pred, frame["prediction"].to_numpy())
                ref_periods, ref = reference_predict(bundle, periods, np.tile(last_cov, (horizon, 1)),
                                                     use_baseline)
                assert np.array_equal(pred, ref) and np.array_equal(periods, ref_periods)
            for n in (1, 3, 8, 40):  # unsorted rows, gaps, unknown prices carried forward
                periods = bundle.last_period + 1 + rng.choice(3 * n, size=n, replace=False)
                cov = np.column_stack((rng.uniform(1, 6, n).round(2), rng.integers(0, 2, n).astype(float)))
                cov[rng.uniform(size=n) < 0.2, 0] = np.nan
                got_periods, pred = bundle.predict_arrays(periods, cov, use_baseline=use_baseline)
                future = pd.DataFrame({PERIOD: periods, "price": cov[:, 0], "promo": cov[:, 1]})
                frame = bundle.predict(future, use_baseline=use_baseline)
                assert np.array_equal(got_periods, frame[PERIOD].to_numpy())
                assert np.array_equal(pred, frame["prediction"].to_numpy())
                ref_periods, ref = reference_predict(bundle, periods, cov, use_baseline)
                assert np.array_equal(pred, ref) and np.array_equal(got_periods, ref_periods)


def test_predict_arrays_checks_its_inputs_as_predict_does(trained):
    bundle = loglinear_bundle(trained)
    after = bundle.last_period + 1
    with pytest.raises(ValueError, match="after the last trained period"):
        bundle.predict_arrays(np.array([bundle.last_period]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="repeat"):
        bundle.predict_arrays(np.array([after, after]), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        bundle.predict_arrays(np.array([after]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="lack covariate"):
        bundle.predict_arrays(np.array([after]))
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        bundle.predict_arrays(horizon=0)
    with pytest.raises(ValueError, match="not both"):
        bundle.predict_arrays(np.array([after]), np.ones((1, 2)), horizon=2)
    periods, pred = bundle.predict_arrays(np.empty(0, dtype=np.int64), np.empty((0, 2)))
    assert len(periods) == len(pred) == 0


def test_period_times_are_the_timegrid_times_and_callers_cannot_spoil_the_memo(trained):
    bundle = loglinear_bundle(trained)
    periods = np.arange(bundle.last_period + 1, bundle.last_period + 6)
    expected = from_periods(periods, bundle.freq, bundle.anchor).to_numpy()
    first = bundle.period_times(periods)
    assert first.dtype == expected.dtype and np.array_equal(first, expected)
    first[:] = expected[0]  # a caller writing into its answer
    assert np.array_equal(bundle.period_times(periods), expected)
    assert np.array_equal(period_times(periods, "int", None), periods)


def test_the_batch_favourite_is_the_lowest_pooled_wape_over_partitions_that_scored_everything():
    errors = [{"a": (10.0, 100.0), "b": (25.0, 100.0)},
              {"a": (30.0, 100.0), "b": (20.0, 100.0), "c": (0.0, 100.0)},  # c: one series only
              {"a": (10.0, 100.0), "b": (15.0, 100.0)}]
    assert pooled_prior(errors) == "a"  # 50/300 against 60/300; c is not compared
    assert pooled_prior([]) is None


def test_a_partition_leaves_the_batch_favourite_only_for_a_clear_win():
    scores = {"baseline": 0.40, "loglinear": 0.19, "loglm": 0.20}
    names = list(scores)
    assert choose(scores, names, "wape", "loglm", 0.10) == ("loglm", ("loglm",))  # 5 % better: stays
    assert choose(scores, names, "wape", "loglm", 0.0) == ("loglinear", ("loglinear",))
    assert choose({**scores, "loglinear": 0.15}, names, "wape", "loglm", 0.10)[0] == "loglinear"  # 25 %
    assert choose(scores, names, "wape", None, 0.10)[0] == "loglinear"  # no favourite: its own best
    assert choose({**scores, "loglm": float("nan")}, names, "wape", "loglm", 0.10)[0] == "loglinear"
