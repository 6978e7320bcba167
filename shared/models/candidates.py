"""The candidate models that compete per partition, as scikit-learn style estimators.

All take the feature matrix of :mod:`shared.models.features` (columns in ``spec.names`` order, NaN where a
lag does not reach) and a target vector; ``fit`` ignores rows whose target is NaN and returns
``self``; ``predict`` returns non-negative forecasts. They know the column roles through the
:class:`~shared.models.features.FeatureSpec` they are given.

* ``baseline`` — :class:`MovingAverageBaseline`: the mean of the last ``window`` observed targets
  before the forecast origin, flat. The yardstick every model must beat, and the serving fallback.
* ``loglinear`` — :class:`LogLinearForecaster`: ridge regression of ``log1p(target)`` on
  ``log1p`` lags and rolling means, log prices (the log-log, price-elasticity form), promotion
  flags, Fourier terms and a trend; standardised, missing lags imputed from the row's rolling mean.
* ``loglm`` — :class:`LogLinearCovariates`: the same log-log ridge on covariates, Fourier terms and
  trend only, no lags: the classic per-series price/promotion regression. On promotion-driven
  scanner data, lags mostly echo last quarter's deals; this candidate does not.
* ``naive`` — the last observed value (a :class:`MovingAverageBaseline` of window 1);
  ``snaive`` — :class:`~shared.models.local_models.SeasonalNaive`; ``theta``, ``ets``, ``croston``,
  ``tsb`` — statsforecast's per-series models (:class:`~shared.models.local_models.StatsForecaster`).
* ``global`` — one gradient-boosted model over all partitions (:mod:`shared.models.global_model`), seen
  by a partition through a :class:`~shared.models.global_model.GlobalView` (its scale, no copy of the model).
* ``global_ar`` — the run's autoregressive global model (:mod:`shared.models.global_ar`): lags from 1,
  forecast step by step from the partition's history, seen through a
  :class:`~shared.models.global_model.GlobalARView`.
* ``ensemble`` — :class:`AverageForecaster`: the mean of the two best candidates on validation,
  kept when it beats both (training adds it; it is not configured).
* ``gbm`` — :class:`BoostedTreesForecaster`: scikit-learn's histogram gradient boosting on
  ``log1p(target)``. Chosen over ``GradientBoostingRegressor`` for speed: on 132 rows x 22
  features it fits in ~30 ms versus ~140 ms (100 trees), and it scales to 4,000 rows (~60 ms
  versus ~2.8 s); it also handles missing lags natively and pickles smaller.
* extra candidates — :class:`SklearnForecaster`: any scikit-learn regressor by dotted path and
  parameters (``training.extra_candidates``), NaN features imputed with training means.

Which names exist, and how each is built, is the one table of :mod:`shared.models.candidate_kinds`.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, RegressorMixin, is_regressor
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge

from shared.models.candidate_kinds import candidate_names, find_candidate
from shared.errors import ManyModelsError
from shared.models.features import FeatureSpec
from shared.trust import DEFAULT_ESTIMATOR_PACKAGES, UntrustedCodeError, estimator_class

LOG_CAP_MARGIN = 1.0  # log-linear forecasts stop at exp(1) = 2.7 times the largest training target


class CandidateError(ManyModelsError, ValueError):
    """A candidate cannot be built (unknown name, unimportable estimator, not a regressor)."""


class MovingAverageBaseline(BaseEstimator, RegressorMixin):
    """Flat forecast: the mean of the last ``window`` observed (non-NaN) targets of the history."""

    def __init__(self, window: int = 4):
        self.window = window

    def fit(self, X: np.ndarray | None, y: np.ndarray) -> "MovingAverageBaseline":
        y = np.asarray(y, dtype=np.float64)
        observed = y[~np.isnan(y)]
        last = observed[-int(self.window):] if int(self.window) > 0 else observed[:0]
        self.level_ = float(last.mean()) if last.size else 0.0
        self.n_history_ = int(observed.size)
        return self

    def predict(self, X: np.ndarray | int) -> np.ndarray:
        n = X if isinstance(X, (int, np.integer)) else len(X)
        return np.full(int(n), max(self.level_, 0.0))


def ridge_fit(X: np.ndarray, y: np.ndarray, alpha: float) -> Ridge:
    """``Ridge(alpha).fit(X, y)`` (dense, with intercept) by its own normal equations, solved directly.

    Why: the systems are tiny (20-40 features) and scikit-learn's per-call input checks and
    preprocessing cost several times the solve itself, three fits per candidate per partition.
    Same arithmetic as its Cholesky solver (centre, ``(X'X + alpha I) w = X'y``, positive-definite
    solve); the result is a fitted :class:`~sklearn.linear_model.Ridge` that predicts as usual.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_offset = X.mean(axis=0)
    y_offset = float(y.mean())
    Xc = X - x_offset
    gram = Xc.T @ Xc
    gram.flat[:: gram.shape[0] + 1] += alpha
    try:
        coef = scipy.linalg.solve(gram, Xc.T @ (y - y_offset), assume_a="pos", overwrite_a=True)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):  # as scikit-learn: least squares instead
        coef = np.linalg.lstsq(gram, Xc.T @ (y - y_offset), rcond=None)[0]
    model = Ridge(alpha=alpha)
    model.coef_ = coef
    model.intercept_ = y_offset - float(x_offset @ coef)
    model.n_features_in_ = X.shape[1]
    model.n_iter_ = None
    model.solver_ = "cholesky"
    return model


