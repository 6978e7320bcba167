"""Training of one mini-batch file: every partition's candidates compete, the best is kept.

Per partition, the end of the series is cut into windows by period::

    [ train ............ | validation (validation_periods) | test (test_periods) ]

1. every candidate is fitted on *train* and forecasts *validation* from its origin; the lowest
   ``training.selection_metric`` wins (ties and undefined scores go to the earlier candidate);
2. the winner and the baseline are refitted on *train + validation* and forecast *test*: the
   winner's WAPE/MAPE/RMSE/accuracy are the partition's ``metrics`` (used by promotion), the
   baseline's are ``baseline_metrics``;
3. the winner and the baseline are refitted on all rows and packed into a :class:`ForecastBundle`.

Statuses: ``skipped`` (fewer than ``forecast.min_periods`` observed rows, and no global model to
forecast it; with one, such a series is treated as too short, below); ``baseline_only``
(fewer than ``forecast.min_train_periods`` observed rows before the validation window, with the
folds reduced to one if need be, and no global model in the run: the baseline is scored on the
last ``min(test_periods, span // 2)`` periods and kept; with a global model, that is the
partition's model instead: status ``trained``, model ``global``, the reason says why); ``failed``
(anything raised for that partition: the exception's type and message; the others go on);
``trained``.

Rows filled into gaps by validation (``_filled``) stay in the data as lag and rolling-mean
inputs, but no model learns from their target (on generated data, training on ``gaps="zero"``
fills raised the log-linear model's WAPE from 0.14 to 0.24) and metrics and the baseline's moving
average use observed rows only. Features come from one
vectorised pass over the whole batch (:func:`shared.models.features.build_features`); a window longer
than the horizon is forecast recursively, exactly as :meth:`ForecastBundle.predict` does.

Timing: ``TrainResult.fit_seconds`` is the partition's wall time (perf_counter), including its
row-weighted share of the batch's feature building; ``TrainResult.timings`` splits it into
``features`` (that share), ``estimators`` (the candidates' own fit and predict calls) and
``overhead`` (everything else: slicing, metrics, bundles). :func:`time_breakdown` sums them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Generator, Iterable, Mapping

import numpy as np
import pandas as pd

from shared.models.candidate_kinds import pooled_candidates
from shared.config import ProjectConfig
from shared.models.metric_names import ERROR_METRICS
from shared.models.candidates import AverageForecaster, MovingAverageBaseline, check_candidates, make_candidate
from shared.models.bundle import ForecastBundle, recursive_forecast
from shared.models.effects import covariate_effects
from shared.models.features import FeatureFrame, build_features
from shared.models.global_ar import forecast_windows
from shared.models.global_model import GlobalModelSet, partition_stats, uses_history
from shared.keys import PARTITION_ID, key_dict
from shared.models.metrics import evaluate, forecast_ceiling, robust_wape, selection_key, typical_level
from shared.models.selection import (
    Windows, _fold_error, _Residuals, calibrated_intervals, choose, partition_windows, pooled_prior,
    step_profile,
)
from shared.data.timegrid import PERIOD, anchor_offset, partition_anchors

logger = logging.getLogger(__name__)

STATUSES = ("trained", "baseline_only", "skipped", "failed")


# -- per-partition result -----------------------------------------------------------------------

@dataclass
class TrainResult:
    """The outcome of one partition; ``to_row()`` is the JSON line the entry script writes."""

    partition_id: str
    keys: dict[str, str]
    status: str
    reason: str = ""
    model_name: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    candidate_scores: dict[str, float] = field(default_factory=dict)
    global_metrics: dict[str, float] = field(default_factory=dict)  # the global model on the test window
    n_observed: int = 0
    fit_seconds: float = 0.0
    bundle: ForecastBundle | None = None
    timings: dict[str, float] = field(default_factory=dict)  # features / estimators / overhead seconds
    residuals: Any = None  # backtest residuals until the batch calibrates the intervals (not stored)
    effects: list[dict[str, Any]] = field(default_factory=list)  # shared.models.effects: elasticity, lift
    # observed values of the season before the test window (_period, actual): where a forecast comes from
    history: list[dict[str, Any]] = field(default_factory=list)
    anchor: str | None = None  # where the partition's time stamps sit in their period (its own)

    def to_row(self) -> dict[str, Any]:
        return {
            PARTITION_ID: self.partition_id,
            "keys": dict(self.keys),
            "status": self.status,
            "reason": self.reason,
            "model_name": self.model_name,
            "metrics": _json_floats(self.metrics),
            "baseline_metrics": _json_floats(self.baseline_metrics),
            "candidate_scores": _json_floats(self.candidate_scores),
            "global_metrics": _json_floats(self.global_metrics),
            "n_observed": int(self.n_observed),
            "fit_seconds": round(float(self.fit_seconds), 6),
            "timings": {k: round(float(v), 6) for k, v in self.timings.items()},
            "backtest": self.backtest_rows(),
            "history": self.history,
            "anchor": self.anchor,
            "effects": _finite_effects(self.effects),
        }

    def backtest_rows(self) -> list[dict[str, Any]]:
        """The test window as JSON rows (periods, not time stamps: registration converts them all at
        once), so registering a run never has to open the bundles."""
        if self.bundle is None:
            return []
        b = self.bundle.backtest_arrays
        periods = np.asarray(b.get(PERIOD, ()), dtype=np.int64)
        if not len(periods):
            return []
        values = {c: [None if np.isnan(v) else float(v) for v in np.asarray(b.get(c), dtype=float)]
                  for c in ("actual", "prediction", "baseline", "global") if c in b}
        return [{PERIOD: int(p), **{c: values[c][i] for c in values}} for i, p in enumerate(periods)]


def _json_floats(values: Mapping[str, float]) -> dict[str, float | None]:
    """NaN is not JSON: undefined metrics become null."""
    return {k: (None if v is None or math.isnan(float(v)) else float(v)) for k, v in values.items()}


def _finite_effects(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Effect rows with finite values only (a model's infinite elasticity is not a number to store)."""
    return [dict(r) for r in rows if isinstance(r.get("value"), float) and math.isfinite(r["value"])]


