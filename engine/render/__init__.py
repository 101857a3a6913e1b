"""What the HTML faces share: ``specprof report`` (one file) and ``specprof serve`` (an app).

``html`` escapes text and builds pages, tables and definition lists; ``svg`` draws plots as
inline SVG, which needs no JavaScript and no plotting library. Everything that comes from a
database or a user is escaped here, once, so neither face has to remember to.
"""

from __future__ import annotations

from specprof.engine.render.charts import block_charts, depth_chart
from specprof.engine.render.html import (
    SORT_JS,
    STYLE,
    Link,
    cell_text,
    definitions,
    escape,
    page,
    table,
)
from specprof.engine.render.svg import (
    Series,
    esd_chart,
    line_chart,
    marchenko_pastur_density,
    values_by_index_chart,
)

__all__ = [
    "SORT_JS",
    "STYLE",
    "Link",
    "Series",
    "block_charts",
    "cell_text",
    "definitions",
    "depth_chart",
    "escape",
    "esd_chart",
    "line_chart",
    "marchenko_pastur_density",
    "page",
    "table",
    "values_by_index_chart",
]
