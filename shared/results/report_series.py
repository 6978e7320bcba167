"""Every series in one row: what serves it, how well, and why (the forecaster's table).

A forecaster asks of each series "what answers for it, and why that and not its own model?".
The answer is already in the store, spread over three tables: ``model_metrics`` (the model the
run chose, its status and reason, its test-window WAPE against the baseline's), ``promotions``
(the decision and its reason) and ``predictions`` (the scoring chain's ``source``). This module
joins them per series and says it in words; it never queries (:mod:`shared.results.report_data` reads).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from shared.keys import PARTITION_ID

SERIES_COLUMNS = ("source", "served_model", "model", "model_version", "status", "reason", "wape",
                  "baseline_wape", "accuracy", "n_observed", "decision", "promotion_reason", "why")


def served_by(served: pd.DataFrame) -> pd.DataFrame:
    """One row per partition: the source and model of its newest forecast.

    ``served`` is grouped predictions (partition, keys, source, is_fallback, model, run_id, scored_at, n).
    Rows of stores written before ``source`` existed name it from ``is_fallback``.
    """
    if served.empty:
        return pd.DataFrame(columns=[PARTITION_ID, "source", "served_model", "run_id", "n"])
    fallback = pd.to_numeric(served["is_fallback"], errors="coerce").fillna(0).astype(int)
    out = served.assign(source=served["source"].where(served["source"].notna(),
                                                      np.where(fallback == 1, "baseline", "production")),
                        _at=served["scored_at"].astype(str), _n=pd.to_numeric(served["n"], errors="coerce"))
    out = out.sort_values([PARTITION_ID, "_at", "_n"], ascending=[True, False, False], kind="stable")
    out = out.drop_duplicates(PARTITION_ID).rename(columns={"model": "served_model"})
    return out.drop(columns=["_at", "_n", "is_fallback", "scored_at"]).reset_index(drop=True)


def build_series(metrics: pd.DataFrame, promotions: pd.DataFrame, served: pd.DataFrame,
                 keys: Sequence[str]) -> pd.DataFrame:
    """Every series of the run or of the stored forecasts, worst test-window WAPE first, with ``why``."""
    keys = list(keys)
    parts = []
    if not metrics.empty:
        parts.append(metrics[[PARTITION_ID, *keys, "model", "model_version", "status", "reason", "wape",
                              "baseline_wape", "accuracy", "n_observed"]])
    frame = parts[0].copy() if parts else pd.DataFrame(columns=[PARTITION_ID, *keys])
    if not promotions.empty:
        decided = promotions[[PARTITION_ID, "decision", "reason"]].rename(columns={"reason": "promotion_reason"})
        frame = frame.merge(decided.drop_duplicates(PARTITION_ID, keep="last"), on=PARTITION_ID, how="left")
    if not served.empty:
        frame = frame.merge(served, on=PARTITION_ID, how="outer", suffixes=("", "_served"))
        for k in keys:  # series forecast but not in this run take their keys from the predictions
            if f"{k}_served" in frame.columns:
                frame[k] = frame[k].where(frame[k].notna(), frame[f"{k}_served"])
                frame = frame.drop(columns=f"{k}_served")
    for col in SERIES_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    for col in ("wape", "baseline_wape", "accuracy", "n_observed", "model_version"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    records = frame.to_dict("records")
    frame["why"] = [why(r) for r in records]
    frame = frame.sort_values(["wape", PARTITION_ID], ascending=[False, True], na_position="last", kind="stable")
    return frame[[PARTITION_ID, *keys, *SERIES_COLUMNS]].reset_index(drop=True)


def model_wins(series: pd.DataFrame) -> pd.DataFrame:
    """Per model: series it won in training (chosen among the candidates), series it serves, and the
    median test-window WAPE of the series it won."""
    if series.empty:
        return pd.DataFrame(columns=["model", "won", "serving", "median_wape"])
    trained = series[series["status"].isin(["trained", "baseline_only"]) & series["model"].notna()]
    won = trained.groupby("model")[PARTITION_ID].size().rename("won").to_frame()
    won = won.join(trained[trained["wape"].notna()].groupby("model")["wape"].median().rename("median_wape"))
    serving = series[series["served_model"].notna()].groupby("served_model")[PARTITION_ID].size().rename("serving")
    out = won.join(serving, how="outer").fillna({"won": 0, "serving": 0})
    out[["won", "serving"]] = out[["won", "serving"]].astype(int)
    out.index.name = "model"
    return out.reset_index().sort_values(["won", "serving", "model"], ascending=[False, False, True],
                                         kind="stable").reset_index(drop=True)


# -- the words ----------------------------------------------------------------------------------
def why(row: Mapping[str, Any]) -> str:
    """Why a series is served by what it is served by, in one sentence from the stored evidence."""
    source = _text(row.get("source"))
    model = _text(row.get("served_model")) or _text(row.get("model"))
    evidence = _evidence(row)
    decision, promo = _text(row.get("decision")), _text(row.get("promotion_reason"))
    if not source:
        return "not forecast: " + (_status_words(row) or "no stored prediction")
    if source == "production":
        if decision == "promoted":
            how = f"promoted ({promo})" if promo else "promoted in this run"
        elif decision == "rejected":
            how = "an earlier production model still serves: this run's model was rejected" + (f" ({promo})" if promo else "")
        else:
            how = "its promoted model"
        return _join(f"production {model}: {how}", evidence)
    if source == "unpromoted":
        not_promoted = f"not promoted ({promo})" if promo else "not promoted"
        return _join(f"unpromoted {model}: {not_promoted}, but it beat its own baseline in backtests", evidence)
    if source == "latest":
        return _join(f"latest {model}: the scoring chain serves the newest trained model", evidence)
    if source == "global":
        return _join(f"global: no local model serves it ({_no_local(row)})", _evidence(row, neutral=True))
    if source == "baseline":
        wape, base = _num(row.get("wape")), _num(row.get("baseline_wape"))
        if _text(row.get("status")) == "trained" and wape is not None and base is not None and wape > base:
            return f"baseline: its model lost to the baseline in backtests ({evidence})"
        return _join(f"baseline: {_no_local(row)}, and the global model did not beat the baseline",
                     _evidence(row, neutral=True))
    return _join(f"{source} {model}".strip(), evidence)


def _no_local(row: Mapping[str, Any]) -> str:
    status, decision = _text(row.get("status")), _text(row.get("decision"))
    promo = _text(row.get("promotion_reason"))
    if status in ("failed", "skipped", "baseline_only"):
        return _status_words(row)
    if status == "trained":
        words = "its model was not promoted" + (f" ({promo})" if decision == "rejected" and promo else "")
        return words + " nor shown better than its own baseline over the backtests"
    return "no local model promoted"


def _status_words(row: Mapping[str, Any]) -> str:
    status, reason = _text(row.get("status")), _text(row.get("reason"))
    if not status:
        return "not in the latest training run"
    label = {"baseline_only": "too little history for a model (baseline only)",
             "failed": "training failed", "skipped": "training skipped"}.get(status, status)
    return f"{label}: {reason}" if reason else label


def _evidence(row: Mapping[str, Any], neutral: bool = False) -> str:
    """The test-window WAPE against the baseline's. ``neutral`` for fallbacks: the chain decided on
    every backtest window (not stored), so the test window alone is quoted without a verdict."""
    wape, base = _num(row.get("wape")), _num(row.get("baseline_wape"))
    if wape is None:
        return ""
    if base is None:
        return f"test-window WAPE {wape:.1%}"
    if neutral:
        return f"test window alone: WAPE {wape:.1%}, the baseline's {base:.1%}"
    verb = "beat" if wape < base else ("tied" if wape == base else "lost to")
    return f"test-window WAPE {wape:.1%} {verb} the baseline's {base:.1%}"


def _join(head: str, evidence: str) -> str:
    return f"{head}; {evidence}" if evidence else head


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(out) else out