# -- the batch ----------------------------------------------------------------------------------

class _Clock:
    """Accumulates the seconds spent inside the estimators' own fit and predict calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def fit(self, est: Any, X: np.ndarray | None, y: np.ndarray) -> Any:
        t = perf_counter()
        est.fit(X, y)
        self.seconds += perf_counter() - t
        return est

    def predict(self, est: Any, X: np.ndarray | int) -> np.ndarray:
        t = perf_counter()
        out = est.predict(X)
        self.seconds += perf_counter() - t
        return out


@dataclass
class _Batch:
    cfg: Any
    ff: FeatureFrame
    cov: np.ndarray
    keys: list[dict[str, str]]
    anchor: str | None
    global_models: GlobalModelSet | None = None
    ceilings: dict[tuple[int, int], float] = field(default_factory=dict)
    anchors: list[str | None] = field(default_factory=list)  # each partition's own (_partition_anchors)
    windows: dict[int, Windows] = field(default_factory=dict)  # each partition's, made once (_windows)
    # per partition: the autoregressive global model's forecasts of its folds and of its test window
    autoregressive: dict[int, tuple[list[np.ndarray], np.ndarray | None]] = field(default_factory=dict)


def train_batch(frame: pd.DataFrame, cfg: Any, dataset_meta: Mapping[str, Any] | None = None,
                global_models: GlobalModelSet | None = None) -> list[TrainResult]:
    """Train every partition of one validated mini-batch frame; one :class:`TrainResult` each.

    ``global_models``: the run's global model fits (:func:`shared.models.global_model.fit_global`);
    without them the ``global`` candidate and the global fallback's metrics are left out.
    """
    meta = dict(dataset_meta or {})
    check_candidates(cfg)
    if cfg.training.selection_metric not in ERROR_METRICS:
        raise ValueError(f"training.selection_metric {cfg.training.selection_metric!r} "
                         f"is not one of {', '.join(ERROR_METRICS)}")
    began = perf_counter()
    if len(frame) and not _is_sorted(frame):
        frame = frame.sort_values([PARTITION_ID, PERIOD], kind="stable", ignore_index=True)
    ff = build_features(frame, cfg)
    covs = list(cfg.data.covariates)
    cov = frame[covs].to_numpy(dtype=np.float64) if covs else np.empty((len(frame), 0))
    key_cols = list(cfg.data.keys)
    firsts = frame[key_cols].iloc[ff.bounds[:-1]].itertuples(index=False, name=None) if len(frame) else []
    keys = [key_dict(key_cols, values) for values in firsts]
    anchor = meta["anchor"] if "anchor" in meta else _anchor(frame, cfg)
    batch = _Batch(cfg=cfg, ff=ff, cov=cov, keys=keys, anchor=anchor, global_models=global_models,
                   anchors=_partition_anchors(frame, ff, cfg, anchor))
    if wants_autoregressive(cfg, global_models):
        batch.autoregressive = _autoregressive_backtests(batch)
    shared_seconds = perf_counter() - began  # features and set-up, shared out by rows
    n_rows = max(len(frame), 1)
    shares = [shared_seconds * (ff.bounds[g + 1] - ff.bounds[g]) / n_rows for g in range(ff.n_partitions)]
    # phase 1: every partition scores its candidates on its folds; phase 2: each chooses, knowing
    # which candidate did best over the whole batch (the prior), then fits and packs its model
    jobs = [_PartitionJob(batch, g) for g in range(ff.n_partitions)]
    for job in jobs:
        job.step(None)
    prior = pooled_prior([job.fold_errors for job in jobs if job.fold_errors])
    for job, share in zip(jobs, shares):
        job.step(prior)
    results = [job.finish(share) for job, share in zip(jobs, shares)]
    _set_intervals(results, cfg)
    return results


def wants_autoregressive(cfg: Any, global_models: GlobalModelSet | None) -> bool:
    """Is ``global_ar`` a candidate, with its fits at hand?"""
    return (global_models is not None and "global_ar" in cfg.training.candidates
            and all(global_models.has_autoregressive(fit) for fit in ("validation", "test", "final")))


def _autoregressive_backtests(batch: _Batch) -> dict[int, tuple[list[np.ndarray], np.ndarray | None]]:
    """The autoregressive global model's forecasts of every partition's folds (its validation fit)
    and test window (its test fit), each fit's windows of the whole batch forecast together
    (:func:`shared.models.global_ar.forecast_windows`: one model call per step)."""
    ff, gm = batch.ff, batch.global_models
    wins = {}
    for g in range(ff.n_partitions):
        rows = ff.rows(g)
        if (~ff.filled[rows]).sum() >= 1:
            wins[g] = _windows(batch, g)
    out: dict[int, tuple[list[np.ndarray], np.ndarray | None]] = {}
    for fit in ("validation", "test"):
        items, scales, centres, ceilings = [], [], [], []
        for g, win in wins.items():
            n = int(ff.bounds[g + 1] - ff.bounds[g])
            cutoff = win.validation_start if fit == "validation" else win.test_start
            chosen = ([(lo, hi, origin) for lo, hi, origin in win.folds] if fit == "validation"
                      else ([(win.i_test, n, win.test_start - 1)] if win.i_test < n else []))
            scale, centre = partition_stats(ff, g, int(cutoff))
            for lo, hi, origin in chosen:
                items.append((g, lo, hi, origin))
                scales.append(scale)
                centres.append(centre)
                ceilings.append(_ceiling(batch, g, lo))
        preds = forecast_windows(gm.fits[fit].autoregressive, ff, items, np.asarray(scales),
                                 np.asarray(centres, dtype=np.float64).reshape(len(items), len(ff.spec.covariates)),
                                 np.asarray(ceilings))
        for (g, lo, hi, origin), pred in zip(items, preds):
            folds, test = out.setdefault(g, ([], None))
            if fit == "validation":
                folds.append(pred)
            else:
                out[g] = (folds, pred)
    return out


def _is_sorted(frame: pd.DataFrame) -> bool:
    pids = frame[PARTITION_ID].to_numpy()
    periods = frame[PERIOD].to_numpy()
    same = pids[1:] == pids[:-1]
    if (same & (periods[1:] <= periods[:-1])).any():
        return False
    return len(pd.unique(pids)) == int((~same).sum()) + 1


def _times(frame: pd.DataFrame, cfg: Any) -> pd.Series | None:
    """The frame's time stamps, or None where they set no anchor (integer periods, no time column)."""
    times = frame[cfg.data.time] if cfg.data.time in frame.columns else None
    if cfg.data.freq == "int" or times is None or not pd.api.types.is_datetime64_any_dtype(times):
        return None
    return times


