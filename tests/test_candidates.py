"""Candidate models: the baseline's definition, the log-log model's elasticity, the plug-in regressors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from shared.models.candidates import (
    BoostedTreesForecaster,
    CandidateError,
    LogLinearForecaster,
    MovingAverageBaseline,
    SklearnForecaster,
    check_candidates,
    make_candidate,
    resolve_estimator,
)
from shared.config import CandidateSpec, ProjectConfig
from shared.models.features import FeatureSpec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec.from_config(ProjectConfig().with_overrides({"data.covariates": ["price", "promo"]}))


def design(spec: FeatureSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the feature layout with demand = 50 * price^-1.5 * 1.3^promo, lags consistent with it."""
    rng = np.random.default_rng(seed)
    X = np.full((n, len(spec.names)), np.nan)
    price = rng.uniform(2.0, 8.0, n)
    promo = (rng.uniform(size=n) < 0.2).astype(float)
    y = 50.0 * price ** -1.5 * 1.3 ** promo * np.exp(rng.normal(0, 0.05, n))
    level = np.full(n, y.mean())
    for c in np.concatenate((spec.columns("lag_"), spec.columns("roll_"))):
        X[:, c] = level
    X[:5, spec.columns("lag_")] = np.nan  # the first rows of a series have no lags yet
    X[:, spec.columns("sin_")] = 0.0
    X[:, spec.columns("cos_")] = 1.0
    X[:, spec.names.index("cov_price")] = np.log(price)
    X[:, spec.names.index("cov_promo")] = promo
    X[:, spec.names.index("trend")] = np.arange(n)
    return X, y


def test_baseline_is_the_mean_of_the_last_observed_values():
    base = MovingAverageBaseline(window=4).fit(None, np.array([1.0, 2.0, 3.0, np.nan, 5.0, 7.0, np.nan]))
    assert base.level_ == pytest.approx((2 + 3 + 5 + 7) / 4)
    np.testing.assert_array_equal(base.predict(3), [4.25, 4.25, 4.25])
    assert MovingAverageBaseline().fit(None, np.array([6.0, 8.0])).level_ == 7.0  # fewer than the window
    empty = MovingAverageBaseline().fit(None, np.array([np.nan]))
    assert empty.predict(np.zeros((2, 5))).tolist() == [0.0, 0.0]


def test_loglinear_learns_the_price_elasticity(spec):
    X, y = design(spec, 150)
    model = LogLinearForecaster(spec).fit(X, y)
    row = X[-1:].copy()
    row[0, spec.names.index("cov_promo")] = 0.0
    cheap, dear = row.copy(), row.copy()
    cheap[0, spec.names.index("cov_price")] = np.log(3.0)
    dear[0, spec.names.index("cov_price")] = np.log(6.0)
    ratio = model.predict(dear)[0] / model.predict(cheap)[0]
    assert ratio == pytest.approx(2.0 ** -1.5, rel=0.08)  # doubling the price divides demand by 2^1.5


def test_loglinear_imputes_missing_lags_and_never_predicts_negative(spec):
    X, y = design(spec, 60)
    model = LogLinearForecaster(spec).fit(X, y)
    X_new = X[:10].copy()
    X_new[:, spec.columns("roll_")] = np.nan  # nothing to impute from: training means are used
    pred = model.predict(X_new)
    assert np.isfinite(pred).all() and (pred >= 0).all()
    assert (LogLinearForecaster(spec).fit(X, np.zeros(60)).predict(X) >= 0).all()


def test_loglinear_ignores_rows_without_target(spec):
    X, y = design(spec, 80)
    y_gappy = y.copy()
    y_gappy[::7] = np.nan
    a = LogLinearForecaster(spec).fit(X, y_gappy).predict(X)
    keep = ~np.isnan(y_gappy)
    b = LogLinearForecaster(spec).fit(X[keep], y[keep]).predict(X)
    np.testing.assert_allclose(a, b)
    with pytest.raises(ValueError, match="no rows"):
        LogLinearForecaster(spec).fit(X, np.full(80, np.nan))


def test_boosted_trees_are_deterministic_for_a_seed_and_handle_missing_values(spec):
    X, y = design(spec, 120)
    a = BoostedTreesForecaster(spec, random_state=7).fit(X, y).predict(X)
    b = BoostedTreesForecaster(spec, random_state=7).fit(X, y).predict(X)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and (a >= 0).all()
    assert np.corrcoef(a, y)[0, 1] > 0.9


