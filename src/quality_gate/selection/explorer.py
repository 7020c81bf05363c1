"""The sample explorer of ``selection_report.html``: a sortable, filterable table of the samples;
clicking a row opens the sample (its text, and its token heat-maps where precomputed).

Everything is inline (no network): the rows are one JSON document in a ``<script
type="application/json">`` element (``<``, ``>`` and ``&`` written as JSON escapes, so no record can
end the element), and a small script builds the table with DOM calls and ``textContent`` only, so
sample text is never parsed as HTML.

Bounds, so that the page stays a few MB: every sample when the pool has at most ``MAX_ROWS``,
else the ``EDGE_ROWS`` best and the ``EDGE_ROWS`` worst by the run's selector (samples it may not
keep rank last); sample text is cut to ``TEXT_CHARS`` characters; token heat-maps (by gate and by
perplexity, the colouring of the report's highest / lowest samples) are precomputed for the
``HEATMAPS // 2`` best and worst rows, as compact arrays the script colours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from quality_gate.selection.selectors import group_rank, rank_order, ranking_score

if TYPE_CHECKING:
    from quality_gate.selection.result import SelectionResult

MAX_ROWS = 20_000
EDGE_ROWS = 2_500
HEATMAPS = 200
TEXT_CHARS = 300
# Tokens per heat-map (the report's MAX_TOKENS_SHOWN).
MAX_TOKENS = 400


def explorer_rows(res: SelectionResult) -> np.ndarray:
    """Sample indices the explorer shows, best first by the run's selector (ties by id)."""
    score = ranking_score(res.scores[res.selector])  # (N,), -inf where it may not keep
    order = rank_order(score, np.asarray(res.stats.ids), np.ones(len(score), dtype=bool))
    if len(order) <= MAX_ROWS:
        return order
    return np.concatenate([order[:EDGE_ROWS], order[-EDGE_ROWS:]])


def _num(v: float, digits: int = 6) -> float | None:
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def _status(res: SelectionResult, i: int) -> str:
    if res.selected[i]:
        return "kept"
    if not res.stats.valid[i]:
        return "invalid"
    if res.skipped is not None and res.skipped[i]:
        return "near-duplicate"
    return "dropped"


