"""report.html's rendering: sections, tables and charts as one self-contained HTML page.

Each table is also written as CSV and Parquet under tables/ and each chart as a standalone HTML and a PNG under
charts/, named by `slug` of its title; the PNGs are embedded as base64 so the page is one file. What the page
says is decided in report.py; how it looks is decided here.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import polars as pl

from reteq.analysis import charts as C
from reteq.analysis.section import Section

HTML_ROW_LIMIT = 200  # longer tables are cut in the page (the CSV / Parquet files are complete)
COLLAPSE_ROWS = 30  # tables longer than this start collapsed

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1400px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .55em}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.files{font-size:.85em;color:#555}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}.note{color:#666;font-size:.85em}
"""


def page(title: str, body: str) -> str:
    t = html.escape(title)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{t}</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>{t}</h1>\n{body}\n</body></html>\n"
    )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "table"


class Renderer:
    """Renders sections into HTML, writing each table's and chart's files once under unique names."""

    def __init__(self, out: Path):
        self.out = out
        self.used: set[str] = set()

    def _stem(self, name: str) -> str:
        base = stem = slug(name)
        n = 1
        while stem in self.used:
            n += 1
            stem = f"{base}_{n}"
        self.used.add(stem)
        return stem

    def section(self, section: Section, preformatted: bool = False) -> str:
        parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
        if section.links:
            anchors = " &middot; ".join(f'<a href="{html.escape(url, quote=True)}">{html.escape(label)}</a>'
                                        for label, url in section.links.items())
            parts.append(f'<p class="files">Drawn from, in MLflow: {anchors}</p>')
        for text in section.paragraphs:
            parts.append(f"<pre>{html.escape(text)}</pre>" if preformatted else f"<p>{html.escape(text)}</p>")
        for name, table in section.tables.items():
            parts.append(self.table(name, table if isinstance(table, pl.DataFrame) else pl.DataFrame(table)))
        for name, chart in section.charts.items():
            parts.append(self.chart(name, chart))
        parts.append("</section>")
        return "\n".join(parts)

    def table(self, name: str, table: pl.DataFrame) -> str:
        """The table as HTML, plus CSV and Parquet copies under tables/ linked from the page."""
        folder = self.out / "tables"
        folder.mkdir(exist_ok=True)
        stem = self._stem(name)
        table.write_csv(folder / f"{stem}.csv")
        table.write_parquet(folder / f"{stem}.parquet")
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
        rows = [
            "<tr>" + "".join(_cell(col, v) for col, v in zip(table.columns, row)) + "</tr>"
            for row in table.head(HTML_ROW_LIMIT).iter_rows()
        ]
        cut = table.height > HTML_ROW_LIMIT
        note = f'<p class="note">First {HTML_ROW_LIMIT} of {table.height} rows.</p>' if cut else ""
        files = (
            f'<p class="files">{table.height} rows &middot; <a href="tables/{stem}.csv">CSV</a> '
            f'&middot; <a href="tables/{stem}.parquet">Parquet</a></p>'
        )
        grid = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{note}"
        title = html.escape(name)
        if table.height > COLLAPSE_ROWS:
            return f"<h3>{title}</h3>{files}<details><summary>show table</summary>{grid}</details>"
        return f"<h3>{title}</h3>{files}{grid}"

    def chart(self, name: str, chart) -> str:
        """Save the chart (HTML + PNG) and embed the PNG; a chart that fails to render is noted, not fatal."""
        try:
            interactive, png = C.save_chart(chart, self.out / "charts", self._stem(name))
        except Exception as err:  # noqa: BLE001 - one broken chart must not cost the whole report
            why = html.escape(f"{type(err).__name__}: {err}")
            return f'<p class="note">Chart {html.escape(name)} could not be rendered: {why}</p>'
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        alt_text = html.escape(name.replace("_", " "), quote=True)
        return (
            f'<figure><img alt="{alt_text}" src="data:image/png;base64,{data}">'
            f'<figcaption class="files"><a href="charts/{interactive.name}">interactive version</a> &middot; '
            f'<a href="charts/{png.name}">PNG</a></figcaption></figure>'
        )


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num">&ndash;</td>'
    if column == "link":
        url = html.escape(str(value), quote=True)
        return f'<td><a href="{url}">open in MLflow</a></td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, (int, bool)):
        return f'<td class="num">{html.escape(str(value))}</td>'
    return f"<td>{html.escape(str(value))}</td>"