def _partition_anchors(frame: pd.DataFrame, ff: FeatureFrame, cfg: Any, default: str | None) -> list[str | None]:
    """Each partition's own anchor (its observed rows' offset in their period); the dataset's where
    a partition has no observed time stamps."""
    times = _times(frame, cfg)
    if times is None:
        return [default] * ff.n_partitions
    observed = ~frame["_filled"].to_numpy(dtype=bool) if "_filled" in frame.columns else None
    found = partition_anchors(times, ff.bounds, cfg.data.freq, observed)
    return [a if a is not None else default for a in found]


def _anchor_of(batch: _Batch, g: int) -> str | None:
    return batch.anchors[g] if batch.anchors else batch.anchor


def _anchor(frame: pd.DataFrame, cfg: Any) -> str | None:
    times = _times(frame, cfg)
    return None if times is None else anchor_offset(times, cfg.data.freq)


class _PartitionJob:
    """One partition's training, run in two steps around the batch's pooled candidate scores.

    ``_fit_partition`` is a generator: it yields once with its fold errors per candidate, and is
    resumed with the batch's prior. A failure in either step fails this partition alone.
    """

    def __init__(self, batch: _Batch, g: int) -> None:
        ff = batch.ff
        rows = ff.rows(g)
        self.result = TrainResult(partition_id=str(ff.partition_ids[g]), keys=batch.keys[g], status="failed",
                                  n_observed=int((~ff.filled[rows]).sum()))
        self.result.history = _history(ff.periods[rows], ff.y[rows], ff.filled[rows], batch.cfg)
        self.result.anchor = _anchor_of(batch, g)
        self._effects = bool(batch.cfg.training.effects)
        self.clock = _Clock()
        self.seconds = 0.0
        self.fold_errors: dict[str, tuple[float, float]] = {}
        self._steps = _fit_partition(batch, g, self.result, self.clock)
        self._started = False
        self._done = False

    def step(self, prior: str | None) -> None:
        if self._done:
            return
        began = perf_counter()
        try:
            if self._started:
                self._steps.send(prior)
            else:
                self._started = True
                self.fold_errors = next(self._steps)
        except StopIteration:
            self._done = True
        except Exception as exc:  # one bad partition must not stop the batch: recorded, logged, reported
            self._done = True
            self.fold_errors = {}
            result = self.result
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
            result.model_name, result.bundle = None, None
            result.metrics, result.baseline_metrics, result.candidate_scores = {}, {}, {}
            result.global_metrics = {}
            logger.warning("partition %s failed: %s", result.partition_id, result.reason, exc_info=True)
        finally:
            self.seconds += perf_counter() - began

    def finish(self, feature_seconds: float) -> TrainResult:
        result = self.result
        result.fit_seconds = self.seconds + feature_seconds
        result.timings = {"features": feature_seconds, "estimators": self.clock.seconds,
                          "overhead": self.seconds - self.clock.seconds}
        if result.status == "trained" and result.bundle is not None and self._effects:
            began = perf_counter()
            try:
                result.effects = covariate_effects(result.bundle)
            except Exception as exc:  # a by-product: never fails the partition
                logger.warning("partition %s: covariate effects not measured: %s", result.partition_id, exc)
            spent = perf_counter() - began
            result.timings["overhead"] += spent
            result.fit_seconds += spent
        return result


