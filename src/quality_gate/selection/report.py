"""``selection_report.html``: one self-contained audit page of a selection.

Figures are matplotlib PNGs embedded as base64 data URIs; CSS is inline; every piece of sample text
is ``html.escape``d. Sections: summary, the sample explorer (:mod:`.explorer`: a sortable, filterable
table of the samples, each opening its text and token heat-maps), q kept vs dropped, per-layer S with
a_l/b_l/mu_l, kept fraction per dataset, what the diversity rule did, q vs length, rank agreement
between selectors, corruption audit (when the records carry ``meta.corruption``), and the highest /
lowest samples coloured token by token.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from quality_gate.html_page import page, png_base64, png_img
from quality_gate.io import atomic_write_text
from quality_gate.selection import explorer
from quality_gate.selection.metrics import spearman
from quality_gate.stats.store import get_sample_router_info, load_router_data

if TYPE_CHECKING:
    from quality_gate.selection.result import SelectionResult

log = logging.getLogger(__name__)

# Points drawn in the scatter plot; more add nothing visible and slow the report down.
MAX_SCATTER_POINTS = 20_000
# Tokens shown per sample in the token colouring.
MAX_TOKENS_SHOWN = 400

SECTIONS = {
    "summary": "Summary",
    "explorer": "Sample explorer",
    "q-hist": "Quality score: kept vs dropped",
    "layers": "Per-layer scores S",
    "datasets": "Kept fraction per dataset",
    "diversity": "Diversity",
    "length": "Quality score vs sample length",
    "agreement": "Rank agreement between selectors",
    "corruption": "Corrupted samples (synthetic labels)",
    "samples": "Highest and lowest samples",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:0 auto;
padding:16px 24px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:1.6em}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}img{max-width:100%;height:auto;display:block;margin:8px 0}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0;background:#fcfcfc}
.tokens{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;
word-break:break-word}.tokens span{border-radius:2px}.note{color:#666;font-size:0.92em}
.legend span{display:inline-block;width:90px;padding:0 4px;font-size:11px}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;border-radius:4px}
"""
CSS += explorer.CSS


def _png(fig: plt.Figure) -> str:
    return png_img(png_base64(fig))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any, tag: str) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        cls = ' class="l"' if not isinstance(v, (int, float)) else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(SECTIONS[key])}</h2>{body}</section>'


# --------------------------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------------------------- #
def _q_hist(res: SelectionResult) -> str:
    q, ok = res.q, np.isfinite(res.q)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    bins = np.histogram_bin_edges(q[ok], bins=60)
    ax.hist(q[ok & ~res.selected], bins=bins, alpha=0.7, label="dropped", color="#999")
    ax.hist(q[ok & res.selected], bins=bins, alpha=0.8, label=f"kept ({res.selector})", color="#1f77b4")
    ax.set_xlabel("q (quality score)")
    ax.set_ylabel("samples")
    ax.legend()
    return _png(fig)


def _layers(res: SelectionResult) -> str:
    S = res.stats.S[res.stats.valid]  # (N_valid, L)
    num_layers = S.shape[1]
    fig, ax = plt.subplots(figsize=(min(12, 5 + 0.25 * num_layers), 4))
    pos = np.arange(num_layers)
    ax.boxplot([S[:, layer] for layer in range(num_layers)], positions=pos, showfliers=False, widths=0.6)
    group, cols = next(iter(res.columns.items()))
    ax.scatter(pos, cols.a, marker="v", color="#d62728", s=18, label="a_l (min)", zorder=3)
    ax.scatter(pos, cols.b, marker="^", color="#2ca02c", s=18, label="b_l (max)", zorder=3)
    ax.scatter(pos, cols.mu, marker="o", color="#1f77b4", s=18, label="mu_l (mean)", zorder=3)
    ax.set_xticks(pos, [str(p) for p in pos], fontsize=8)
    ax.set_xlabel("layer l")
    ax.set_ylabel("S[i, l]")
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    note = (
        ""
        if group == "all"
        else f"<p class='note'>Markers: column statistics of dataset {html.escape(group)}.</p>"
    )
    return _png(fig) + note


def _datasets(summary: dict[str, Any]) -> str:
    names = list(summary["datasets"])
    frac = [summary["datasets"][d]["kept_fraction"] for d in names]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.9 * len(names)), 3.2))
    ax.bar(names, frac, color="#1f77b4")
    ax.axhline(summary["parameters"]["selection_percentage"], color="#d62728", ls="--", label="k")
    ax.set_ylabel("kept / valid")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    rows = [
        [d, v["num_samples"], v["valid"], v["invalid"], v["selected"], v["kept_fraction"]]
        for d, v in summary["datasets"].items()
    ]
    return _png(fig) + _table(["dataset", "samples", "valid", "invalid", "kept", "kept fraction"], rows)


