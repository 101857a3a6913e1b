"""HTML pieces shared by the report and the web app: escaping, pages, tables, definitions.

Every value that may come from a database, a model file or a request passes through
``escape`` (``html.escape`` with quotes) before it reaches a page; attribute values too.
"""

from __future__ import annotations

import datetime
import html
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
nav{font-size:13px;margin-bottom:12px}nav a{margin-right:14px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
td.text,th.text{text-align:left}td.text{max-width:360px;overflow-wrap:break-word}
.table-wrap{overflow-x:auto;max-width:100%}
th{background:#eef2f7;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafafa}
.plots img,.plots svg{margin:4px;border:1px solid #ddd;max-width:100%;height:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dt{font-weight:600}pre{font-size:12px;background:#f6f6f6;padding:8px;overflow:auto}
.note{color:#666;font-size:12px}.error{color:#a00;font-weight:600}
form.inline{display:flex;gap:8px;align-items:center;flex-wrap:wrap;font-size:13px}
textarea{width:100%;font-family:monospace;font-size:13px}
"""

# Click a header to sort by that column (numbers numerically, empty cells last); type in an
# input with data-filter="TABLE_ID" to show only the rows that contain the text.
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th, col){
  th.addEventListener("click", function(){
    var body = th.closest("table").tBodies[0], asc = !th.classList.contains("sorted-asc");
    th.parentNode.querySelectorAll("th").forEach(function(h){h.className=h.className.replace(/ ?sorted-(asc|desc)/g,"");});
    th.className += asc ? " sorted-asc" : " sorted-desc";
    var key = function(r){var t=r.cells[col].textContent.trim(), n=parseFloat(t); return t==="" ? null : (isNaN(n) ? t : n);};
    Array.from(body.rows).sort(function(a, b){
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    }).forEach(function(r){body.appendChild(r);});
  });
});
document.querySelectorAll("input[data-filter]").forEach(function(input){
  var table = document.getElementById(input.getAttribute("data-filter"));
  if (!table) return;
  input.addEventListener("input", function(){
    var text = input.value.toLowerCase();
    Array.from(table.tBodies[0].rows).forEach(function(r){
      r.style.display = r.textContent.toLowerCase().indexOf(text) >= 0 ? "" : "none";
    });
  });
});
"""


def escape(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    pandas = sys.modules.get("pandas")  # NA and NaT only exist if pandas is loaded
    return pandas is not None and (value is pandas.NA or value is pandas.NaT)


def cell_text(value: Any) -> str:
    """A cell, escaped: floats to 6 significant digits, times to the second, missing empty."""
    if _missing(value):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        value = value.item()
        if _missing(value):
            return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime.datetime):
        return escape(value.isoformat(sep=" ", timespec="seconds"))
    return escape(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return bool(numpy.issubdtype(type(value), numpy.number))
    return isinstance(value, int | float)


@dataclass(frozen=True)
class Link:
    """Cells of ``column`` link to ``href(row)`` (None: no link for that row)."""

    column: str
    href: Callable[[Mapping[str, Any]], str | None]


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], table_id: str,
          links: Sequence[Link] = (), headers: Mapping[str, str] | None = None) -> str:
    """A sortable HTML table of ``columns`` of ``rows`` (numbers right-aligned)."""
    kinds = {c: "" if any(_is_number(r.get(c)) for r in rows)
             and all(_missing(r.get(c)) or _is_number(r.get(c)) for r in rows) else "text"
             for c in columns}
    by_column = {link.column: link.href for link in links}
    names = headers or {}
    head = "".join(f'<th class="{kinds[c]}">{escape(names.get(c, c))}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            text = cell_text(row.get(column))
            href = by_column[column](row) if column in by_column else None
            if href is not None and text:
                text = f'<a href="{escape(href)}">{text}</a>'
            cells.append(f'<td class="{kinds[column]}">{text}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="table-wrap"><table class="sortable" id="{escape(table_id)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def definitions(items: Mapping[str, Any]) -> str:
    """A definition list: each key (bold) and its value, escaped."""
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{cell_text(v)}</dd>"
                            for k, v in items.items()) + "</dl>"


def page(title: str, body: str, *, nav: str = "", stylesheet: str | None = None,
         script: str | None = None) -> str:
    """A whole HTML page. ``stylesheet`` and ``script`` are URLs on the same host; without
    them the style and the table script are inlined (a self-contained file). ``body`` and
    ``nav`` are HTML already; ``title`` is text."""
    style = (f'<link rel="stylesheet" href="{escape(stylesheet)}">' if stylesheet
             else f"<style>{STYLE}</style>")
    code = f'<script src="{escape(script)}"></script>' if script else f"<script>{SORT_JS}</script>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title>{style}</head><body>\n{nav}"
            f"<h1>{escape(title)}</h1>\n{body}\n{code}\n</body></html>\n")