def _history(periods: np.ndarray, y: np.ndarray, filled: np.ndarray, cfg: ProjectConfig) -> list[dict[str, Any]]:
    """The observed periods of the season before the test window (at most ``training.history_periods``)."""
    if not len(periods):
        return []
    tested_from = int(periods[-1]) - int(cfg.forecast.test_periods) + 1
    keep = np.flatnonzero((periods < tested_from) & ~filled & np.isfinite(y))
    keep = keep[len(keep) - min(max(int(cfg.season_length), 1), int(cfg.training.history_periods)):]
    return [{PERIOD: int(periods[i]), "actual": float(y[i])} for i in keep]


def _fit_partition(batch: _Batch, g: int, result: TrainResult,
                   clock: _Clock) -> Generator[dict[str, tuple[float, float]], str | None, None]:
    cfg, ff = batch.cfg, batch.ff
    f = cfg.forecast
    rows = ff.rows(g)
    periods, y, filled, X = ff.periods[rows], ff.y[rows], ff.filled[rows], ff.X[rows]
    y_obs = np.where(filled, np.nan, y)  # models learn from observed rows; filled ones only feed lags
    gm = batch.global_models
    pooled = gm is not None and "global" in cfg.training.candidates and "final" in gm.fits
    too_few = result.n_observed < int(f.min_periods)
    if too_few and not (pooled and result.n_observed >= 1):
        result.status = "skipped"
        result.reason = (f"{result.n_observed} observed periods, fewer than "
                         f"forecast.min_periods={f.min_periods}")
        return
    win = _windows(batch, g)
    residuals = _Residuals()
    cutoffs = {"validation": win.validation_start, "test": win.test_start, "final": np.iinfo(np.int64).max}

    views: dict[tuple[str, bool], Any] = {}

    def global_view(fit: str, autoregressive: bool = False) -> Any:
        """The partition's view of one global fit: its statistics before that fit's cut-off
        (made once per fit: the test view forecasts the test window and joins the test-fit
        ensemble; the final view is the model's member and the bundle's fallback)."""
        if gm is None or fit not in gm.fits or (autoregressive and not gm.has_autoregressive(fit)):
            return None
        if (fit, autoregressive) not in views:
            views[fit, autoregressive] = gm.view(fit, *partition_stats(ff, g, int(cutoffs[fit])),
                                                 autoregressive=autoregressive)
        return views[fit, autoregressive]

    def pooled_views(fit: str) -> dict[str, Any]:
        return {"global": global_view(fit), "global_ar": global_view(fit, autoregressive=True)}

    i_test = win.i_test
    test_y, test_filled = y[i_test:], filled[i_test:]
    test_steps = periods[i_test:] - (win.test_start - 1)
    fold_steps = [periods[lo:hi] - origin for lo, hi, origin in win.folds]
    # the global model's honest test-window forecast: for its metrics and its interval
    g_test = global_view("test")
    g_pred = None
    if g_test is not None and i_test < len(y):
        g_pred = _window_forecast(batch, g, g_test, clock, i_test, len(y), win.test_start - 1)
        result.global_metrics = _score(test_y, g_pred, test_filled)
        residuals.add("global", test_y, g_pred, test_filled, test_steps, test=True)
    g_val = global_view("validation")
    global_folds = None  # the global model's forecasts of the folds: its residuals and its candidate score
    if g_val is not None:
        global_folds = [_window_forecast(batch, g, g_val, clock, lo, hi, origin) for lo, hi, origin in win.folds]
        for (lo, hi, _), pred, steps in zip(win.folds, global_folds, fold_steps):
            residuals.add("global", y[lo:hi], pred, filled[lo:hi], steps)

    if win.short or too_few:
        reason = (f"{int((~filled[:i_test]).sum())} observed periods before the test window: too few for "
                  f"forecast.min_train_periods={f.min_train_periods} before a validation window of "
                  f"{f.validation_periods}: baseline only")
        if too_few:  # a new series: only the global model (pooled over all the others) can say much
            reason = (f"{result.n_observed} observed periods, fewer than forecast.min_periods="
                      f"{f.min_periods}: baseline only")
        _baseline_only(batch, g, result, clock, y_obs, reason, win, residuals, g_pred, global_view("final"))
        return

    # the autoregressive global model's forecasts of the same windows (made for the whole batch)
    ar_folds, ar_test = batch.autoregressive.get(g, (None, None))
    if ar_folds is not None and len(ar_folds) != len(win.folds):
        ar_folds = None
    pooled = {"global": (global_folds, g_pred), "global_ar": (ar_folds, ar_test)}

    metric = cfg.training.selection_metric
    names = [n for n in cfg.training.candidates if n not in pooled or pooled[n][0] is not None]
    fold_actual = np.concatenate([y[lo:hi] for lo, hi, _ in win.folds])
    fold_filled = np.concatenate([filled[lo:hi] for lo, hi, _ in win.folds])
    fold_preds: dict[str, np.ndarray] = {}
    for name in names:
        if name in pooled:
            parts = pooled[name][0]
        else:
            parts = [_window_forecast(batch, g, clock.fit(make_candidate(name, cfg, ff.spec), X[:lo], y_obs[:lo]),
                                      clock, lo, hi, origin) for lo, hi, origin in win.folds]
        fold_preds[name] = np.concatenate(parts) if parts else np.empty(0)
    # the test window's forecasts of every candidate join the evidence (training.select_on_test):
    # the most recent window says most about the next one, and 2 folds alone picked by chance
    on_test = bool(getattr(cfg.training, "select_on_test", True)) and i_test < len(y)
    test_preds: dict[str, np.ndarray] = {}
    if on_test:  # a pooled model without a test-window forecast cannot compete
        names = [n for n in names if n not in pooled or pooled[n][1] is not None]
        for name in names:
            if name in pooled:
                test_preds[name] = pooled[name][1]
            else:
                fitted = clock.fit(make_candidate(name, cfg, ff.spec), X[:i_test], y_obs[:i_test])
                test_preds[name] = _window_forecast(batch, g, fitted, clock, i_test, len(y), win.test_start - 1)
    ev_actual = np.concatenate((fold_actual, test_y)) if on_test else fold_actual
    ev_filled = np.concatenate((fold_filled, test_filled)) if on_test else fold_filled

    def evidence(name: str) -> np.ndarray:
        return np.concatenate((fold_preds[name], test_preds[name])) if on_test else fold_preds[name]

    key = _selection_key(metric)
    ev_level = _observed_level(ev_actual, ev_filled)
    scores = {n: _score_of(ev_actual, evidence(n), ev_filled, key, ev_level) for n in names}
    prior = yield {n: _fold_error(ev_actual, evidence(n), ev_filled, ev_level) for n in names}
    margin, ensemble = float(cfg.training.selection_margin), bool(cfg.training.ensemble)
    best, members, pair_score = _rule_choice(scores, lambda n: evidence(n), ev_actual, ev_filled, names, metric,
                                             prior, margin, ensemble, ev_level)
    if best == "ensemble":
        scores["ensemble"] = pair_score
        fold_preds["ensemble"] = (fold_preds[members[0]] + fold_preds[members[1]]) / 2.0
        if on_test:
            test_preds["ensemble"] = (test_preds[members[0]] + test_preds[members[1]]) / 2.0
    base_folds = fold_preds.get("baseline")
    if base_folds is None:
        base_folds = np.concatenate([_window_forecast(batch, g, MovingAverageBaseline().fit(None, y_obs[:lo]), clock,
                                                      lo, hi, origin) for lo, hi, origin in win.folds])
    all_fold_steps = np.concatenate(fold_steps)
    residuals.add("model", fold_actual, fold_preds[best], fold_filled, all_fold_steps)
    residuals.add("baseline", fold_actual, base_folds, fold_filled, all_fold_steps)

    if on_test:
        pred = test_preds[best]
    else:
        model = _fit_members(batch, members, X[:i_test], y_obs[:i_test], clock, pooled_views("test"))
        pred = _window_forecast(batch, g, model, clock, i_test, len(y), win.test_start - 1)
    base = clock.fit(MovingAverageBaseline(), None, y_obs[:i_test])
    base_pred = np.minimum(clock.predict(base, len(y) - i_test), _ceiling(batch, g, i_test))
    result.metrics = _score(test_y, pred, test_filled)
    result.baseline_metrics = _score(test_y, base_pred, test_filled)
    result.candidate_scores = scores
    residuals.add("model", test_y, pred, test_filled, test_steps, test=True)
    residuals.add("baseline", test_y, base_pred, test_filled, test_steps, test=True)
    # every backtest window at once (folds and test): the steadier evidence the scoring chain's
    # "unpromoted" step reads (does the model beat its own baseline?)
    all_actual = np.concatenate((fold_actual, test_y))
    all_filled = np.concatenate((fold_filled, test_filled))
    all_level = _observed_level(all_actual, all_filled)
    # and robustly (errors capped at the series' outlier scale): the scoring chain's comparisons
    for prefix, preds in (("", np.concatenate((fold_preds[best], pred))),
                          ("baseline_", np.concatenate((base_folds, base_pred))),
                          ("global_", np.concatenate((*global_folds, g_pred))
                           if global_folds is not None and g_pred is not None else None)):
        if preds is None:
            continue
        scored = _score(all_actual, preds, all_filled, all_level)
        result.metrics[f"{prefix}backtest_wape"] = scored["wape"]
        result.metrics[f"{prefix}robust_backtest_wape"] = scored["robust_wape"]

    final = _fit_members(batch, members, X, y_obs, clock, pooled_views("final"))
    final_base = clock.fit(MovingAverageBaseline(), None, y_obs)
    result.status, result.model_name = "trained", best
    result.bundle = _bundle(batch, g, best, final, final_base, result.metrics,
                            periods[i_test:], y[i_test:], pred, base_pred, g_pred)
    _finish_bundle(result, residuals, global_view("final"))