def _length(res: SelectionResult) -> str:
    ok = np.flatnonzero(np.isfinite(res.q))
    if len(ok) > MAX_SCATTER_POINTS:
        ok = np.sort(np.random.default_rng(0).choice(ok, MAX_SCATTER_POINTS, replace=False))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    kept = res.selected[ok]
    ax.scatter(res.stats.length[ok][~kept], res.q[ok][~kept], s=4, alpha=0.4, color="#999", label="dropped")
    ax.scatter(res.stats.length[ok][kept], res.q[ok][kept], s=6, alpha=0.7, color="#1f77b4", label="kept")
    ax.set_xlabel("stored positions (tokens - 1)")
    ax.set_ylabel("q")
    ax.legend()
    return _png(fig)


def _agreement(res: SelectionResult) -> str:
    names = sorted(res.scores)
    valid = res.stats.valid
    mat = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            both = valid & np.isfinite(res.scores[a].score) & np.isfinite(res.scores[b].score)
            if both.sum() > 1:
                mat[i, j] = spearman(res.scores[a].score[both], res.scores[b].score[both])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.2 + 0.9 * len(names)))
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            v = mat[i, j]
            text, colour = (
                ("-", "black") if np.isnan(v) else (f"{v:.2f}", "white" if abs(v) > 0.6 else "black")
            )
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=colour)
    fig.colorbar(im, ax=ax, fraction=0.046)
    note = (
        "<p class='note'>Spearman correlation of the selectors' scores (higher = kept) over the valid "
        "samples "
        "where both are defined. perplexity's score is -mean NLL; ifd's is the raw IFD.</p>"
    )
    rows = [[a, *[float(v) for v in mat[i]]] for i, a in enumerate(names)]
    return _png(fig) + _table(["", *names], rows) + note


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _corruption(audit: dict[str, Any], k: float) -> str:
    """The table of ``selection_summary.json``'s ``corruption_audit`` (see :mod:`.audit`)."""
    rows = [
        [name, row["kept_labelled"], _nan(row["corrupted_share_of_kept"]), _nan(row["auroc"])]
        for name, row in audit["selectors"].items()
    ]
    table = _table(
        ["selector", "kept (labelled)", "corrupted share of kept", "AUROC clean vs corrupted"], rows
    )
    kinds = list(audit["kinds"])
    per_kind = _table(
        ["selector", *[f"{f} (n={audit['kinds'][f]})" for f in kinds]],
        [
            [name, *[_nan(row["per_kind"][f]["auroc"]) for f in kinds]]
            for name, row in audit["selectors"].items()
        ],
    )
    note = (
        f"<p class='note'>Share of corrupted samples among all {audit['num_labelled']} labelled samples: "
        f"{audit['corrupted_share_of_pool']:.3f}. Each selector keeps its own ceil(k N) with k = {k}. "
        "AUROC: how well the selector's ranking puts clean above corrupted samples "
        "(0.5 = chance; samples a selector may not keep, e.g. invalid or IFD > 1, rank last).</p>"
    )
    return table + note + "<h3>AUROC clean vs each kind of corruption</h3>" + per_kind


# --------------------------------------------------------------------------------------------- #
# Token colouring
# --------------------------------------------------------------------------------------------- #
def _stage2_settings(res: SelectionResult) -> dict[str, Any]:
    """Tokenizer path, max length and truncation of the Stage 2 run, from its ``fingerprint.json``.

    Stage 2 stores the selector's path there resolved to an absolute path, so the report finds the
    tokenizer from any working directory.
    """
    index_path = next(iter(res.stats.index_paths.values()))
    fields = json.loads((index_path.parent / "fingerprint.json").read_text()).get("fields", {})
    return {
        "path": fields["selector_model_path"],
        "max_length": int(fields["max_sequence_length"]),
        "truncation": fields["truncation"],
        "trust_remote_code": bool(fields.get("trust_remote_code", False)),
    }


def _load_encoder(res: SelectionResult) -> tuple[Any, Any, dict[str, Any]]:
    from quality_gate.data.encode import encode_record
    from quality_gate.model_sources import check_model_source
    from quality_gate.models import load_tokenizer

    settings = _stage2_settings(res)
    # A selector dir moved or deleted since Stage 2 fails here at once, not after Hub retries.
    path = check_model_source(
        settings["path"], "fingerprint.json selector_model_path", ("tokenizer_config.json", "tokenizer.json")
    )
    tok = load_tokenizer(path, settings["trust_remote_code"], "fingerprint.json selector_model_path")
    return tok, encode_record, settings


