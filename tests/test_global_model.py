"""The global model, the newer candidates, prediction intervals and the scoring chain."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.models.features import build_features
from shared.models.global_model import GLOBAL_ID, GlobalModelError, GlobalView, fit_global
from shared.keys import PARTITION_ID
from shared.registries.registry import ModelRegistry
from shared.forecasts.scoring import beats_baseline, horizon_requests, score_frame
from shared.data.synthetic import generate_panel
from shared.data.timegrid import PERIOD
from shared.models.selection import conformal_offsets, global_cuts
from shared.models.training import train_batch
from shared.data.validation import validate

HOLDOUT = 12


@pytest.fixture(scope="module")
def cfg() -> ProjectConfig:
    return ProjectConfig()


@pytest.fixture(scope="module")
def split(cfg):
    raw = next(generate_panel(partitions=24, periods=120, seed=5))
    raw = raw.sort_values(["store", "item", "date"])
    rank = raw.groupby(["store", "item"]).cumcount(ascending=False)
    train, hold = raw[rank >= HOLDOUT], raw[rank < HOLDOUT]
    frame, _ = validate(train, cfg)
    return frame, hold


@pytest.fixture(scope="module")
def trained(cfg, split):
    frame, _ = split
    ff = build_features(frame, cfg)
    models = fit_global([ff], [global_cuts(ff, cfg)], "rg", cfg.training.global_max_rows)
    return models, {r.partition_id: r for r in train_batch(frame, cfg, global_models=models)}


def test_the_global_model_is_fitted_three_times_on_growing_rows(trained):
    models, _ = trained
    assert set(models.fits) == {"validation", "test", "final"}
    assert models.rows["validation"] < models.rows["test"] < models.rows["final"]


def test_a_view_pickles_without_the_model_and_predicts_once_bound(trained):
    models, results = trained
    bundle = next(r.bundle for r in results.values() if r.bundle is not None and r.bundle.global_view is not None)
    restored = pickle.loads(pickle.dumps(bundle))
    assert getattr(restored.global_view, "model_", None) is None
    assert len(pickle.dumps(bundle)) < 200_000  # the global model is not inside every bundle
    with pytest.raises(GlobalModelError, match="global model of run rg"):
        restored.predict(horizon=3, source="global")
    restored.bind_global(models.fits["final"])
    expected = bundle.predict(horizon=3, source="global")
    pd.testing.assert_frame_equal(restored.predict(horizon=3, source="global"), expected)


def test_candidates_compete_over_folds_and_every_bundle_carries_intervals(trained):
    _, results = trained
    chosen = {r.model_name for r in results.values() if r.status == "trained"}
    assert chosen <= {"baseline", "naive", "snaive", "theta", "loglinear", "loglm", "global", "global_ar", "ensemble"}
    for r in results.values():
        if r.status == "trained":
            assert {"baseline", "loglinear", "loglm", "global"} <= set(r.candidate_scores)
            assert r.global_metrics and "backtest_wape" in r.metrics
            assert set(r.bundle.intervals) >= {"model", "baseline", "global"}
            lo, hi = r.bundle.intervals["model"]
            assert lo <= 0.0 <= hi


def test_intervals_widen_beyond_the_horizon_and_contain_the_forecast(trained):
    _, results = trained
    bundle = next(r.bundle for r in results.values() if r.status == "trained")
    out = bundle.predict(horizon=24)
    assert (out["lower"] <= out["prediction"]).all() and (out["prediction"] <= out["upper"]).all()
    log_width = np.log1p(out["upper"]) - np.log1p(out["lower"])
    assert log_width.iloc[-1] > log_width.iloc[0]


def test_eighty_percent_intervals_cover_most_but_not_all_held_out_rows(trained, split, cfg):
    _, results = trained
    _, hold = split
    frame = hold.assign(**{PARTITION_ID: None})
    inside = total = 0
    from shared.keys import partition_ids

    frame[PARTITION_ID] = partition_ids(hold, cfg.data.keys).to_numpy()
    for pid, rows in frame.groupby(PARTITION_ID):
        r = results.get(pid)
        if r is None or r.bundle is None:  # a late starter wholly inside the hold-out
            continue
        out = r.bundle.predict(future=rows[["date", "price", "promo"]].reset_index(drop=True))
        actual = rows.sort_values("date")["sales"].to_numpy()
        inside += int(((out["lower"].to_numpy() <= actual) & (actual <= out["upper"].to_numpy())).sum())
        total += len(actual)
    coverage = inside / total
    assert 0.65 <= coverage <= 0.97, coverage


def test_conformal_offsets_bracket_zero_and_widen_with_few_residuals():
    rng = np.random.default_rng(0)
    many = conformal_offsets(rng.normal(0, 0.1, 400), 0.8)
    few = conformal_offsets(rng.normal(0, 0.1, 5), 0.8)
    assert many[0] < 0 < many[1]
    assert many[0] == pytest.approx(-0.128, abs=0.03) and many[1] == pytest.approx(0.128, abs=0.03)
    assert few[1] - few[0] > 0


def test_a_view_needs_its_model():
    with pytest.raises(GlobalModelError):
        GlobalView(run_id="r0", scale=2.0, centres=np.zeros(0)).predict(np.zeros((1, 3)))


@pytest.fixture()
def registries(tmp_path, trained, cfg, split):
    """A dev registry holding the run (bundles + global model) and an empty production one."""
    models, results = trained
    dev, prod = ModelRegistry(tmp_path / "dev", "dev"), ModelRegistry(tmp_path / "prod", "prod")
    items = []
    for r in results.values():
        if r.bundle is None:
            continue
        row = {**r.to_row(), "run_id": "rg"}
        row["metrics"] = {**row["metrics"], "baseline_wape": r.baseline_metrics.get("wape")}
        items.append((row, pickle.dumps(r.bundle)))
    items.append(({PARTITION_ID: GLOBAL_ID, "run_id": "rg", "model_type": "global", "status": "trained"},
                  pickle.dumps(models.fits["final"])))
    dev.register_many(items)
    return dev, prod, results


def test_the_chain_answers_every_partition_and_names_the_source(registries, cfg, split):
    dev, prod, results = registries
    frame, _ = split
    manifest = frame.groupby(PARTITION_ID).agg(**{k: (k, "first") for k in cfg.data.keys},
                                                last_period=(PERIOD, "max")).reset_index()
    requests = horizon_requests(manifest, cfg)
    predictions, statuses = score_frame(requests, cfg, prod, dev)
    assert set(predictions["source"]) <= {"unpromoted", "global", "baseline"}
    assert (predictions["is_fallback"] == 1).all()
    assert {s["status"] for s in statuses} == {"fallback"}
    by_pid = predictions.groupby(PARTITION_ID)["source"].first()
    for pid, source in by_pid.items():
        record = dev.latest(pid)
        assert (source == "unpromoted") == beats_baseline(record)
        if source == "global":
            assert predictions.loc[predictions[PARTITION_ID] == pid, "model"].eq("global").all()
    assert predictions[["lower", "upper"]].notna().all().all()


def test_a_chain_without_global_skips_it_and_the_listing_hides_the_global_model(registries, cfg, split):
    dev, prod, _ = registries
    frame, _ = split
    manifest = frame.groupby(PARTITION_ID).agg(**{k: (k, "first") for k in cfg.data.keys},
                                                last_period=(PERIOD, "max")).reset_index()
    predictions, _ = score_frame(horizon_requests(manifest, cfg), cfg, prod, dev, ["production", "baseline"])
    assert set(predictions["source"]) == {"baseline"}
    assert GLOBAL_ID not in {r.partition_id for r in dev.find()}
    assert GLOBAL_ID in {r.partition_id for r in dev.find(include_global=True)}


def test_a_latest_chain_scores_every_trained_model_alone_whatever_its_backtests(registries, cfg, split):
    dev, prod, results = registries
    frame, _ = split
    loser = next(pid for pid, r in results.items() if r.status == "trained")
    worse = {**results[loser].to_row(), "run_id": "rg2"}
    worse["metrics"] = {**worse["metrics"], "backtest_wape": 9.0, "baseline_backtest_wape": 1.0,
                        "robust_backtest_wape": 9.0, "baseline_robust_backtest_wape": 1.0}
    dev.register_many([(worse, pickle.dumps(results[loser].bundle))])
    manifest = frame.groupby(PARTITION_ID).agg(**{k: (k, "first") for k in cfg.data.keys},
                                                last_period=(PERIOD, "max")).reset_index()
    requests = horizon_requests(manifest, cfg)
    alone, _ = score_frame(requests, cfg, prod, dev, ["latest", "baseline"])
    chained, _ = score_frame(requests, cfg, prod, dev, ["unpromoted", "baseline"])
    assert set(alone["source"]) == {"latest"}
    assert set(alone.loc[alone[PARTITION_ID] == loser, "run_id"]) == {"rg2"}
    assert set(chained.loc[chained[PARTITION_ID] == loser, "source"]) == {"baseline"}


def test_a_series_too_short_for_its_own_candidates_gets_the_global_model_as_its_model(cfg):
    raw = next(generate_panel(partitions=6, periods=120, seed=9)).sort_values(["store", "item", "date"])
    first = raw.groupby(["store", "item"]).ngroup() == 0
    raw = raw[~first | (raw.groupby(["store", "item"]).cumcount(ascending=False) < 40)]  # one series of 40
    frame, _ = validate(raw, cfg)
    ff = build_features(frame, cfg)
    models = fit_global([ff], [global_cuts(ff, cfg)], "rs", cfg.training.global_max_rows)
    results = train_batch(frame, cfg, global_models=models)
    short = [r for r in results if r.n_observed == 40]
    assert len(short) == 1 and short[0].status == "trained" and short[0].model_name == "global"
    assert "global model is its model" in short[0].reason
    assert short[0].metrics["wape"] == pytest.approx(short[0].global_metrics["wape"])
    assert short[0].bundle.predict(horizon=3)["prediction"].notna().all()
    without = train_batch(frame, cfg.with_overrides({"training.candidates": ["baseline", "loglinear"]}),
                          global_models=models)
    assert next(r for r in without if r.n_observed == 40).status == "baseline_only"


def test_a_new_series_with_a_couple_of_rows_is_forecast_by_the_global_model_not_skipped(cfg):
    raw = next(generate_panel(partitions=5, periods=110, seed=4)).sort_values(["store", "item", "date"])
    first = raw.groupby(["store", "item"]).ngroup() == 0
    raw = raw[~first | (raw.groupby(["store", "item"]).cumcount(ascending=False) < 2)]  # two rows
    frame, _ = validate(raw, cfg)
    ff = build_features(frame, cfg)
    models = fit_global([ff], [global_cuts(ff, cfg)], "rn", cfg.training.global_max_rows)
    new = next(r for r in train_batch(frame, cfg, global_models=models) if r.n_observed == 2)
    assert new.status == "trained" and new.model_name == "global", new.reason
    assert "fewer than forecast.min_periods" in new.reason
    forecast = new.bundle.predict(horizon=4)
    assert len(forecast) == 4 and (forecast["prediction"] >= 0).all()
    alone = next(r for r in train_batch(frame, cfg) if r.n_observed == 2)  # no global model: skipped
    assert alone.status == "skipped"


def test_at_scale_the_global_model_reads_a_seeded_set_of_partitions_then_samples_periods():
    from shared.models.global_model import OVERSAMPLE, global_sample

    ids = [f"p{i:04d}" for i in range(1000)]
    rows = [4000] * 1000
    assert global_sample(ids, [10] * 1000, 100_000) == (None, 1.0)  # small: everything
    assert global_sample(ids, [150] * 1000, 100_000) == (None, pytest.approx(100_000 / 150_000))
    chosen, share = global_sample(ids, rows, 100_000, seed=3)
    assert 4000 * len(chosen) >= OVERSAMPLE * 100_000 > 4000 * (len(chosen) - 1)
    assert share == pytest.approx(100_000 / (4000 * len(chosen)))
    again, _ = global_sample(list(reversed(ids)), rows, 100_000, seed=3)
    assert again == chosen  # the ids and the seed decide, not the order
    assert global_sample(ids, rows, 100_000, seed=4)[0] != chosen


def test_the_global_model_does_not_answer_where_its_backtests_lost_to_the_baseline(registries, cfg, split):
    dev, prod, results = registries
    frame, _ = split
    pid = next(p for p, r in results.items() if r.status == "trained")
    worse = {**results[pid].to_row(), "run_id": "rg3"}
    worse["metrics"] = {**worse["metrics"], "backtest_wape": 9.0, "baseline_backtest_wape": 1.0,
                        "global_backtest_wape": 5.0, "robust_backtest_wape": 9.0,
                        "baseline_robust_backtest_wape": 1.0, "global_robust_backtest_wape": 5.0}
    dev.register_many([(worse, pickle.dumps(results[pid].bundle))])
    manifest = frame.groupby(PARTITION_ID).agg(**{k: (k, "first") for k in cfg.data.keys},
                                                last_period=(PERIOD, "max")).reset_index()
    predictions, _ = score_frame(horizon_requests(manifest, cfg), cfg, prod, dev)
    assert set(predictions.loc[predictions[PARTITION_ID] == pid, "source"]) == {"baseline"}
    better = {**worse, "run_id": "rg4", "metrics": {**worse["metrics"], "global_backtest_wape": 0.5,
                                                    "global_robust_backtest_wape": 0.5}}
    dev.register_many([(better, pickle.dumps(results[pid].bundle))])
    predictions, _ = score_frame(horizon_requests(manifest, cfg), cfg, prod, dev)
    assert set(predictions.loc[predictions[PARTITION_ID] == pid, "source"]) == {"global"}