def _rule_choice(scores: Mapping[str, float], evidence: Any, actual: np.ndarray, filled: np.ndarray,
                 names: list[str], metric: str, prior: str | None, margin: float,
                 ensemble: bool, level: float | None = None) -> tuple[str, tuple[str, ...], float]:
    """The choice rule on one body of evidence: ``(name, members, score of the chosen pair)``.

    With ``ensemble``: the mean of the two best, or of the best local model with a global one
    (whichever the evidence prefers), answers: on data we had not tuned on, the mean of the two
    best beat the single best on 5 of 7 real sets (docs/performance.md), where a winner picked on
    36-50 points is often the luckiest rather than the best. Else the best (the batch's favourite
    unless the partition's own best beats it by the margin).
    """
    best, members = choose(scores, names, metric, prior, margin)
    if not ensemble:
        return best, members, float("nan")
    key = _selection_key(metric)
    pairs = [(_score_of(actual, (evidence(a) + evidence(b)) / 2.0, filled, key, level), (a, b))
             for a, b in _ensemble_pairs(scores, names, metric)]
    pairs = [(score, pair) for score, pair in pairs if np.isfinite(selection_key(score, metric))]
    if not pairs:
        return best, members, float("nan")
    score, pair = min(pairs, key=lambda item: selection_key(item[0], metric))
    return "ensemble", pair, score


