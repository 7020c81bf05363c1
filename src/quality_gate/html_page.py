"""Self-contained HTML pages: the page shell, figures as embedded PNGs, and a small Markdown renderer.

Shared by the selection report (:mod:`quality_gate.selection.report`) and the experiment's summaries
(:mod:`quality_gate.experiment.render`): one page is one file, with its CSS inline and its figures as
base64 data URIs, so it can be mailed or opened from any folder. Every piece of text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def png_base64(fig: Any) -> str:
    """A matplotlib figure as base64 PNG (100 dpi, tight box); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def png_img(png: str, alt: str = "figure") -> str:
    """An ``<img>`` of a base64 PNG (:func:`png_base64`)."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def page(title: str, body: str, css: str) -> str:
    """A complete HTML document: ``title`` as its title and first heading, then ``body`` (HTML)."""
    title = html.escape(title)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{title}</title><style>{css}</style></head><body><h1>{title}</h1>{body}</body></html>"
    )


def markdown_to_html(md: str) -> str:
    """The summaries' Markdown (headings, pipe tables, ``-`` lists, paragraphs, `code`) as HTML; every
    piece of text escaped."""

    def inline(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{t}</code>" if i % 2 else t for i, t in enumerate(parts))

    out: list[str] = []
    table: list[list[str]] = []
    items: list[str] = []

    def flush() -> None:
        if table:
            head, *rows = [r for r in table if not all(set(c) <= set("-: ") for c in r)]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)
