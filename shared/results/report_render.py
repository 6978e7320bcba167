"""The dashboard's HTML and its charts (inline SVG drawn with matplotlib) from a :class:`ReportData`.

No external scripts, CSS or fonts: the file opens offline. One small inline script sorts and
filters the long tables (:mod:`shared.results.report_table`); without it the page still reads, worst
series first. Rendering never queries the store.
"""
from __future__ import annotations

import io
import json
import re
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pandas as pd

from shared.keys import PARTITION_ID
from shared.models.metric_names import lower_is_better
from shared.results.report_data import ReportData, _num
from shared.results.report_format import _duration, _e, _int, _pct, _pill
from shared.results.report_table import SCRIPT, effects_section, series_section, wins_block

DEFAULT_TITLE = "manymodels — forecasting report"
_GOOD, _BAD, _NEUTRAL, _ACCENT, _MUTED = "#2f855a", "#c53030", "#718096", "#2b6cb0", "#a0aec0"


# -- charts -------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "manymodels"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["left"].set_color("#cbd5e0")
    ax.spines["bottom"].set_color("#cbd5e0")
    ax.tick_params(colors="#4a5568", labelsize=9)
    ax.grid(axis="y", color="#edf2f7", linewidth=0.8)
    ax.set_axisbelow(True)


def accuracy_chart(data: ReportData) -> str | None:
    acc = data.metrics["accuracy"].dropna() if not data.metrics.empty else pd.Series(dtype=float)
    if acc.empty:
        return None
    fig = _figure(7.2, 2.8)
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 21)
    threshold = data.threshold if data.promotion_metric in (None, "accuracy") else None
    if threshold is not None:
        ax.hist(acc[acc >= threshold], bins=bins, color=_GOOD, label="at or above the threshold")
        ax.hist(acc[acc < threshold], bins=bins, color=_MUTED, label="below the threshold")
        ax.axvline(threshold, color=_BAD, linestyle="--", linewidth=1.5)
        left = threshold > 0.6  # keep the label inside the axes
        ax.text(threshold, ax.get_ylim()[1] * 0.98, f" promotion threshold {threshold:.2f} ", color=_BAD,
                fontsize=9, va="top", ha="right" if left else "left")
        ax.legend(frameon=False, fontsize=8, loc="upper left" if left else "upper right")
    else:
        ax.hist(acc, bins=bins, color=_ACCENT)
    ax.set_xlabel("test-window accuracy (1 − WAPE)", fontsize=9)
    ax.set_ylabel("partitions", fontsize=9)
    ax.set_xlim(0, 1)
    _style(ax)
    return _svg(fig)


def wape_chart(data: ReportData) -> str | None:
    m = data.metrics.dropna(subset=["wape", "baseline_wape"]) if not data.metrics.empty else data.metrics
    if m.empty:
        return None
    fig = _figure(3.6, 2.8)
    ax = fig.add_subplot()
    limit = float(np.nanpercentile(np.r_[m["wape"], m["baseline_wape"]], 99)) * 1.05 or 1.0
    better = m["wape"] <= m["baseline_wape"]
    ax.scatter(m.loc[better, "baseline_wape"], m.loc[better, "wape"], s=9, color=_GOOD, alpha=0.6,
               label="beats the baseline")
    ax.scatter(m.loc[~better, "baseline_wape"], m.loc[~better, "wape"], s=9, color=_BAD, alpha=0.6,
               label="worse than the baseline")
    ax.plot([0, limit], [0, limit], color=_NEUTRAL, linewidth=1, linestyle=":")
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_xlabel("baseline WAPE", fontsize=9)
    ax.set_ylabel("model WAPE", fontsize=9)
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    _style(ax)
    return _svg(fig)


def outcome_chart(labels: Sequence[str], values: Sequence[int], colors: Sequence[str]) -> str:
    fig = _figure(3.6, 0.45 + 0.38 * len(labels))
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=colors, height=0.6)
    ax.set_yticks(y, labels)
    top = max(values) if len(values) and max(values) > 0 else 1
    for yi, v in zip(y, values):
        ax.text(v + top * 0.01, yi, f"{v:,}", va="center", fontsize=9, color="#2d3748")
    ax.set_xlim(0, top * 1.15)
    _style(ax)
    ax.grid(False)
    ax.tick_params(axis="x", labelbottom=False, length=0)
    ax.spines["bottom"].set_visible(False)
    return _svg(fig)