def _fit_members(batch: _Batch, members: tuple[str, ...], X: np.ndarray, y_obs: np.ndarray, clock: _Clock,
                 views: Mapping[str, Any]) -> Any:
    """The chosen candidate (or the ensemble of two) fitted on the given rows; the pooled ones
    (``global``, ``global_ar``) are the partition's views of the run's fit."""
    fitted = []
    for name in members:
        if name in views:
            fitted.append(views[name])
        else:
            fitted.append(clock.fit(make_candidate(name, batch.cfg, batch.ff.spec), X, y_obs))
    if len(fitted) == 1:
        return fitted[0]
    ensemble = AverageForecaster(members=tuple(fitted), names=tuple(members))
    ensemble.members_ = tuple(fitted)
    return ensemble


def _finish_bundle(result: TrainResult, residuals: _Residuals, view: Any) -> None:
    """Attach the global view; keep the backtest residuals for the batch's interval calibration
    (:func:`_set_intervals`, once every partition of the batch has its model)."""
    result.residuals = residuals
    if view is not None:
        result.bundle.global_view = view  # pickles without the model itself (see GlobalView)


def _set_intervals(results: list[TrainResult], cfg: Any) -> None:
    """Every bundle's interval offsets and step profile, calibrated over the batch
    (:func:`shared.models.selection.calibrated_intervals`)."""
    level = float(cfg.forecast.interval_level)
    done = [r for r in results if r.bundle is not None and r.residuals is not None]
    if not done:
        return
    residuals = [r.residuals for r in done]
    profile = step_profile(residuals, int(cfg.forecast.horizon))
    for result, offsets in zip(done, calibrated_intervals(residuals, level, profile)):
        result.bundle.interval_level = level
        result.bundle.intervals = offsets
        result.bundle.interval_profile = profile
        result.residuals = None


