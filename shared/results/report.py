"""The dashboard: one self-contained HTML file built from the SQL result store alone.

The reference architecture hands predictions and metrics to Power BI; locally we write an HTML
report anyone can open offline: no external scripts, CSS or fonts, charts as inline SVG drawn
with matplotlib, one inline script that sorts and filters the series table. Everything comes from
the store's tables (``model_metrics``, ``promotions``, ``backtests``, ``predictions``, ``runs``, and
``actuals`` and ``effects`` when the store has them), so the report of an Azure SQL store and of
the local SQLite file are the same.

What it shows is the latest training run (the newest ``train`` entry of the ``runs`` table that
has metrics, else the run with the most metric rows), every stored prediction, and every series
(worst first) with why it is served by what serves it.
"""
from __future__ import annotations

from pathlib import Path

from shared.results.report_data import gather
from shared.results.report_render import DEFAULT_TITLE, render
from shared.results.result_store import ResultStore


def write_report(store: ResultStore, path: Path, title: str = DEFAULT_TITLE,
                 min_accuracy: float | None = None) -> Path:
    """Write the HTML report to ``path`` (atomically) and return it.

    ``min_accuracy`` draws the promotion threshold when the store holds no promotion decision yet.
    """
    data = gather(store, n_examples=3)
    if data.threshold is None and min_accuracy is not None:
        data.threshold, data.promotion_metric = float(min_accuracy), "accuracy"
    text = render(data, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