def _observed_rows(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    if not keep.any():
        raise ValueError("no rows with an observed target to fit on")
    return (X, y) if keep.all() else (X[keep], y[keep])


class LogLinearForecaster(BaseEstimator, RegressorMixin):
    """Ridge on log1p(target): multiplicative effects (price elasticity, seasonality) become additive."""

    def __init__(self, spec: FeatureSpec, alpha: float = 3.0):
        self.spec = spec
        self.alpha = alpha

    def _design(self, X: np.ndarray) -> np.ndarray:
        spec = self.spec
        Z = np.array(X, dtype=np.float64, copy=True)
        level_cols = np.concatenate((spec.columns("lag_"), spec.columns("roll_")))
        Z[:, level_cols] = np.log1p(np.maximum(Z[:, level_cols], 0.0))
        # a missing lag or rolling mean takes the row's first available rolling mean (shortest window)
        levels = Z[:, level_cols]
        missing = np.isnan(levels)
        if missing.any():
            rolls = Z[:, spec.columns("roll_")]
            if rolls.shape[1]:
                fallback = rolls[np.arange(len(Z)), np.argmax(~np.isnan(rolls), axis=1)]
            else:
                fallback = np.full(len(Z), np.nan)
            Z[:, level_cols] = np.where(missing, fallback[:, None], levels)
        return Z

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LogLinearForecaster":
        X, y = _observed_rows(X, y)
        Z = self._design(X)
        self.fill_ = _column_means(Z)
        Z = np.where(np.isnan(Z), self.fill_, Z)
        self.mean_ = Z.mean(axis=0)
        scale = Z.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        target = np.log1p(np.maximum(y, 0.0))
        self.ridge_ = ridge_fit((Z - self.mean_) / self.scale_, target, self.alpha)
        # a log-linear model extrapolates exponentially (a price or trend never seen in a short
        # history): forecasts stop at e times the largest target it learned from
        self.cap_ = float(target.max()) + LOG_CAP_MARGIN
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        Z = self._design(X)
        Z = np.where(np.isnan(Z), self.fill_, Z)
        ridge = self.ridge_
        # Ridge.predict's own arithmetic (X @ coef_ + intercept_) without its per-call input checks,
        # which cost more than the product on a single request's rows; the values are the same
        raw = ((Z - self.mean_) / self.scale_) @ ridge.coef_ + ridge.intercept_
        cap = getattr(self, "cap_", None)  # models pickled before the cap predict as they did
        if cap is not None:
            raw = np.minimum(raw, cap)
        return np.maximum(np.expm1(raw), 0.0)


class LogLinearCovariates(LogLinearForecaster):
    """Ridge of log1p(target) on covariates (log prices, flags), Fourier terms and trend: no lags."""

    def __init__(self, spec: FeatureSpec, alpha: float = 1.0):
        super().__init__(spec, alpha)

    def _columns(self) -> np.ndarray:
        spec = self.spec
        return np.concatenate((spec.columns("sin_"), spec.columns("cos_"), spec.columns("ysin_"),
                               spec.columns("ycos_"), spec.columns("cov_"), spec.columns("trend")))

    def _design(self, X: np.ndarray) -> np.ndarray:
        return np.array(np.asarray(X, dtype=np.float64)[:, self._columns()], copy=True)


class AverageForecaster(BaseEstimator, RegressorMixin):
    """The mean of fitted members' forecasts (the ensemble of the two best candidates).

    Built from already fitted estimators; ``fit`` refits each member (a clone) on new rows.
    """

    def __init__(self, members: tuple[Any, ...] = (), names: tuple[str, ...] = ()):
        self.members = members
        self.names = names

    def fit(self, X: np.ndarray, y: np.ndarray) -> "AverageForecaster":
        from sklearn.base import clone

        self.members_ = tuple(clone(m).fit(X, y) for m in self.members)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        members = getattr(self, "members_", self.members)
        preds = [np.asarray(m.predict(X), dtype=np.float64) for m in members]
        return np.maximum(np.mean(preds, axis=0), 0.0)


class BoostedTreesForecaster(BaseEstimator, RegressorMixin):
    """Histogram gradient boosting on log1p(target): captures non-linear promo/season interactions."""

    def __init__(self, spec: FeatureSpec, max_iter: int = 50, learning_rate: float = 0.15,
                 max_leaf_nodes: int = 8, min_samples_leaf: int = 10, max_bins: int = 64,
                 random_state: int | None = 0):
        self.spec = spec
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.max_bins = max_bins
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> "BoostedTreesForecaster":
        X, y = _observed_rows(X, y)
        # a lag longer than a short history is all-NaN; the binner cannot take such a column
        self.columns_ = np.flatnonzero(~np.isnan(X).all(axis=0))
        self.model_ = HistGradientBoostingRegressor(
            max_iter=self.max_iter, learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf, max_bins=self.max_bins, early_stopping=False,
            random_state=self.random_state,
        ).fit(X[:, self.columns_], np.log1p(np.maximum(y, 0.0)))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)[:, self.columns_]
        raw = small_hgb_predict(self.model_, X) if len(X) <= SMALL_ROWS else self.model_.predict(X)
        return np.maximum(np.expm1(raw), 0.0)