def _heat(data: tuple[list[str], np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Compact token data: pieces, gate per token, perplexity of the token (token t's is stored at
    t - 1), and the colour scale's top (max log ppl of the sample), as :func:`report._coloured_tokens`."""
    pieces, gate, ppl = data
    n = min(len(pieces), MAX_TOKENS)
    log_ppl = np.log(np.maximum(ppl, 1.0))
    return {
        "t": pieces[:n],
        "g": [_num(float(gate[t]), 3) if t < len(gate) else None for t in range(n)],
        "p": [_num(float(ppl[t - 1]), 4) if 1 <= t <= len(ppl) else None for t in range(n)],
        "top": float(log_ppl.max()) if len(log_ppl) else 1.0,
        "n": len(pieces),
    }


def explorer_data(
    res: SelectionResult,
    rows: np.ndarray,
    records: dict[int, dict[str, Any]],
    kinds: Sequence[str | None] | None,
    painter: Any,
) -> dict[str, Any]:
    """The JSON document of the explorer for sample indices ``rows`` (best first)."""
    stats = res.stats
    ranks = {name: group_rank(sc, stats, res.per_dataset) for name, sc in sorted(res.scores.items())}
    labelled = kinds is not None and any(k is not None for k in kinds)
    columns: list[dict[str, Any]] = [
        {"key": "id", "label": "id", "type": "str"},
        {"key": "dataset", "label": "dataset", "type": "str"},
        {"key": "q", "label": "q", "type": "num", "digits": 4},
    ]
    columns += [{"key": f"rank_{n}", "label": f"rank {n}", "type": "num"} for n in ranks]
    if res.diversity.labels is not None:
        columns.append({"key": "cluster", "label": "cluster", "type": "num"})
    if labelled:
        columns.append({"key": "corruption", "label": "corruption", "type": "str"})
    columns += [
        {"key": "length", "label": "length", "type": "num"},
        {"key": "kept", "label": "kept", "type": "str"},
    ]
    table, texts, cut = [], [], []
    heat: dict[str, Any] = {}
    half = HEATMAPS // 2
    heat_rows = set(range(min(half, len(rows)))) | set(range(max(len(rows) - half, 0), len(rows)))
    for pos, i in enumerate(int(r) for r in rows):
        row: list[Any] = [stats.ids[i], stats.datasets[i], _num(float(res.q[i]))]
        row += [int(r[i]) + 1 if r[i] >= 0 else None for r in ranks.values()]
        if res.diversity.labels is not None:
            row.append(int(res.diversity.labels[i]) if res.diversity.labels[i] >= 0 else None)
        if labelled:
            row.append(kinds[i])  # type: ignore[index]
        row += [int(stats.length[i]), _status(res, i)]
        table.append(row)
        text = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in records[i].get("messages", []))
        texts.append(text[:TEXT_CHARS])
        cut.append(len(text) if len(text) > TEXT_CHARS else 0)
        if pos in heat_rows and painter.encoder is not None:
            data = painter.tokens(i, records[i])
            if isinstance(data, tuple):
                heat[str(pos)] = _heat(data)
    return {
        "columns": columns,
        "rows": table,
        "text": texts,
        "cut": cut,
        "heat": heat,
        "datasets": sorted(set(stats.datasets)),
        "text_chars": TEXT_CHARS,
        "heat_note": painter.why
        or f"Token heat-maps are precomputed for the {half} best and {half} worst rows only; plain text:",
    }


def _json_for_script(doc: dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">``: no raw ``<``, ``>`` or ``&``."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


CSS = """
.qx-bar{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin:8px 0}
.qx-bar input[type=search]{flex:1;min-width:220px;padding:4px 6px}
.qx-wrap{max-height:460px;overflow:auto;border:1px solid #ccc}
#qx-table{margin:0;width:100%;font-size:13px}
#qx-table th{position:sticky;top:0;cursor:pointer;user-select:none;white-space:nowrap}
#qx-table th.asc::after{content:" \\25B2"}#qx-table th.desc::after{content:" \\25BC"}
#qx-table tbody tr{cursor:pointer}#qx-table tbody tr:hover{background:#eef4fb}
#qx-table tr.sel{background:#dbe9f7}#qx-table td.k-kept{color:#1a7f37;font-weight:600}
#qx-table td.k-near-duplicate{color:#9a6700}#qx-table td.k-invalid{color:#b42318}
#qx-sample h3{margin:4px 0}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("qx-data").textContent);
  var cols = D.columns, rows = D.rows, PAGE = 200;
  var $ = function (id) { return document.getElementById(id); };
  var ki = {};
  cols.forEach(function (c, j) { ki[c.key] = j; });
  var hay = rows.map(function (r, i) {
    return (r[ki.id] + "\n" + r[ki.dataset] + "\n" + D.text[i]).toLowerCase();
  });
  var state = {key: null, dir: 1, page: 0, view: [], shown: null};
  var table = $("qx-table"), head = table.tHead.rows[0], body = table.tBodies[0];
  cols.forEach(function (c) {
    var th = document.createElement("th");
    th.textContent = c.label;
    th.dataset.key = c.key;
    th.title = "sort by " + c.label + " (click again to reverse)";
    th.addEventListener("click", function () { sortBy(c.key); });
    head.appendChild(th);
  });
  var dsel = $("qx-dataset");
  D.datasets.forEach(function (d) {
    var o = document.createElement("option");
    o.value = d; o.textContent = d; dsel.appendChild(o);
  });
  function fmt(c, v) {
    if (v === null) return "\u2013";
    return c.digits ? Number(v).toPrecision(c.digits) : String(v);
  }
  function sortView(view) {
    if (state.key === null) return;
    var j = ki[state.key], num = cols[j].type === "num", dir = state.dir;
    view.sort(function (a, b) {
      var x = rows[a][j], y = rows[b][j];
      if (x === null || y === null) return x === y ? a - b : (x === null ? 1 : -1);
      var c = num ? x - y : (x < y ? -1 : (x > y ? 1 : 0));
      return c !== 0 ? dir * c : a - b;
    });
  }
  function apply() {
    var f = $("qx-filter").value.trim().toLowerCase(), d = dsel.value, k = $("qx-kept").value;
    var view = [];
    for (var i = 0; i < rows.length; i++) {
      var st = rows[i][ki.kept];
      if (d && rows[i][ki.dataset] !== d) continue;
      if (k === "kept" && st !== "kept") continue;
      if (k === "dropped" && st === "kept") continue;
      if (f && hay[i].indexOf(f) < 0) continue;
      view.push(i);
    }
    sortView(view);
    state.view = view; state.page = 0; render();
  }
  function sortBy(key) {
    state.dir = state.key === key ? -state.dir : 1;
    state.key = key;
    sortView(state.view);
    state.page = 0;
    Array.prototype.forEach.call(head.cells, function (th) {
      th.classList.remove("asc", "desc");
      if (th.dataset.key === key) th.classList.add(state.dir > 0 ? "asc" : "desc");
    });
    render();
  }
  function render() {
    body.textContent = "";
    var n = state.view.length, start = state.page * PAGE, end = Math.min(start + PAGE, n);
    var frag = document.createDocumentFragment();
    for (var p = start; p < end; p++) {
      var i = state.view[p], tr = document.createElement("tr");
      tr.dataset.row = String(i);
      if (i === state.shown) tr.className = "sel";
      cols.forEach(function (c, j) {
        var td = document.createElement("td"), v = rows[i][j];
        td.textContent = fmt(c, v);
        td.dataset.key = c.key;
        if (v !== null) td.dataset.v = String(v);
        if (c.type !== "num") td.classList.add("l");
        if (c.key === "kept") td.classList.add("k-" + v);
        tr.appendChild(td);
      });
      tr.addEventListener("click", show.bind(null, i));
      frag.appendChild(tr);
    }
    body.appendChild(frag);
    $("qx-wrap").scrollTop = 0;
    $("qx-count").textContent = n === 0 ? "no matching rows" :
      "rows " + (start + 1) + "\u2013" + end + " of " + n + " matching (" + rows.length + " in the table)";
    $("qx-prev").disabled = state.page === 0;
    $("qx-next").disabled = end >= n;
  }
  function bg(rgb, s) {
    s = (s === null || !isFinite(s)) ? 0 : Math.min(Math.max(s, 0), 1);
    return "rgba(" + rgb + "," + (0.08 + 0.8 * s).toFixed(2) + ")";
  }
  function note(text) {
    var d = document.createElement("div");
    d.className = "note"; d.textContent = text; return d;
  }
  function tokens(h, byGate) {
    var div = document.createElement("div");
    div.className = "tokens";
    for (var t = 0; t < h.t.length; t++) {
      var s = document.createElement("span"), g = h.g[t], p = h.p[t];
      s.textContent = h.t[t];
      s.title = "token " + t + ": gate " + (g === null ? "nan" : g.toFixed(3)) +
        ", ppl " + (p === null ? "nan" : p.toPrecision(3));
      var lp = (p !== null && h.top > 0) ? Math.log(Math.max(p, 1)) / h.top : null;
      s.style.background = byGate ? bg("31,119,180", g) : bg("255,127,14", lp);
      div.appendChild(s);
    }
    return div;
  }
  function show(i) {
    state.shown = i;
    Array.prototype.forEach.call(body.rows, function (tr) {
      tr.classList.toggle("sel", tr.dataset.row === String(i));
    });
    var box = $("qx-sample"), r = rows[i];
    box.textContent = "";
    var h = document.createElement("h3");
    h.textContent = r[ki.id];
    box.appendChild(h);
    box.appendChild(note(cols.filter(function (c) { return c.key !== "id"; }).map(function (c) {
      var v = fmt(c, r[ki[c.key]]);
      return c.key === "kept" ? v : c.label + " " + v;  // "kept" / "dropped" / ... say it alone
    }).join(" \u00b7 ")));
    var hm = D.heat[String(i)];
    if (hm) {
      box.appendChild(note("coloured by gate (mean over layers; blue = open):"));
      box.appendChild(tokens(hm, true));
      box.appendChild(note("coloured by perplexity of the token (log scale; orange = surprising):"));
      box.appendChild(tokens(hm, false));
      if (hm.n > hm.t.length) box.appendChild(note("first " + hm.t.length + " of " + hm.n + " tokens shown"));
    } else {
      box.appendChild(note(D.heat_note));
      var pre = document.createElement("div");
      pre.className = "tokens qx-text";
      pre.textContent = D.text[i] + (D.cut[i] ? "\u2026" : "");
      box.appendChild(pre);
      if (D.cut[i]) box.appendChild(note("first " + D.text_chars + " of " + D.cut[i] + " characters shown"));
    }
    box.hidden = false;
  }
  $("qx-filter").addEventListener("input", apply);
  dsel.addEventListener("change", apply);
  $("qx-kept").addEventListener("change", apply);
  $("qx-prev").addEventListener("click", function () { state.page -= 1; render(); });
  $("qx-next").addEventListener("click", function () { state.page += 1; render(); });
  apply();
})();
"""


def explorer_html(res: SelectionResult, doc: dict[str, Any], total: int) -> str:
    """The explorer section's body: controls, table, sample view, data and script."""
    data = _json_for_script(doc)
    n = len(doc["rows"])
    which = (
        f"All {n:,} samples"
        if n == total
        else f"The {n // 2:,} best and {n - n // 2:,} worst of the {total:,} samples by the {res.selector} "
        f"score (the pool has more than {MAX_ROWS:,}; the full table is scores.parquet)"
    )
    per_sample = len(data.encode()) / max(n, 1)
    return (
        f"<p class='note'>{which}. Click a column header to sort (again to reverse), a row to open the "
        f"sample. Text is cut to {TEXT_CHARS} characters; token heat-maps are precomputed for "
        f"{len(doc['heat'])} rows (the best and worst {HEATMAPS // 2} when a tokenizer is available). "
        f"Data: {len(data.encode()):,} bytes, {per_sample:,.0f} bytes per sample.</p>"
        "<div class='qx-bar'><input id='qx-filter' type='search' placeholder='filter by id, dataset or text' "
        "aria-label='filter'><select id='qx-dataset' aria-label='dataset'><option value=''>all datasets"
        "</option></select><select id='qx-kept' aria-label='kept'><option value=''>kept and dropped</option>"
        "<option value='kept'>kept</option><option value='dropped'>dropped</option></select>"
        "<button id='qx-prev' type='button'>&lsaquo; prev</button><button id='qx-next' type='button'>next "
        "&rsaquo;</button><span id='qx-count' class='note'></span></div>"
        "<div class='qx-wrap' id='qx-wrap'><table id='qx-table'><thead><tr></tr></thead><tbody></tbody>"
        "</table></div>"
        "<div id='qx-sample' class='sample' hidden></div>"
        f"<script type='application/json' id='qx-data'>{data}</script><script>{SCRIPT}</script>"
    )