def _baseline_only(batch: _Batch, g: int, result: TrainResult, clock: _Clock, y_obs: np.ndarray,
                   reason: str, win: "Windows", residuals: "_Residuals", g_pred: np.ndarray | None,
                   view: Any) -> None:
    """Too short for the ML candidates: score the baseline on the last periods it can spare."""
    ff = batch.ff
    rows = ff.rows(g)
    periods, y, filled = ff.periods[rows], ff.y[rows], ff.filled[rows]
    i_test = win.i_test
    base = clock.fit(MovingAverageBaseline(), None, y_obs[:i_test])
    pred = clock.predict(base, len(y) - i_test)
    result.metrics = _score(y[i_test:], pred, filled[i_test:])
    result.baseline_metrics = dict(result.metrics)
    test_steps = periods[i_test:] - (win.test_start - 1)
    residuals.add("baseline", y[i_test:], pred, filled[i_test:], test_steps, test=True)
    final = clock.fit(MovingAverageBaseline(), None, y_obs)
    if (view is not None and g_pred is not None and len(g_pred) == len(y) - i_test
            and "global" in batch.cfg.training.candidates):
        # too short for models of its own, not for the global model (pooled over every partition):
        # that is its model, scored on the same window, and promoted or not by the same rule
        result.metrics = _score(y[i_test:], g_pred, filled[i_test:])
        residuals.add("model", y[i_test:], g_pred, filled[i_test:], test_steps, test=True)
        result.status, result.model_name = "trained", "global"
        result.reason = reason.replace("baseline only", "the global model is its model")
        result.bundle = _bundle(batch, g, "global", view, final, result.metrics,
                                periods[i_test:], y[i_test:], g_pred, pred, g_pred)
    else:
        residuals.add("model", y[i_test:], pred, filled[i_test:], test_steps, test=True)
        result.status, result.reason, result.model_name = "baseline_only", reason, "baseline"
        result.bundle = _bundle(batch, g, "baseline", final, final, result.metrics,
                                periods[i_test:], y[i_test:], pred, pred, g_pred)
    _finish_bundle(result, residuals, view)


def _window_forecast(batch: _Batch, g: int, est: Any, clock: _Clock, lo: int, hi: int,
                     origin: int) -> np.ndarray:
    """Forecast rows lo:hi of partition g from ``origin`` (the period before the window), bounded
    as served forecasts are (:func:`shared.models.metrics.forecast_ceiling` of the history before it)."""
    if hi <= lo:
        return np.empty(0)
    ff = batch.ff
    rows = ff.rows(g)
    ceiling = _ceiling(batch, g, lo)
    if isinstance(est, MovingAverageBaseline):
        return np.minimum(clock.predict(est, hi - lo), ceiling)
    periods = ff.periods[rows]
    if getattr(est, "position_only", False) or (periods[hi - 1] - origin <= ff.spec.horizon
                                                 and not uses_history(est)):
        # every lag reads history (or the model reads none, only each row's position): the batch
        # features hold, and the forecast is the one the recursion would make
        return np.minimum(clock.predict(est, ff.X[rows][lo:hi]), ceiling)
    t = perf_counter()
    out = recursive_forecast(est, ff.spec, int(ff.trend_origin[g]), ff.log_covariates[g],
                             periods[:lo], ff.y[rows][:lo], batch.cov[rows][:lo],
                             origin, periods[lo:hi], batch.cov[rows][lo:hi], ceiling=ceiling)
    clock.seconds += perf_counter() - t
    return out


def _windows(batch: _Batch, g: int) -> Windows:
    """Partition g's test window and folds (memoised per batch: the autoregressive backtests and
    the partition's own job both need them)."""
    if g not in batch.windows:
        rows = batch.ff.rows(g)
        batch.windows[g] = partition_windows(batch.ff.periods[rows], batch.ff.filled[rows], batch.cfg)
    return batch.windows[g]


def _ceiling(batch: _Batch, g: int, lo: int) -> float:
    """The forecast ceiling of partition g's observed history before row lo (memoised per batch)."""
    key = (g, lo)
    if key not in batch.ceilings:
        rows = batch.ff.rows(g)
        y, filled = batch.ff.y[rows][:lo], batch.ff.filled[rows][:lo]
        batch.ceilings[key] = forecast_ceiling(y[~filled])
    return batch.ceilings[key]


def _score(actual: np.ndarray, pred: np.ndarray, filled: np.ndarray,
           level: float | None = None) -> dict[str, float]:
    """Metrics over observed rows (all rows if the window holds only filled ones), with the
    outlier-robust WAPE beside them.

    ``level``: :func:`_observed_level` of the same ``actual`` and ``filled``, when the caller scores
    many forecasts of one window (the median it holds is then taken once, not per candidate).
    """
    mask = ~filled
    if mask.any():
        actual, pred = actual[mask], pred[mask]
    if level is not None and np.isnan(pred).any():
        level = None  # a missing forecast leaves its actual out of the level too: as robust_wape does
    return {**evaluate(actual, pred), "robust_wape": robust_wape(actual, pred, level)}