SMALL_ROWS = 256  # up to this many rows, trees are walked on one thread without sklearn's checks


def small_hgb_predict(model: HistGradientBoostingRegressor, X: np.ndarray) -> np.ndarray:
    """``model.predict(X)`` for a few float64 rows: the same tree walks, summed in the same order.

    scikit-learn's own ``_raw_predict`` loop minus what dominates a single request: input
    validation and an OpenMP thread team per tree (50 trees, 4 rows); the link's inverse applied
    as ``predict`` does (identity, or exp for the Poisson loss). Models it does not cover (several
    trees per iteration) go through ``model.predict``.
    """
    predictors = getattr(model, "_predictors", None)
    link = getattr(getattr(model, "_loss", None), "link", None)
    if (predictors is None or link is None or model.n_trees_per_iteration_ != 1
            or X.ndim != 2 or X.shape[1] != model.n_features_in_):
        return model.predict(X)
    raw = np.zeros((len(X), 1), dtype=model._baseline_prediction.dtype, order="F")
    raw += model._baseline_prediction
    bitsets, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
    column = raw[:, 0]
    for (tree,) in predictors:
        column += tree.predict(X, bitsets, f_idx_map, 1)
    return link.inverse(raw.ravel())


def resolve_estimator(path: str, params: dict[str, Any] | None = None, name: str = "",
                      packages: Any = None) -> BaseEstimator:
    """An unfitted regressor from a dotted path and parameters; :class:`CandidateError` names the path.

    The path is checked against the allowed packages (``training.estimator_packages``; scikit-learn
    and LightGBM by default) and resolved to a scikit-learn regressor class by
    :func:`shared.trust.estimator_class` before anything is called: a path such as
    ``subprocess.Popen`` is refused unimported."""
    where = f"training.extra_candidates {name!r}: " if name else ""
    try:
        cls = estimator_class(path, packages or DEFAULT_ESTIMATOR_PACKAGES,
                              where=f"{where}estimator" if where else "estimator")
    except UntrustedCodeError as exc:
        raise CandidateError(str(exc)) from exc
    try:
        model = cls(**dict(params or {}))
    except TypeError as exc:
        raise CandidateError(f"{where}bad params for estimator {path!r}: {exc}") from exc
    if not is_regressor(model):
        raise CandidateError(f"{where}estimator {path!r} is not a scikit-learn regressor")
    return model


