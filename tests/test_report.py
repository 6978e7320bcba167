"""The HTML dashboard: built from the SQL store alone, self-contained, honest when empty."""
from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest

from shared.results.report import write_report
from shared.results.result_store import SQLiteStore

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

    table = section(text, "series")
    assert "All 24 series" in table and "<tr data-source='baseline'><td>S1</td><td>13</td>" in table


def test_report_is_self_contained(store, tmp_path):
    fill(store, n=8)
    text = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert text.count("<script") == 1 and "<script>" in text  # one inline script, nothing loaded
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', text)
    assert "@import" not in text and "url(http" not in text and "fetch(" not in text


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


# -- the forecaster's view: every series, wins, why, history, effects ---------------------------------
def series_rows(text: str) -> list[str]:
    """The series table's rows, in page order."""
    body = re.search(r"<table class='sortable' id='series'.*?<tbody>(.*?)</tbody>", text, flags=re.S)
    assert body, "series table missing"
    return re.findall(r"<tr data-source=.*?</tr>", body.group(1), flags=re.S)


def item_of(row: str) -> str:
    return re.findall(r"<td>([^<]*)</td>", row)[1]  # the keys come first: store, item


@pytest.fixture(scope="module")
def forecaster_report(tmp_path_factory):
    """The report of 40 series (tests/report_fixture.py says what each one is), written once."""
    from report_fixture import fill_forecaster_store

    root = tmp_path_factory.mktemp("forecaster")
    with SQLiteStore(root / "results.sqlite") as store:
        expected = fill_forecaster_store(store, n=40)
        return expected, write_report(store, root / "report.html").read_text(encoding="utf-8")


def test_every_series_is_listed_worst_first_not_just_the_best_thirty(forecaster_report):
    expected, text = forecaster_report
    rows = series_rows(text)
    assert sorted(item_of(r) for r in rows) == sorted(expected.items.values())  # all 40, failed ones too
    ranked = sorted(expected.wape, key=lambda p: -expected.wape[p])
    assert [item_of(r) for r in rows[:len(ranked)]] == [expected.items[p] for p in ranked]
    assert "40 of 40 series" in section(text, "series")


def test_model_wins_and_sources_are_counted(forecaster_report):
    expected, text = forecaster_report
    wins = section(text, "sources")
    for model in ("gbm", "ets", "ensemble"):
        won = sum(m == model for m in expected.model.values())
        serving = sum(expected.model.get(p) == model and s in ("production", "unpromoted")
                      for p, s in expected.source.items())
        assert re.search(rf"<td>{model}</td><td class='num'>{won}</td><td class='num'>{serving}</td>", wins), model
    for source in ("production", "unpromoted", "global", "baseline"):
        n = sum(s == source for s in expected.source.values())
        assert re.search(rf"<span class='pill {source}'>{source}</span></td><td class='num'>{n}</td>", wins), source


def test_each_series_says_why_it_is_served_by_what_serves_it(forecaster_report):
    expected, text = forecaster_report
    why = {item_of(r): re.search(r"<td class='why'>(.*?)</td>", r).group(1) for r in series_rows(text)}
    assert why["i000"] == ("production gbm: promoted (wape 0.01 &lt;= 0.10); "
                           "test-window WAPE 1.0% beat the baseline&#x27;s 25.0%")
    assert why["i012"].startswith("unpromoted gbm: not promoted (wape 0.13 &gt; 0.10), but it beat its own baseline")
    assert why["i013"].startswith("global: no local model serves it (its model was not promoted")
    assert why["i017"] == "global: no local model serves it (training failed: ValueError: boom)"
    assert why["i030"] == ("baseline: its model lost to the baseline in backtests "
                           "(test-window WAPE 31.0% lost to the baseline&#x27;s 25.0%)")
    assert why["i019"].startswith("baseline: training skipped: only 3 observed periods")
    assert why["i039"] == "not forecast: training skipped: only 3 observed periods &lt; 4"


needs_history_tables = pytest.mark.skipif(not hasattr(SQLiteStore, "upsert_effects"),
                                          reason="this store has no actuals and effects tables")


@needs_history_tables
def test_the_charts_draw_a_season_of_history_before_the_test_window(forecaster_report):
    _, text = forecaster_report
    charts = section(text, "forecasts")
    drawn = re.findall(r'<g id="history-(p\d+)">(.*?)</g>', charts, flags=re.S)
    assert {pid for pid, _ in drawn} == {"p000", "p001", "p002", "p038", "p036", "p035"}  # best 3, worst 3
    points = re.search(r'<path d="([^"]*)"', drawn[0][1]).group(1).count("L") + 1
    assert points == 53  # a weekly season (52) and the test window's first week, where the lines meet


def test_without_actuals_the_charts_start_at_the_test_window(tmp_path):
    from report_fixture import fill_forecaster_store

    with SQLiteStore(tmp_path / "r.sqlite") as s:
        fill_forecaster_store(s, n=12, actuals=False, effects=False)
        text = write_report(s, tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="history-' not in text and "no observed history" in section(text, "forecasts")
    assert 'id="effects"' not in text


def test_a_charted_series_without_history_of_its_own_is_drawn_from_its_test_window(tmp_path):
    """Short series have no season before their test window: the report of an intermittent panel
    raised comparing an empty history with the window's start."""
    from report_fixture import fill_forecaster_store

    with SQLiteStore(tmp_path / "r.sqlite") as s:
        fill_forecaster_store(s, n=12, effects=False)
        s.conn.execute("DELETE FROM actuals WHERE partition_id <> 'p000'")  # one charted series keeps its history
        text = write_report(s, tmp_path / "report.html").read_text(encoding="utf-8")
    assert section(text, "forecasts").count("<svg") >= 2


@needs_history_tables
def test_price_elasticity_and_promotion_lift_are_a_table(forecaster_report):
    expected, text = forecaster_report
    effects = section(text, "effects")
    rows = re.findall(r"<tr><td>S\d</td><td>(i\d+)</td><td>gbm</td>(.*?)</tr>", effects, flags=re.S)
    assert {item for item, _ in rows} == {expected.items[p] for p in expected.effects}
    first = dict(rows)["i000"]
    assert ">-1.00</td>" in first and ">+10.0%</td>" in first  # elasticity -1.00, lift +10%
    assert "price elasticity" in effects and "promo lift" in effects


def test_a_store_from_before_actuals_and_effects_still_reports(store, tmp_path):
    """Stores of earlier releases have neither table: the report reads them only when present."""
    fill(store, n=6)
    store.conn.execute("DROP TABLE IF EXISTS actuals")
    store.conn.execute("DROP TABLE IF EXISTS effects")
    store.tables = {k: v for k, v in store.tables.items() if k not in ("actuals", "effects")}
    text = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "All 6 series" in section(text, "series") and 'id="effects"' not in text