def forecast_chart(data: ReportData, partitions: list[str]) -> str | None:
    if not partitions:
        return None
    fig = _figure(11.5, 2.6)
    axes = fig.subplots(1, len(partitions), squeeze=False)[0]
    by_id = data.metrics.set_index(PARTITION_ID)
    for ax, pid in zip(axes, partitions):
        bt = _with_time(data.backtests[data.backtests[PARTITION_ID] == pid], data.time_column)
        fut = _with_time(data.future[data.future[PARTITION_ID] == pid], data.time_column)
        past = _history_before(data, pid, bt, fut)
        if not past.empty:
            ax.plot(past["_t"], past["actual"], color="#4a5568", linewidth=1.1, label="history", gid=f"history-{pid}")
            if not bt.empty:
                ax.axvline(bt["_t"].iloc[0], color=_MUTED, linewidth=0.8, linestyle=":")
        if not bt.empty:
            ax.plot(bt["_t"], bt["actual"], color="#1a202c", linewidth=1.6, label="actual")
            ax.plot(bt["_t"], bt["prediction"], color=_ACCENT, linewidth=1.4, linestyle="--",
                    label="forecast (test window)")
            if bt["baseline"].notna().any():
                ax.plot(bt["_t"], bt["baseline"], color=_MUTED, linewidth=1, linestyle=":", label="baseline")
        if not fut.empty:
            fallback = bool(pd.to_numeric(fut["is_fallback"], errors="coerce").fillna(0).max())
            lower = pd.to_numeric(fut.get("lower"), errors="coerce") if "lower" in fut else None
            upper = pd.to_numeric(fut.get("upper"), errors="coerce") if "upper" in fut else None
            if lower is not None and upper is not None and lower.notna().any():
                ax.fill_between(fut["_t"], lower, upper, color="#dd6b20", alpha=0.18, linewidth=0,
                                label="prediction interval")
            ax.plot(fut["_t"], fut["prediction"], color="#dd6b20", linewidth=1.6,
                    label="future (fallback)" if fallback else "future forecast")
        if bt.empty and fut.empty and past.empty:
            ax.text(0.5, 0.5, "no backtest or forecast stored", ha="center", va="center",
                    transform=ax.transAxes, color=_NEUTRAL, fontsize=9)
        row = by_id.loc[pid] if pid in by_id.index else None
        label = _key_label(row, data.keys) if row is not None else pid
        wape = _num(row["wape"]) if row is not None else None
        ax.set_title(f"{label}\nWAPE {wape:.1%}" if wape is not None else label, fontsize=9, color="#2d3748")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        _style(ax)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False, fontsize=8)
    return _svg(fig)


def _history_before(data: ReportData, pid: str, bt: pd.DataFrame, fut: pd.DataFrame) -> pd.DataFrame:
    """Observed history (table ``actuals``) up to the test window's start (or the forecast's, without
    a backtest): one season, or as long as the test window when that is longer."""
    if data.history.empty:
        return data.history
    past = _with_time(data.history[data.history[PARTITION_ID] == pid], data.time_column)
    past = past[pd.to_numeric(past["actual"], errors="coerce").notna()]
    if past.empty:  # a short series has no season before its test window (an empty column cannot compare)
        return past
    start = bt["_t"].iloc[0] if not bt.empty else (fut["_t"].iloc[0] if not fut.empty else None)
    if start is not None:
        past = past[past["_t"] <= start]
    return past.tail(max(int(data.season_length), len(bt)) + 1)


def timing_chart(runs: pd.DataFrame) -> str | None:
    if runs.empty:
        return None
    recent = runs.head(12).iloc[::-1]
    labels = [f"{r.stage} · {str(r.run_id)[:10]}" for r in recent.itertuples()]
    fig = _figure(7.2, 0.5 + 0.3 * len(recent))
    ax = fig.add_subplot()
    seconds = pd.to_numeric(recent["seconds"], errors="coerce").fillna(0).to_numpy()
    ax.barh(np.arange(len(recent)), seconds, color=_ACCENT, height=0.6)
    ax.set_yticks(np.arange(len(recent)), labels, fontsize=8)
    for i, s in enumerate(seconds):
        ax.text(s + max(seconds.max(), 1e-9) * 0.01, i, _duration(s), va="center", fontsize=8, color="#2d3748")
    ax.set_xlim(0, max(seconds.max(), 1e-9) * 1.15)
    ax.set_xlabel("seconds", fontsize=9)
    _style(ax)
    ax.grid(axis="x", color="#edf2f7")
    ax.grid(axis="y", visible=False)
    return _svg(fig)


def _with_time(frame: pd.DataFrame, time_column: str) -> pd.DataFrame:
    if frame.empty:
        return frame.assign(_t=pd.Series(dtype=float))
    values = frame[time_column]
    numeric = pd.to_numeric(values, errors="coerce")
    t = numeric if numeric.notna().all() else pd.to_datetime(values, errors="coerce")
    return frame.assign(_t=t.to_numpy()).sort_values("_t")


