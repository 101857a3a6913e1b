"""JSON Schemas of specprof's configurations and exports (``*.schema.json`` in this package)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``name`` (e.g. ``"query-results"``) as a dict."""
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