def test_any_sklearn_regressor_by_dotted_path_with_params_and_log_target(spec):
    X, y = design(spec, 100)
    lasso = SklearnForecaster("sklearn.linear_model.Lasso", {"alpha": 0.01}, log_target=True).fit(X, y)
    assert type(lasso.model_).__name__ == "Lasso" and lasso.model_.alpha == 0.01
    assert np.corrcoef(lasso.predict(X), y)[0, 1] > 0.9
    forest = "sklearn.ensemble.ExtraTreesRegressor"
    a = SklearnForecaster(forest, {"n_estimators": 5}, random_state=3).fit(X, y).predict(X)
    b = SklearnForecaster(forest, {"n_estimators": 5}, random_state=3).fit(X, y).predict(X)
    np.testing.assert_array_equal(a, b)  # the training seed reaches estimators that take one


def test_bad_estimator_paths_and_params_name_the_path():
    with pytest.raises(CandidateError, match="'sklearn.linear_model.NoSuchModel'"):
        resolve_estimator("sklearn.linear_model.NoSuchModel")
    with pytest.raises(CandidateError, match="'nonexistent_pkg.Model'"):
        resolve_estimator("nonexistent_pkg.Model")
    with pytest.raises(CandidateError, match="not a scikit-learn regressor"):
        resolve_estimator("sklearn.preprocessing.StandardScaler")
    with pytest.raises(CandidateError, match="bad params"):
        resolve_estimator("sklearn.linear_model.Ridge", {"no_such_param": 1})
    with pytest.raises(CandidateError, match="dotted path"):
        resolve_estimator("Ridge")


def test_config_candidates_are_checked_once_up_front(spec):
    ok = ProjectConfig().with_overrides({"training.extra_candidates": [
        {"name": "lasso", "estimator": "sklearn.linear_model.Lasso", "params": {"alpha": 0.1}}]})
    check_candidates(ok)
    assert isinstance(make_candidate("lasso", ok, spec), SklearnForecaster)
    assert isinstance(make_candidate("gbm", ok, spec), BoostedTreesForecaster)
    broken = ProjectConfig()
    broken.training.extra_candidates = [CandidateSpec(name="knn", estimator="sklearn.neighbors.NoSuch")]
    with pytest.raises(CandidateError, match="'knn'.*sklearn.neighbors.NoSuch"):
        check_candidates(broken)
    with pytest.raises(CandidateError, match="unknown candidate 'prophet'"):
        make_candidate("prophet", ok, spec)


def test_fitted_candidates_pickle_and_predict_the_same(spec):
    X, y = design(spec, 100)
    for model in (MovingAverageBaseline().fit(None, y), LogLinearForecaster(spec).fit(X, y),
                  BoostedTreesForecaster(spec).fit(X, y)):
        again = pickle.loads(pickle.dumps(model))
        np.testing.assert_array_equal(again.predict(X), model.predict(X))


def test_boosted_trees_fit_a_history_shorter_than_the_longest_lag(spec):
    X, y = design(spec, 40)
    X[:, spec.names.index("lag_53")] = np.nan  # a 40-period history has no lag 53 at all
    pred = BoostedTreesForecaster(spec).fit(X, y).predict(X)
    assert np.isfinite(pred).all()


def test_candidates_predict_exactly_what_scikit_learn_predicts_for_few_and_many_rows(spec):
    rng = np.random.default_rng(7)
    for seed in range(6):
        X, y = design(spec, 160, seed=seed)
        X[rng.uniform(size=X.shape) < 0.05] = np.nan  # missing values go down the trees' NaN branches
        loglinear = LogLinearForecaster(spec).fit(X, y)
        gbm = BoostedTreesForecaster(spec, random_state=seed).fit(X, y)
        # 1 to 480 rows: both sides of SMALL_ROWS
        for rows in (X[:1], X[-4:], X[::-7], X, np.vstack([X] * 3)):
            Z = loglinear._design(rows)
            Z = np.where(np.isnan(Z), loglinear.fill_, Z)
            scaled = (Z - loglinear.mean_) / loglinear.scale_
            library = np.maximum(np.expm1(loglinear.ridge_.predict(scaled)), 0.0)
            assert np.array_equal(loglinear.predict(rows), library)
            library = np.maximum(np.expm1(gbm.model_.predict(rows[:, gbm.columns_])), 0.0)
            assert np.array_equal(gbm.predict(rows), library)
    with pytest.raises(ValueError):  # a row of the wrong width is refused, not misread
        loglinear.predict(X[:2, :-1])
    with pytest.raises(IndexError):
        gbm.predict(X[:2, :-1])


