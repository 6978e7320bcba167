"""The HTML dashboard: built from the SQL store alone, self-contained, honest when empty."""
from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest

from shared.report import write_report
from shared.result_store import SQLiteStore

DATES = pd.date_range("2024-01-07", periods=16, freq="W")


def fill(store: SQLiteStore, n: int = 24) -> dict:
    """A training run of n partitions: wape = (i+1)/100, a few failed/skipped, accuracy rule 0.8."""
    metrics, decisions, backtests, predictions = [], [], [], []
    for i in range(n):
        pid, keys = f"p{i:03d}", {"store": f"S{i % 4}", "item": str(i)}
        status = {5: "failed", 11: "skipped"}.get(i, "trained")
        wape = (i + 1) / 100 if status == "trained" else None
        accuracy = None if wape is None else 1 - 2 * wape
        metrics.append({"partition_id": pid, "keys": keys, "run_id": "r1", "status": status,
                        "model_name": "gbm" if wape else None, "model_version": 1 if wape else None,
                        "reason": {5: "ValueError: boom", 11: "only 3 observed periods < 4"}.get(i, ""),
                        "metrics": {"wape": wape, "accuracy": accuracy},
                        "baseline_metrics": {"wape": None if wape is None else 2 * wape}, "n_observed": 100})
        if wape is None:
            continue
        promoted = accuracy >= 0.8
        decisions.append({"partition_id": pid, "keys": keys, "run_id": "r1",
                          "decision": "promoted" if promoted else "rejected",
                          "reason": f"accuracy {accuracy:.2f} {'>=' if promoted else '<'} 0.80",
                          "metric": "accuracy", "value": accuracy, "threshold": 0.8})
        backtests.append(pd.DataFrame({"partition_id": pid, **keys, "run_id": "r1", "date": DATES[:8],
                                       "actual": 10.0 + np.arange(8), "prediction": 10.0 + np.arange(8) * (1 + wape),
                                       "baseline": 12.0}))
        predictions.append(pd.DataFrame({"partition_id": pid, **keys, "run_id": "r1", "date": DATES[8:],
                                         "prediction": 20.0, "model": "gbm" if promoted else "baseline",
                                         "model_version": 1, "is_fallback": 0 if promoted else 1}))
    store.upsert_metrics(metrics)
    store.upsert_promotions(decisions)
    store.upsert_backtests(pd.concat(backtests))
    store.upsert_predictions(pd.concat(predictions))
    store.record_run("r1", "train", time.time() - 60, 42.0, {"trained": n - 2, "failed": 1, "skipped": 1})
    store.record_run("s1", "score", time.time() - 5, 3.5, {"rows": 8 * (n - 2)})
    return {"promoted": sum(d["decision"] == "promoted" for d in decisions),
            "rejected": sum(d["decision"] == "rejected" for d in decisions), "predictions": 8 * (n - 2)}


def section(text: str, section_id: str) -> str:
    match = re.search(rf'<section[^>]*id="{section_id}".*?</section>', text, flags=re.S)
    assert match, f"section {section_id} missing"
    return match.group(0)


def card(text: str, label: str) -> str:
    match = re.search(rf'<div class="label">{label}</div><div class="value[^"]*">([^<]*)</div>', text)
    assert match, f"card {label} missing"
    return match.group(1)


@pytest.fixture
def store(tmp_path):
    with SQLiteStore(tmp_path / "results.sqlite") as s:
        yield s


def test_report_of_a_populated_store_has_every_section_and_the_right_numbers(store, tmp_path):
    expected = fill(store)
    path = write_report(store, tmp_path / "out" / "report.html", title="Demo <report>")
    text = path.read_text(encoding="utf-8")
    assert "<title>Demo &lt;report&gt;</title>" in text
    assert card(text, "Partitions") == "24"
    assert card(text, "Trained") == "22"
    assert card(text, "Failed") == "1" and card(text, "Skipped") == "1"
    assert card(text, "Promoted") == str(expected["promoted"]) == "9"  # wape <= 0.10 -> accuracy >= 0.80
    assert card(text, "Rejected") == str(expected["rejected"])
    assert card(text, "Predictions") == f"{expected['predictions']:,}"
    assert card(text, "Median WAPE") == "13.5%"  # median of 1..24 without 6 and 12, in percent
    assert "baseline 27.0%" in text  # twice the model WAPE

    accuracy = section(text, "accuracy")
    assert "<svg" in accuracy and "promotion threshold 0.80" in accuracy

    promotion = section(text, "promotion")
    assert "accuracy # &lt; #" in promotion  # rejection reasons grouped with numbers masked
    assert re.search(r"accuracy # &lt; #</td><td class='num'>13</td>", promotion)
    assert "failed: ValueError: boom" in promotion and "skipped: only # observed periods &lt; #" in promotion

    forecasts = section(text, "forecasts")
    assert forecasts.count("<svg") == 2
    assert "store=S0, item=0" in forecasts and "store=S3, item=23" in forecasts  # best and worst by WAPE

    timings = section(text, "timings")
    assert "42.0 s" in timings and "score" in timings

    table = section(text, "partitions")
    assert "24 of 24 partitions" in table and "<td>S1</td><td>1</td><td>gbm</td>" in table


def test_report_is_self_contained(store, tmp_path):
    fill(store, n=8)
    text = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script" not in text
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)
    assert "@import" not in text and "url(http" not in text


def test_report_of_an_empty_store_says_there_is_nothing_yet(store, tmp_path):
    text = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Nothing here yet" in text
    assert 'id="headline"' not in text


def test_a_run_without_promotions_or_predictions_still_reports_with_the_configured_threshold(tmp_path):
    with SQLiteStore(tmp_path / "r.sqlite", keys=["well"], time_column="week", freq="int") as store:
        store.upsert_metrics([{"partition_id": f"p{i}", "well": f"w{i}", "run_id": "r9", "status": "trained",
                               "model": "loglinear", "accuracy": 0.5 + i / 10, "wape": 0.3 - i / 20}
                              for i in range(4)])
        store.upsert_backtests(pd.DataFrame({"partition_id": "p0", "well": "w0", "run_id": "r9",
                                             "week": [10, 11, 12], "actual": [1.0, 2.0, 3.0],
                                             "prediction": [1.0, 2.5, 2.5]}))
        text = write_report(store, tmp_path / "report.html", min_accuracy=0.7).read_text(encoding="utf-8")
    assert card(text, "Partitions") == "4" and card(text, "Promoted") == "0"
    assert "promotion threshold 0.70" in section(text, "accuracy")
    assert "No promotion decision is stored for this run yet" in section(text, "promotion")
    assert "well=w0" in section(text, "forecasts")


def test_the_report_follows_the_latest_training_run(store, tmp_path):
    fill(store, n=6)
    store.upsert_metrics([{"partition_id": "p000", "store": "S0", "item": "0", "run_id": "r2",
                           "status": "trained", "wape": 0.5, "accuracy": 0.4}])
    store.record_run("r2", "train", time.time(), 1.0, {})
    text = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "training run <code>r2</code>" in text and card(text, "Partitions") == "1"
