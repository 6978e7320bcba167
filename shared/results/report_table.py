"""The report's long tables: every series, model wins, price elasticity and promotion lift.

Every series is one HTML row (10,000 series are a few MB, no chart each), worst test-window WAPE
first, so a page without scripts still shows what needs attention on top; the first
:data:`SHOWN_ROWS` are laid out, the others wait in a template. A small inline script (no external
resources: the file works offline) sorts on a header click (worst first on the first click of a
measure) and filters rows by the words typed and by the serving source, showing the first matches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


from shared.keys import PARTITION_ID
from shared.results.report_data import ReportData, _num
from shared.results.report_format import _e, _int, _pct, _pill, _text


@dataclass(frozen=True)
class Col:
    """A column header: its label, whether it holds numbers, and the direction of its first sort
    (``desc`` for errors: worst first; ``asc`` for accuracy and text)."""

    label: str
    numeric: bool = False
    first: str = "asc"

    def th(self) -> str:
        cls = " class='num'" if self.numeric else ""
        return f"<th{cls} data-first='{self.first}' title='sort'>{_e(self.label)}</th>"


SHOWN_ROWS = 1_000  # rows laid out at once: 10,000 table rows took a browser 15-20 s to open, 1,000 about 2


def sortable_table(table_id: str, columns: Sequence[Col], rows: Sequence[str], noun: str,
                   sources: Sequence[str] = ()) -> str:
    """A filter box (and a source picker when ``sources``), a row count and the table itself.

    Every row is in the page, but at most :data:`SHOWN_ROWS` in the table: the others wait in a
    ``<template>`` (parsed, never laid out), and the script shows the first matching rows of any
    filter or sort. Without scripts the page shows the first rows, worst first."""
    picker = ""
    if sources:
        options = "".join(f"<option value='{_e(s)}'>{_e(s)}</option>" for s in sources)
        picker = (f"<label>served by <select id='{table_id}-source'><option value=''>any source</option>"
                  f"{options}</select></label>")
    shown, rest = rows[:SHOWN_ROWS], rows[SHOWN_ROWS:]
    more = f" (the first {len(shown):,} shown: filter or sort to see others)" if rest else ""
    tools = (f"<div class='tools'><input type='search' id='{table_id}-filter' placeholder='filter {noun}: "
             f"words all rows must contain' aria-label='filter {noun}'>{picker}"
             f"<span id='{table_id}-count'>{len(rows):,} of {len(rows):,} {noun}{more}</span></div>")
    head = "".join(c.th() for c in columns)
    waiting = f"<template id='{table_id}-more'>{''.join(rest)}</template>" if rest else ""
    return (f"{tools}<div class='scroll'><table class='sortable' id='{table_id}' data-noun='{_e(noun)}' "
            f"data-shown='{SHOWN_ROWS}'><thead><tr>{head}</tr></thead><tbody>{''.join(shown)}</tbody></table>"
            f"{waiting}</div>")


def num_cell(value: Any, text: str) -> str:
    """A number cell: shown formatted, sorted by the raw value (``data-v``; empty sorts last)."""
    v = _num(value)
    return f"<td class='num' data-v='{'' if v is None else repr(v)}'>{_e(text)}</td>"


# -- every series --------------------------------------------------------------------------------
def series_section(data: ReportData) -> str:
    s = data.series
    if s.empty:
        return ""
    keys = data.keys
    columns = [*(Col(k) for k in keys), Col("served by"), Col("model"), Col("status"),
               Col("WAPE", True, "desc"), Col("baseline WAPE", True, "desc"), Col("accuracy", True, "asc"),
               Col("observed", True, "asc"), Col("promotion"), Col("why")]
    rows = []
    for r in s.to_dict("records"):
        source = _text(r["source"])
        model = _text(r["served_model"]) or _text(r["model"])
        key_cells = "".join(f"<td>{_e(_text(r[k]))}</td>" for k in keys)
        decision = _text(r["decision"])
        rows.append(
            f"<tr data-source='{_e(source)}'>{key_cells}<td>{_pill(source) if source else '–'}</td>"
            f"<td>{_e(model)}</td><td>{_pill(r['status']) if _text(r['status']) else ''}</td>"
            + num_cell(r["wape"], _pct(_num(r["wape"])))
            + num_cell(r["baseline_wape"], _pct(_num(r["baseline_wape"])))
            + num_cell(r["accuracy"], _pct(_num(r["accuracy"])))
            + num_cell(r["n_observed"], _int(r["n_observed"]))
            + f"<td>{_pill(decision) if decision else ''}</td><td class='why'>{_e(r['why'])}</td></tr>")
    sources = sorted({_text(v) for v in s["source"] if _text(v)})
    table = sortable_table("series", columns, rows, "series", sources)
    return ('<section id="series"><h2>Every series</h2><p class="note">All '
            f"{len(s):,} series, worst test-window WAPE first (series without one last). Click a header to "
            "sort (a measure sorts worst first, click again to reverse); type to filter. <em>Why</em> says "
            "what serves each series and the evidence: the test-window WAPE against the baseline's (table "
            "<code>model_metrics</code>), the promotion decision (<code>promotions</code>) and the scoring "
            f"source (<code>predictions.source</code>).</p>{table}</section>")


def wins_block(data: ReportData) -> str:
    """Which model won how many series in training, and how many each serves."""
    w = data.wins
    if w.empty:
        return ""
    rows = "".join(f"<tr><td>{_e(r['model'])}</td><td class='num'>{int(r['won']):,}</td>"
                   f"<td class='num'>{int(r['serving']):,}</td><td class='num'>{_pct(_num(r['median_wape']))}</td></tr>"
                   for r in w.to_dict("records"))
    return ("<h3 style='font-size:14px;margin:16px 0 6px'>Model wins</h3><p class='note'>Won: series whose "
            "model selection chose it in the training run. Serving: series whose newest forecast it made "
            "(global and baseline are the fallbacks).</p><table id='wins'><thead><tr><th>model</th>"
            "<th class='num'>won</th><th class='num'>serving</th><th class='num'>median WAPE of its wins</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


# -- decision outputs: elasticity and lift ---------------------------------------------------------
_MEASURE = {"elasticity": "elasticity", "lift": "lift"}


def effects_section(data: ReportData) -> str:
    e = data.effects
    if e.empty:
        return ""
    keys = [k for k in data.keys if k in e.columns]
    e = e[e["measure"].isin(list(_MEASURE))]
    if e.empty:
        return ""
    wide = e.pivot_table(index=PARTITION_ID, columns=["measure", "covariate"], values="value", aggfunc="last")
    measures = sorted(wide.columns, key=lambda mc: (list(_MEASURE).index(mc[0]), str(mc[1])))
    head = e.drop_duplicates(PARTITION_ID).set_index(PARTITION_ID).reindex(wide.index)
    columns = [*(Col(k) for k in keys), Col("model"),
               *(Col(f"{cov} {_MEASURE[m]}", True, "asc" if m == "elasticity" else "desc") for m, cov in measures)]
    cells = [[f"<td>{_e(_text(v))}</td>" for v in head[k].tolist()] for k in [*keys, "model"]]
    for m, cov in measures:
        fmt = "{:+.2f}" if m == "elasticity" else "{:+.1%}"
        cells.append([num_cell(v, "–" if _num(v) is None else fmt.format(v)) for v in wide[(m, cov)].tolist()])
    rows = ["<tr>" + "".join(row) + "</tr>" for row in zip(*cells)]
    med = []
    for m, cov in measures:
        v = _num(wide[(m, cov)].median())
        if v is not None:
            med.append(f"median {_e(cov)} {m} {v:+.2f}" if m == "elasticity" else f"median {_e(cov)} lift {v:+.1%}")
    table = sortable_table("effects", columns, rows, "partitions")
    return ('<section id="effects"><h2>Price elasticity and promotion lift</h2><p class="note">What each '
            "partition's serving model says a decision does to its forecast (table <code>effects</code>): "
            "<b>elasticity</b> = d log forecast / d log covariate (−1.5: a 1% price rise, 1.5% fewer sales); "
            "<b>lift</b> = forecast with the promotion on / off − 1. Only partitions whose model uses the "
            f"covariate are listed. {'; '.join(med)}.</p>{table}</section>")


SCRIPT = """
(function () {
  function key(row, i, numeric) {
    var c = row.cells[i], v = c.getAttribute('data-v');
    if (numeric) { return v === null || v === '' ? null : parseFloat(v); }
    return (v === null ? c.textContent : v).toLowerCase();
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var more = document.getElementById(table.id + '-more');  /* rows beyond the first, not laid out */
    if (more) { rows = rows.concat(Array.prototype.slice.call(more.content.querySelectorAll('tr'))); }
    var limit = parseInt(table.getAttribute('data-shown'), 10) || rows.length;
    var texts = rows.map(function (r) { return r.textContent.toLowerCase(); });
    var matched = rows.map(function () { return true; });
    var input = document.getElementById(table.id + '-filter');
    var picker = document.getElementById(table.id + '-source');
    var count = document.getElementById(table.id + '-count');
    var noun = table.getAttribute('data-noun');
    function render() {  /* the first `limit` matching rows, in the current order */
      var frag = document.createDocumentFragment(), total = 0;
      rows.forEach(function (r, i) {
        if (matched[i]) { if (total < limit) { frag.appendChild(r); } total++; }
      });
      body.textContent = '';
      body.appendChild(frag);
      if (count) {
        count.textContent = total.toLocaleString('en') + ' of ' + rows.length.toLocaleString('en') + ' ' + noun +
          (total > limit ? ' (the first ' + limit.toLocaleString('en') + ' shown: filter or sort to see others)' : '');
      }
    }
    function filter() {
      var words = input ? input.value.toLowerCase().split(/\\s+/).filter(Boolean) : [];
      var source = picker ? picker.value : '';
      rows.forEach(function (r, i) {
        matched[i] = (!source || r.getAttribute('data-source') === source) &&
          words.every(function (w) { return texts[i].indexOf(w) >= 0; });
      });
      render();
    }
    if (input) { input.addEventListener('input', filter); }
    if (picker) { picker.addEventListener('change', filter); }
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener('click', function () {
        var numeric = th.classList.contains('num'), first = th.getAttribute('data-first') || 'asc';
        var now = th.getAttribute('aria-sort');
        var dir = now ? (now === 'ascending' ? 'desc' : 'asc') : first;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
        var sign = dir === 'asc' ? 1 : -1;
        var items = rows.map(function (r, i) { return {r: r, k: key(r, col, numeric), i: i}; });
        items.sort(function (a, b) {
          if (a.k === b.k) { return a.i - b.i; }
          if (a.k === null || (numeric && isNaN(a.k))) { return 1; }  /* empty last, either way */
          if (b.k === null || (numeric && isNaN(b.k))) { return -1; }
          return (a.k < b.k ? -1 : 1) * sign;
        });
        rows = items.map(function (it) { return it.r; });
        texts = items.map(function (it) { return texts[it.i]; });
        matched = items.map(function (it) { return matched[it.i]; });
        render();
      });
    });
  });
})();
"""