def _bg(rgb: tuple[int, int, int], strength: float) -> str:
    strength = float(min(max(strength, 0.0), 1.0)) if math.isfinite(strength) else 0.0
    return f"background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.08 + 0.8 * strength:.2f})"


def _coloured_tokens(pieces: list[str], gate: np.ndarray, ppl: np.ndarray) -> str:
    """Two renderings of one sample: by gate (mean over layers) and by perplexity.

    ``gate`` (T,) is token t's gate (t < T = n - 1); ``ppl`` (T,) is the perplexity of token t+1.
    """
    n = min(len(pieces), MAX_TOKENS_SHOWN)
    log_ppl = np.log(np.maximum(ppl, 1.0))
    top = float(log_ppl.max()) if len(log_ppl) else 1.0
    by_gate, by_ppl = [], []
    for t in range(n):
        g = float(gate[t]) if t < len(gate) else float("nan")
        p = float(ppl[t - 1]) if 1 <= t <= len(ppl) else float("nan")
        tip = html.escape(f"token {t}: gate {g:.3f}, ppl {p:.3g}", quote=True)
        text = html.escape(pieces[t])
        by_gate.append(f'<span title="{tip}" style="{_bg((31, 119, 180), g)}">{text}</span>')
        lp = math.log(max(p, 1.0)) / top if math.isfinite(p) and top > 0 else float("nan")
        by_ppl.append(f'<span title="{tip}" style="{_bg((255, 127, 14), lp)}">{text}</span>')
    more = f"<p class='note'>first {n} of {len(pieces)} tokens shown</p>" if n < len(pieces) else ""
    return (
        "<div class='note'>coloured by gate (mean over layers; blue = open):</div>"
        f"<div class='tokens'>{''.join(by_gate)}</div>"
        "<div class='note'>coloured by perplexity of the token (log scale; orange = surprising):</div>"
        f"<div class='tokens'>{''.join(by_ppl)}</div>{more}"
    )


def _plain_text(record: dict[str, Any]) -> str:
    parts = [f"[{m.get('role')}] {m.get('content')}" for m in record.get("messages", [])]
    return f"<div class='tokens'>{html.escape(chr(10).join(parts))}</div>"


class _TokenPainter:
    """The per-token data of the colourings: the tokenizer of the Stage 2 run re-encodes a record,
    the router data gives its gates (mean over layers) and perplexities. Shared by the highest /
    lowest samples (rendered here) and the explorer (rendered by its script)."""

    def __init__(self, res: SelectionResult) -> None:
        self.res = res
        self.why = ""
        self.encoder = None
        try:
            self.encoder = _load_encoder(res)
        except Exception as e:  # any failure to load a tokenizer only downgrades the display
            self.why = f"Token colouring unavailable ({type(e).__name__}: {e}); showing plain text."
            log.warning("%s", self.why)
        self._router: dict[str, dict[str, Any]] = {}

    def tokens(self, i: int, record: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray] | str:
        """``(pieces, gate (T,), ppl (T,))`` of sample ``i`` (see :func:`_coloured_tokens`), or why not."""
        if self.encoder is None:
            return self.why
        tok, encode_record, settings = self.encoder
        dataset, sid = self.res.stats.datasets[i], self.res.stats.ids[i]
        enc = encode_record(record, tok, settings["max_length"], settings["truncation"])
        if dataset not in self._router:
            self._router[dataset] = load_router_data(self.res.stats.index_paths[dataset])
        info = get_sample_router_info(self._router[dataset], sid)
        gates = info["quality_gates"].float().numpy()  # (L, T)
        ppl = info["perplexities"].float().numpy()  # (T,)
        if enc is None or len(enc.input_ids) - 1 != gates.shape[1]:
            n_tok = None if enc is None else len(enc.input_ids)
            return f"re-encoding gave {n_tok} tokens for {gates.shape[1]} stored positions; plain text shown."
        return [tok.decode([t]) for t in enc.input_ids], gates.mean(axis=0), ppl


def _samples(
    res: SelectionResult, records: dict[int, dict[str, Any]], showcase: list[int], painter: _TokenPainter
) -> str:
    half = len(showcase) // 2
    blocks = [f"<p class='note'>{html.escape(painter.why)}</p>" if painter.why else ""]
    for pos, i in enumerate(showcase):
        if pos in (0, half):
            blocks.append("<h3>" + ("Highest q" if pos == 0 else "Lowest q") + "</h3>")
        record, dataset, sid = records[i], res.stats.datasets[i], res.stats.ids[i]
        head = (
            f"<b>{html.escape(sid)}</b> · {html.escape(dataset)} · q = {res.q[i]:.4g} · "
            f"{int(res.stats.length[i])} positions · {'kept' if res.selected[i] else 'dropped'}"
        )
        body = _plain_text(record)
        data = painter.tokens(i, record)
        if isinstance(data, tuple):
            body = _coloured_tokens(*data)
        elif painter.encoder is not None:
            body = f"<p class='note'>{html.escape(data)}</p>" + body
        blocks.append(f"<div class='sample'>{head}{body}</div>")
    return "".join(blocks)