def test_log_linear_forecasts_stop_at_e_times_the_largest_target_seen():
    from shared.models.candidates import LOG_CAP_MARGIN, LogLinearCovariates
    from shared.config import ProjectConfig
    from shared.models.features import FeatureSpec

    spec = FeatureSpec.from_config(ProjectConfig().with_overrides({"data.covariates": ["price"]}))
    rng = np.random.default_rng(0)
    n = 30
    X = np.zeros((n, len(spec.names)))
    price = spec.names.index("cov_price")
    X[:, price] = np.log(rng.uniform(2.0, 2.2, n))  # a short history over a narrow price band
    y = np.exp(3.0 - 4.0 * X[:, price]) * 100
    model = LogLinearCovariates(spec).fit(X, y)
    far = X[:3].copy()
    far[:, price] = np.log(0.05)  # a price never seen: the log-log slope alone would explode
    assert model.predict(far).max() <= np.expm1(np.log1p(y.max()) + LOG_CAP_MARGIN) + 1e-9
    assert np.isfinite(model.predict(far)).all()


def test_the_direct_ridge_solve_equals_scikit_learns_ridge():
    from sklearn.linear_model import Ridge

    from shared.models.candidates import ridge_fit

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 25))
    X[:, 3] = 0.0  # a constant column, as a covariate that never moved
    y = X @ rng.normal(size=25) + rng.normal(scale=0.1, size=400) + 2.0
    ours, theirs = ridge_fit(X, y, 3.0), Ridge(alpha=3.0).fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-9, atol=1e-11)
    assert ours.intercept_ == pytest.approx(theirs.intercept_, abs=1e-10)
    np.testing.assert_allclose(ours.predict(X[:5]), theirs.predict(X[:5]), rtol=1e-9)


# -- one table of candidates -------------------------------------------------------------------------
@pytest.fixture
def candidate_table(monkeypatch):
    """The table of candidates as it is; what a test registers is gone after it."""
    from shared.models import candidate_kinds

    monkeypatch.setattr(candidate_kinds, "CANDIDATES", dict(candidate_kinds.CANDIDATES))


def test_a_candidate_registered_in_one_call_is_accepted_by_the_config_and_trained(candidate_table):
    from shared.models.candidate_kinds import register_candidate
    from shared.config import ConfigError
    from shared.keys import PARTITION_ID, partition_ids
    from shared.data.synthetic import generate_panel
    from shared.data.timegrid import PERIOD, to_periods
    from shared.models.training import train_batch

    chosen = {"training.candidates": ["mean8"], "training.folds": 1}
    with pytest.raises(ConfigError, match="unknown candidate.*mean8"):
        ProjectConfig().with_overrides(chosen)

    register_candidate("mean8", lambda models, cfg, spec: models.MovingAverageBaseline(window=8))  # the whole change

    cfg = ProjectConfig().with_overrides(chosen)
    frame = next(generate_panel(partitions=3, periods=100, seed=5))
    frame[PARTITION_ID] = partition_ids(frame, cfg.data.keys).to_numpy()
    frame[PERIOD] = to_periods(frame[cfg.data.time], cfg.data.freq)
    frame["_filled"] = False
    frame = frame.sort_values([PARTITION_ID, PERIOD], ignore_index=True)
    results = train_batch(frame, cfg, {})
    assert [(r.status, r.model_name, list(r.candidate_scores)) for r in results] == [
        ("trained", "mean8", ["mean8"])] * 3
    assert all(r.bundle.estimator.window == 8 for r in results)


def test_registration_refuses_a_taken_reserved_or_malformed_name(candidate_table):
    from shared.models.candidate_kinds import register_candidate

    def build(models, cfg, spec):
        return models.MovingAverageBaseline()

    for name in ("gbm", "ensemble", "two words", ""):
        with pytest.raises(ValueError, match=repr(name)):
            register_candidate(name, build)


def test_the_table_says_which_candidates_are_pooled_and_which_run_by_default(spec):
    from shared.models.candidate_kinds import candidate_names, default_candidates, pooled_candidates

    assert default_candidates() == ProjectConfig().training.candidates == [
        "baseline", "naive", "snaive", "theta", "loglinear", "loglm", "global", "global_ar"]
    assert pooled_candidates() == ("global", "global_ar")
    cfg = ProjectConfig()
    for name in candidate_names():
        if name in pooled_candidates():
            with pytest.raises(CandidateError, match="pooled"):
                make_candidate(name, cfg, spec)
        else:
            assert make_candidate(name, cfg, spec).get_params() is not None  # every other one builds
