"""A result store as a forecaster meets it, written through the store's own upserts (no training).

Series ``i`` (keys store=S{i % 4}, item=i{i:03d}) in run ``r1``:
- i % 10 == 7: training failed -> served by the global model;
- i % 10 == 9: training skipped -> the baseline (the last one is not forecast at all);
- otherwise trained, test-window WAPE (i + 1) / 100 against a baseline's 0.25, the model cycling
  gbm / ets / ensemble: WAPE <= 0.10 promoted to production; up to 0.25 rejected, then served
  unpromoted (even i) or by the global model (odd i); above 0.25 lost to the baseline.
Weekly data: actuals for 60 weeks, the test window the last 8 of them, 4 weeks forecast after.
Trained gbm series carry a price elasticity and a promotion lift.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shared.results.result_store import ResultStore

DATES = pd.date_range("2023-01-01", periods=64, freq="W")
HISTORY, TEST, FUTURE = DATES[:52], DATES[52:60], DATES[60:]
BASELINE_WAPE = 0.25


@dataclass
class Expected:
    ids: list[str] = field(default_factory=list)  # every series, by partition id
    items: dict[str, str] = field(default_factory=dict)  # partition id -> item key
    source: dict[str, str] = field(default_factory=dict)  # partition id -> serving source
    wape: dict[str, float] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)  # the model training chose
    effects: dict[str, tuple[float, float]] = field(default_factory=dict)  # elasticity, lift


def plan(n: int) -> Expected:
    out = Expected()
    for i in range(n):
        pid = f"p{i:03d}"
        out.ids.append(pid)
        out.items[pid] = f"i{i:03d}"
        if i % 10 == 7:
            out.source[pid] = "global"
            continue
        if i % 10 == 9:
            if i != n - 1:
                out.source[pid] = "baseline"
            continue
        wape = (i + 1) / 100
        out.wape[pid], out.model[pid] = wape, ("gbm", "ets", "ensemble")[i % 3]
        if wape <= 0.10:
            out.source[pid] = "production"
        elif wape < BASELINE_WAPE:
            out.source[pid] = "unpromoted" if i % 2 == 0 else "global"
        else:
            out.source[pid] = "baseline"
        if out.model[pid] == "gbm":
            out.effects[pid] = (-1.0 - i / 100, 0.1 + i / 200)
    return out


def fill_forecaster_store(store: ResultStore, n: int = 40, actuals: bool = True, effects: bool = True) -> Expected:
    """Write ``n`` series into ``store`` (see the module docstring) and return what the report should say."""
    exp = plan(n)
    metrics, decisions, backtests, predictions, history, effect_rows = [], [], [], [], [], []
    for i, pid in enumerate(exp.ids):
        keys = {"store": f"S{i % 4}", "item": exp.items[pid]}
        wape = exp.wape.get(pid)
        status = "trained" if wape is not None else ("failed" if i % 10 == 7 else "skipped")
        metrics.append({"partition_id": pid, "keys": keys, "run_id": "r1", "status": status,
                        "model": exp.model.get(pid), "model_version": 1 if wape else None,
                        "reason": {"failed": "ValueError: boom", "skipped": "only 3 observed periods < 4"}.get(status, ""),
                        "wape": wape, "accuracy": None if wape is None else 1 - wape,
                        "baseline_wape": BASELINE_WAPE if wape is not None else None, "n_observed": 60})
        level = 10.0 + i
        if wape is not None:
            promoted = exp.source[pid] == "production"
            decisions.append({"partition_id": pid, "keys": keys, "run_id": "r1",
                              "decision": "promoted" if promoted else "rejected",
                              "reason": f"wape {wape:.2f} {'<=' if promoted else '>'} 0.10",
                              "metric": "wape", "value": wape, "threshold": 0.10})
            backtests.append(pd.DataFrame({"partition_id": pid, **keys, "run_id": "r1", "date": TEST,
                                           "actual": level, "prediction": level * (1 + wape), "baseline": level * 1.25}))
        if pid in exp.source:
            source = exp.source[pid]
            model = {"global": "global", "baseline": "baseline"}.get(source, exp.model.get(pid))
            predictions.append(pd.DataFrame({"partition_id": pid, **keys, "run_id": "r1", "date": FUTURE,
                                             "prediction": level, "model": model, "model_version": 1,
                                             "is_fallback": int(source != "production"), "source": source,
                                             "score_id": "s1"}))
        history.append(pd.DataFrame({"partition_id": pid, **keys, "run_id": "r1", "date": DATES[:60],
                                     "actual": level + 3 * np.sin(np.arange(60) / 52 * 2 * np.pi)}))
        if pid in exp.effects:
            elasticity, lift = exp.effects[pid]
            effect_rows += [{"partition_id": pid, "keys": keys, "run_id": "r1", "model": "gbm", "covariate": "price",
                             "measure": "elasticity", "value": elasticity},
                            {"partition_id": pid, "keys": keys, "run_id": "r1", "model": "gbm", "covariate": "promo",
                             "measure": "lift", "value": lift}]
    store.upsert_metrics(metrics)
    store.upsert_promotions(decisions)
    store.upsert_backtests(pd.concat(backtests))
    store.upsert_predictions(pd.concat(predictions))
    if actuals and hasattr(store, "upsert_actuals"):  # stores of releases before the table have none
        store.upsert_actuals(pd.concat(history))
    if effects and hasattr(store, "upsert_effects"):
        store.upsert_effects(effect_rows)
    store.record_run("r1", "train", time.time() - 60, 42.0, {"trained": len(exp.wape)})
    return exp