# --------------------------------------------------------------------------------------------- #
# Page
# --------------------------------------------------------------------------------------------- #
def _diversity(summary: dict[str, Any]) -> str:
    """What ``selection_summary.json``'s ``diversity`` says, as tables."""
    div = summary.get("diversity") or {"mode": "none"}
    mode = div["mode"]
    if mode == "none":
        return "<p class='note'>diversity=none: the budget is the top samples by score.</p>"
    groups = div.get("groups", {})
    if mode == "threshold":
        head = (
            f"<p>diversity=threshold, cosine threshold {div['threshold']}: {html.escape(div['rule'])}. "
            f"{div['skipped_near_duplicates']} samples were skipped as near-duplicates"
            + (" and the candidates ran out before the budget was full." if div["pool_exhausted"] else ".")
            + "</p>"
        )
        header = ["group", "budget", "candidates", "examined", "near-duplicates", "kept", "pool ran out"]
        keys = ("budget", "candidates", "examined", "skipped_near_duplicates", "kept")
        rows = [[g, *(v[k] for k in keys), "yes" if v["pool_exhausted"] else "no"] for g, v in groups.items()]
        return head + _table(header, rows)
    km = div.get("kmeans") or {}
    head = (
        f"<p>diversity=cluster: {html.escape(div['rule'])}; {km.get('clusters')} k-means clusters "
        f"({html.escape(str(km.get('space')))}), fitted on {km.get('fit_rows')} samples in "
        f"{km.get('iterations')} Lloyd iterations{'' if km.get('converged') else ' (not converged)'}.</p>"
    )
    parts = [head]
    for g, v in groups.items():
        rows = [
            [c, size, quota, kept]
            for c, (size, quota, kept) in enumerate(
                zip(v["cluster_sizes"], v["cluster_quotas"], v["cluster_kept"])
            )
        ]
        parts.append(f"<h3>{html.escape(g)}: {v['kept']} kept of budget {v['budget']}</h3>")
        parts.append(_table(["cluster", "candidates", "quota", "kept"], rows))
    return "".join(parts)


def write_report(
    path: Path,
    res: SelectionResult,
    summary: dict[str, Any],
    records: dict[int, dict[str, Any]],
    showcase: list[int],
    kinds: Sequence[str | None] | None = None,
    explore: np.ndarray | None = None,
) -> None:
    """Write the HTML report to ``path`` (atomic). ``showcase``: sample indices, best half first;
    ``kinds`` (N,): corruption labels; ``explore``: the explorer's sample indices
    (:func:`.explorer.explorer_rows`; ``records`` must hold them)."""
    p = summary["parameters"]
    params_rows = [[k, str(v)] for k, v in p.items()] + [["command", summary["command"]]]
    counts = (
        f"<p>{summary['num_selected']} of {summary['num_valid']} valid samples kept "
        f"({summary['num_samples']} scored, {summary['invalid_samples']['count']} invalid), "
        f"{summary['num_layers']} layers.</p>"
    )
    warning = (summary.get("stage1") or {}).get("warning")
    if warning:
        counts = f"<p class='warn'><b>Warning:</b> {html.escape(warning)}.</p>" + counts
    painter = _TokenPainter(res)
    if explore is None:
        explore = explorer.explorer_rows(res)
    doc = explorer.explorer_data(res, explore, records, kinds, painter)
    sections = [
        _section("summary", counts + _table(["parameter", "value"], params_rows)),
        _section("explorer", explorer.explorer_html(res, doc, len(res.stats))),
        _section("q-hist", _q_hist(res)),
        _section("layers", _layers(res)),
        _section("datasets", _datasets(summary)),
        _section("diversity", _diversity(summary)),
        _section("length", _length(res)),
        _section("agreement", _agreement(res)),
    ]
    audit = summary.get("corruption_audit")
    if audit is not None:
        sections.append(_section("corruption", _corruption(audit, p["selection_percentage"])))
    sections.append(_section("samples", _samples(res, records, showcase, painter)))
    present = [k for k in SECTIONS if audit is not None or k != "corruption"]
    nav = "".join(f'<a href="#{k}">{html.escape(SECTIONS[k])}</a>' for k in present)
    body = f"<nav>{nav}</nav>{''.join(sections)}"
    atomic_write_text(path, page("Quality-Gate selection report", body, CSS))