# -- HTML ---------------------------------------------------------------------------------------
_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f7fafc; color: #1a202c;
       font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { font-size: 24px; margin: 0 0 4px; }
header p { margin: 0; color: #4a5568; }
section { background: #fff; border: 1px solid #e2e8f0; border-radius: 10px; padding: 18px 22px;
          margin-top: 20px; }
section h2 { font-size: 17px; margin: 0 0 4px; }
section p.note { margin: 0 0 12px; color: #4a5568; font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px;
         margin-top: 20px; }
.card { background: #fff; border: 1px solid #e2e8f0; border-radius: 10px; padding: 12px 16px; }
.card .label { color: #4a5568; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 26px; font-weight: 600; margin-top: 2px; }
.card .sub { color: #718096; font-size: 12px; }
.good { color: #2f855a; } .bad { color: #c53030; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.row > div { flex: 1 1 320px; min-width: 0; }
svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #edf2f7; vertical-align: top; }
th { background: #f7fafc; color: #4a5568; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:hover td { background: #f7fafc; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #edf2f7; }
.pill.promoted, .pill.trained { background: #c6f6d5; color: #22543d; }
.pill.rejected, .pill.failed { background: #fed7d7; color: #822727; }
.pill.skipped, .pill.baseline_only { background: #feebc8; color: #7b341e; }
.empty { text-align: center; padding: 60px 20px; }
.empty h2 { font-size: 20px; }
code { background: #edf2f7; padding: 1px 5px; border-radius: 4px; }
footer { margin-top: 24px; color: #a0aec0; font-size: 12px; }
.tools { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 4px 0 10px; color: #4a5568; }
.tools input { flex: 1 1 280px; padding: 6px 10px; border: 1px solid #cbd5e0; border-radius: 6px; font: inherit; }
.tools select { padding: 5px; border: 1px solid #cbd5e0; border-radius: 6px; font: inherit; }
.scroll { max-height: 640px; overflow: auto; border: 1px solid #edf2f7; border-radius: 6px; }
table.sortable thead th { position: sticky; top: 0; cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " ▲"; }
table.sortable th[aria-sort=descending]::after { content: " ▼"; }
td.why { color: #4a5568; min-width: 280px; }
"""


def render(data: ReportData, title: str = DEFAULT_TITLE) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = f"training run <code>{_e(data.run_id)}</code> · " if data.run_id else ""
    parts = [f"<header><h1>{_e(title)}</h1><p>{run}generated {now}</p></header>"]
    if data.empty:
        parts.append(
            '<section class="empty" id="empty"><h2>Nothing here yet</h2>'
            "<p>The result store holds no training run, no prediction and no run timing. Run the pipeline "
            "(<code>manymodels run --data …</code>), then write this report again.</p></section>")
    else:
        parts += [_headline(data), _accuracy_section(data), _promotion_section(data), _source_section(data),
                  _forecast_section(data), effects_section(data), series_section(data), _timing_section(data)]
    parts.append("<footer>Built from the SQL result store (tables model_metrics, promotions, backtests, "
                 "predictions, runs, and actuals and effects where the store has them). Self-contained: "
                 "one inline script, no external resources.</footer>")
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n{body}\n</main>"
            f"<script>{SCRIPT}</script></body></html>\n")


def _headline(data: ReportData) -> str:
    m = data.metrics
    status = m["status"].value_counts() if not m.empty else pd.Series(dtype=int)
    decisions = data.promotions["decision"].value_counts() if not data.promotions.empty else pd.Series(dtype=int)
    with_model = m[m["status"].isin(["trained", "baseline_only"])] if not m.empty else m
    med_acc, med_wape, med_base = (_median(with_model, c) for c in ("accuracy", "wape", "baseline_wape"))
    cards = [
        ("Partitions", f"{len(m):,}", f"in run {data.run_id[:12]}" if data.run_id else "no training run yet"),
        ("Trained", f"{int(status.get('trained', 0)):,}",
         f"{int(status.get('baseline_only', 0)):,} baseline only"),
        ("Failed", f"{int(status.get('failed', 0)):,}", "with a recorded reason"),
        ("Skipped", f"{int(status.get('skipped', 0)):,}", "too little history"),
        ("Promoted", f"{int(decisions.get('promoted', 0)):,}", "copied to production"),
        ("Rejected", f"{int(decisions.get('rejected', 0)):,}", "by the promotion rules"),
        ("Predictions", f"{data.n_predictions:,}",
         f"{data.n_predicted_partitions:,} partitions, {data.n_fallback_partitions:,} on fallback"),
        ("Median accuracy", _pct(med_acc), "1 − WAPE on the test window"),
    ]
    wape_class = ""
    if med_wape is not None and med_base is not None:
        wape_class = "good" if med_wape < med_base else "bad"
    cards.append(("Median WAPE", _pct(med_wape), f"baseline {_pct(med_base)}"))
    if data.pooled.get("model_wape") is not None:
        base = data.pooled.get("baseline_wape")
        cards.append(("Pooled WAPE", _pct(data.pooled["model_wape"]),
                      f"baseline {_pct(base)}" if base is not None else "over all test windows"))
    html_cards = []
    for label, value, sub in cards:
        cls = f" {wape_class}" if label == "Median WAPE" and wape_class else ""
        html_cards.append(f'<div class="card"><div class="label">{_e(label)}</div>'
                          f'<div class="value{cls}">{_e(value)}</div><div class="sub">{_e(sub)}</div></div>')
    return f'<div class="cards" id="headline">{"".join(html_cards)}</div>'


def _median(frame: pd.DataFrame, column: str) -> float | None:
    values = frame[column].dropna() if not frame.empty else frame
    return None if values.empty else _num(values.median())


def _accuracy_section(data: ReportData) -> str:
    acc = accuracy_chart(data)
    wape = wape_chart(data)
    if acc is None and wape is None:
        return ('<section id="accuracy"><h2>Accuracy</h2><p class="note">No model has test-window metrics '
                "in this run.</p></section>")
    threshold = ""
    if data.threshold is not None:
        threshold = f" The promotion rule is {_e(data.promotion_metric or 'accuracy')} ≥ {data.threshold:.2f}."
        if lower_is_better(data.promotion_metric or ""):
            threshold = f" The promotion rule is {_e(data.promotion_metric)} ≤ {data.threshold:.2f}."
    return (f'<section id="accuracy"><h2>Accuracy distribution</h2><p class="note">Accuracy of each '
            f"partition's chosen model on its held-out test window.{threshold} Right: each partition's "
            f"model WAPE against its naive baseline's (below the diagonal = better than the baseline).</p>"
            f'<div class="row"><div style="flex:2 1 480px">{acc or ""}</div><div>{wape or ""}</div></div></section>')


def _promotion_section(data: ReportData) -> str:
    m = data.metrics
    blocks = []
    if not m.empty:
        order = ["trained", "baseline_only", "skipped", "failed"]
        counts = m["status"].value_counts()
        labels = [s for s in order if counts.get(s, 0)] + [s for s in counts.index if s not in order]
        colors = {"trained": _GOOD, "baseline_only": "#dd6b20", "skipped": _MUTED, "failed": _BAD}
        blocks.append("<div><h3 style='font-size:14px;margin:4px 0'>Training outcome</h3>"
                      + outcome_chart(labels, [int(counts[s]) for s in labels],
                                      [colors.get(s, _NEUTRAL) for s in labels]) + "</div>")
    p = data.promotions
    if not p.empty:
        order = ["promoted", "rejected", "unchanged"]
        counts = p["decision"].value_counts()
        labels = [s for s in order if counts.get(s, 0)] + [s for s in counts.index if s not in order]
        colors = {"promoted": _GOOD, "rejected": _BAD, "unchanged": _MUTED}
        blocks.append("<div><h3 style='font-size:14px;margin:4px 0'>Promotion decisions</h3>"
                      + outcome_chart(labels, [int(counts[s]) for s in labels],
                                      [colors.get(s, _NEUTRAL) for s in labels]) + "</div>")
    tables = []
    rejected = p[p["decision"] == "rejected"] if not p.empty else p
    if not rejected.empty:
        tables.append(_reason_table("Why models were rejected", rejected["reason"]))
    failed = m[m["status"].isin(["failed", "skipped"])] if not m.empty else m
    if not failed.empty:
        tables.append(_reason_table("Why partitions failed or were skipped",
                                    failed["status"] + ": " + failed["reason"].fillna("")))
    if not blocks:
        return ""
    note = ("No promotion decision is stored for this run yet." if p.empty else
            "Every decision is stored with its reason (table <code>promotions</code>).")
    return (f'<section id="promotion"><h2>Training and promotion</h2><p class="note">{note}</p>'
            f'<div class="row">{"".join(blocks)}</div>{"".join(tables)}</section>')


def _reason_table(title: str, reasons: pd.Series) -> str:
    """Reasons grouped by their wording, numbers masked, with one real example per group."""
    frame = pd.DataFrame({"reason": reasons.fillna("(no reason given)").astype(str)})
    frame["group"] = frame["reason"].map(lambda r: re.sub(r"-?\d+(?:\.\d+)?(?:e-?\d+)?%?", "#", r)[:160])
    grouped = frame.groupby("group", sort=False).agg(n=("reason", "size"), example=("reason", "first"))
    grouped = grouped.sort_values("n", ascending=False).head(15)
    rows = "".join(f"<tr><td>{_e(g)}</td><td class='num'>{int(r.n):,}</td><td>{_e(r.example[:200])}</td></tr>"
                   for g, r in grouped.iterrows())
    return (f"<h3 style='font-size:14px;margin:16px 0 6px'>{_e(title)}</h3><table class='reasons'>"
            f"<tr><th>Reason (numbers as #)</th><th class='num'>Partitions</th><th>Example</th></tr>{rows}</table>")


def _source_section(data: ReportData) -> str:
    """Where the delivered forecasts come from (the scoring chain), how accurate each source is, and
    which models won the series."""
    wins = wins_block(data)
    if data.sources.empty and not wins:
        return ""
    table = ""
    if not data.sources.empty:
        rows = "".join(
            f"<tr><td>{_pill(r['source'])}</td><td class='num'>{_int(r['partitions'])}</td>"
            f"<td class='num'>{_int(r['rows'])}</td><td class='num'>{_pct(_num(r['share']))}</td>"
            f"<td class='num'>{_pct(_num(r['wape']))}</td></tr>" for _, r in data.sources.iterrows())
        table = ("<p class='note'>Each partition is forecast by the first source of the scoring chain that can "
                 "answer: its production model, its latest model when that beat its own baseline (unpromoted), "
                 "the global model, then the baseline. WAPE is that source's test-window error on the "
                 "partitions it served (each partition counted under its newest forecast).</p>"
                 "<table id='source-counts'><thead><tr><th>source</th><th class='num'>partitions</th>"
                 "<th class='num'>rows</th><th class='num'>share</th><th class='num'>test WAPE</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table>")
    else:
        table = "<p class='note'>No forecast is stored yet (table <code>predictions</code>).</p>"
    return f'<section id="sources"><h2>Where forecasts come from</h2>{table}{wins}</section>'


def _forecast_section(data: ReportData) -> str:
    if not data.best and not data.worst:
        return ""
    best = forecast_chart(data, data.best)
    worst = forecast_chart(data, data.worst)
    missing = (" The store holds no backtest rows for this run (table <code>backtests</code>): only the "
               "future forecast is drawn.") if data.backtests.empty else ""
    history = (" Before it, a season of observed history (table <code>actuals</code>)." if not data.history.empty
               else " The store holds no observed history (table <code>actuals</code>, loaded at scoring): "
               "the charts start at the test window.")
    return ('<section id="forecasts"><h2>Forecast vs actual</h2><p class="note">The test window (actual, '
            "the chosen model's forecast and the naive baseline) followed by the stored future forecast, "
            f"for the partitions with the lowest and the highest test-window WAPE.{history}{missing}</p>"
            f"<h3 style='font-size:14px;margin:8px 0 0'>Best {len(data.best)}</h3>{best or ''}"
            + (f"<h3 style='font-size:14px;margin:8px 0 0'>Worst {len(data.worst)}</h3>{worst}" if worst else "")
            + "</section>")


def _timing_section(data: ReportData) -> str:
    if data.runs.empty:
        return ""
    chart = timing_chart(data.runs)
    rows = []
    for r in data.runs.head(20).itertuples():
        counts = _counts_text(r.counts)
        rows.append(f"<tr><td><code>{_e(r.run_id)}</code></td><td>{_e(r.stage)}</td><td>{_e(r.started_at)}</td>"
                    f"<td class='num'>{_e(_duration(_num(r.seconds)))}</td><td>{_e(counts)}</td></tr>")
    return ('<section id="timings"><h2>Run timings</h2><p class="note">Wall time of each pipeline stage '
            "(table <code>runs</code>), newest first.</p>"
            f"{chart or ''}<table><tr><th>Run</th><th>Stage</th><th>Started</th><th class='num'>Time</th>"
            f"<th>Counts</th></tr>{''.join(rows)}</table></section>")


def _key_label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys if k in row.index and row[k] is not None) or str(row.name)


def _counts_text(raw: Any) -> str:
    try:
        counts = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return str(raw)
    return ", ".join(f"{k} {v}" for k, v in counts.items()
                     if v not in (0, None, "", 0.0) and k not in ("run_id", "score_id", "dataset_id"))