def _column_means(Z: np.ndarray) -> np.ndarray:
    """Means of the non-NaN values per column, 0 for a column with none (no warnings, no copies)."""
    present = ~np.isnan(Z)
    count = present.sum(axis=0)
    total = np.where(present, Z, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


class SklearnForecaster(BaseEstimator, RegressorMixin):
    """Any scikit-learn regressor by dotted path, NaN features filled with training means."""

    def __init__(self, estimator: str, params: dict[str, Any] | None = None, log_target: bool = False,
                 random_state: int | None = None, packages: tuple[str, ...] | None = None):
        self.estimator = estimator
        self.params = params
        self.log_target = log_target
        self.random_state = random_state
        self.packages = packages  # the allowed estimator packages (None: the defaults)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "SklearnForecaster":
        X, y = _observed_rows(X, y)
        model = resolve_estimator(self.estimator, self.params, packages=getattr(self, "packages", None))
        if "random_state" in model.get_params() and "random_state" not in (self.params or {}):
            model.set_params(random_state=self.random_state)
        self.fill_ = _column_means(X)
        target = np.log1p(np.maximum(y, 0.0)) if self.log_target else y
        self.model_ = model.fit(np.where(np.isnan(X), self.fill_, X), target)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = np.asarray(self.model_.predict(np.where(np.isnan(X), self.fill_, X)), dtype=np.float64)
        return np.maximum(np.expm1(out) if self.log_target else out, 0.0)


def make_candidate(name: str, cfg: Any, spec: FeatureSpec) -> BaseEstimator:
    """A fresh, unfitted estimator for a candidate name of the config (pooled ones are fitted by
    :mod:`shared.models.training` over every partition, not built here)."""
    kind = find_candidate(name)
    if kind is not None and kind.build is not None:
        return kind.build(sys.modules[__name__], cfg, spec)
    for extra in cfg.training.extra_candidates:
        if extra.name == name:
            return SklearnForecaster(extra.estimator, dict(extra.params), bool(extra.log_target),
                                     random_state=int(cfg.training.seed),
                                     packages=tuple(cfg.training.estimator_packages))
    if kind is not None:
        raise CandidateError(f"candidate {name!r} is pooled: training fits it once over every partition")
    raise CandidateError(f"unknown candidate {name!r}; known: {known_names(cfg)}")


def extra_names(cfg: Any) -> set[str]:
    return {c.name for c in cfg.training.extra_candidates}


def known_names(cfg: Any) -> list[str]:
    return sorted(set(candidate_names()) | extra_names(cfg))


def check_candidates(cfg: Any) -> None:
    """Fail fast, once per batch, on a misconfigured candidate instead of once per partition."""
    builtin = set(candidate_names())
    for extra in cfg.training.extra_candidates:
        if extra.name in builtin:
            raise CandidateError(f"training.extra_candidates: name {extra.name!r} clashes with a built-in "
                                 f"candidate")
        resolve_estimator(extra.estimator, extra.params, extra.name, cfg.training.estimator_packages)
    for name in cfg.training.candidates:
        if name not in builtin and name not in extra_names(cfg):
            raise CandidateError(f"unknown candidate {name!r}; known: {known_names(cfg)}")