def _score_of(actual: np.ndarray, pred: np.ndarray, filled: np.ndarray, key: str,
              level: float | None = None) -> float:
    """``_score(...)[key]``, computing only that metric when it is the robust WAPE (the choice
    compares dozens of forecasts per partition on it alone)."""
    if key != "robust_wape":
        return _score(actual, pred, filled, level)[key]
    mask = ~filled
    if mask.any():
        actual, pred = actual[mask], pred[mask]
    if level is not None and np.isnan(pred).any():
        level = None
    return robust_wape(actual, pred, level)


def _observed_level(actual: np.ndarray, filled: np.ndarray) -> float:
    """The typical level :func:`_score` caps errors at, for forecasts without missing values."""
    mask = ~filled
    return typical_level(actual[mask] if mask.any() else actual)


def _selection_key(metric: str) -> str:
    """The score candidates compete on: WAPE is read robustly (one outlier in a fold must not pick
    the model); MAPE and RMSE as they are."""
    return "robust_wape" if metric == "wape" else metric


def _ensemble_pairs(scores: Mapping[str, float], names: list[str], metric: str) -> list[tuple[str, str]]:
    """The combinations worth a try: the two best candidates, and the best local one with each
    pooled model (``global``, ``global_ar``)."""
    ranked = [n for n in sorted(names, key=lambda n: (selection_key(scores[n], metric), names.index(n)))
              if np.isfinite(selection_key(scores[n], metric))]
    pairs = [(ranked[0], ranked[1])] if len(ranked) >= 2 else []
    pooled_names = pooled_candidates()
    local = [n for n in ranked if n not in pooled_names]
    for pooled in pooled_names:
        if pooled in ranked and local and {local[0], pooled} not in [set(p) for p in pairs]:
            pairs.append((local[0], pooled))
    return pairs


def _bundle(batch: _Batch, g: int, name: str, estimator: Any, baseline: MovingAverageBaseline,
            metrics: dict[str, float], bt_periods: np.ndarray, bt_actual: np.ndarray, bt_pred: np.ndarray,
            bt_base: np.ndarray, bt_global: np.ndarray | None = None) -> ForecastBundle:
    ff, cfg = batch.ff, batch.cfg
    rows = ff.rows(g)
    periods = ff.periods[rows]
    last = int(periods[-1])
    tail = slice(int(np.searchsorted(periods, last - ff.spec.lookback + 1)), len(periods))
    backtest = {PERIOD: np.asarray(bt_periods, dtype=np.int64).copy(),
                "actual": np.asarray(bt_actual, dtype=np.float64).copy(),
                "prediction": np.asarray(bt_pred, dtype=np.float64).copy(),
                "baseline": np.asarray(bt_base, dtype=np.float64).copy()}
    if bt_global is not None and len(bt_global) == len(bt_periods):
        backtest["global"] = np.asarray(bt_global, dtype=np.float64).copy()
    return ForecastBundle(
        partition_id=str(ff.partition_ids[g]), keys=batch.keys[g], model_name=name, estimator=estimator,
        baseline=baseline, spec=ff.spec, trend_origin=int(ff.trend_origin[g]),
        log_covariates=tuple(bool(v) for v in ff.log_covariates[g]),
        history_periods=periods[tail].copy(), history_target=ff.y[rows][tail].copy(),
        history_covariates=batch.cov[rows][tail].copy(), last_period=last, freq=cfg.data.freq,
        anchor=_anchor_of(batch, g), time_column=cfg.data.time, metrics=dict(metrics),
        backtest_arrays=backtest, ceiling=_ceiling(batch, g, len(periods)),
    )


# -- summaries for reports and benchmarks ---------------------------------------------------------

def time_breakdown(results: Iterable[TrainResult]) -> dict[str, float]:
    """Where training time went: shared feature preparation, the estimators' own calls, the rest."""
    results = list(results)
    n = len(results)
    total = {k: sum(r.timings.get(k, 0.0) for r in results) for k in ("features", "estimators", "overhead")}
    out: dict[str, float] = {"partitions": n, "total_seconds": sum(r.fit_seconds for r in results)}
    for k, v in total.items():
        out[f"{k}_seconds"] = v
        out[f"{k}_ms_per_partition"] = 1000.0 * v / n if n else 0.0
    return out


def backtest_summary(results: Iterable[TrainResult]) -> dict[str, Any]:
    """Pooled test-window metrics of the chosen models and of the baseline, over all bundles."""
    frames = [r.bundle.backtest_arrays for r in results
              if r.bundle is not None and len(r.bundle.backtest_arrays.get("actual", ()))]
    if not frames:
        nan = dict.fromkeys(("wape", "mape", "rmse", "accuracy"), float("nan"))
        return {"partitions": 0, "model": nan, "baseline": dict(nan)}
    actual = np.concatenate([f["actual"] for f in frames])
    return {
        "partitions": len(frames),
        "model": evaluate(actual, np.concatenate([f["prediction"] for f in frames])),
        "baseline": evaluate(actual, np.concatenate([f["baseline"] for f in frames])),
    }
