"""One cleaner for everything that leaves as JSON or goes to a database driver.

``jsonable`` turns a value into plain JSON data: dicts, lists, str, int, float, bool and None.
NumPy and pandas values are recognised without importing either (a value can only be a NumPy
scalar if NumPy is already in ``sys.modules``), so the CLI can use it and stay light.
"""

from __future__ import annotations

import base64
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["jsonable"]


def jsonable(value: Any, *, bind: bool = False) -> Any:
    """``value`` as plain JSON-ready Python, recursively.

    - dicts (any mapping) -> dicts with string keys; lists, tuples and sets -> lists
    - NumPy scalars -> Python numbers (``.item()``); NumPy arrays and pandas Series -> lists
    - NaN and +-inf, ``pandas.NA`` and ``NaT`` -> None (PostgreSQL's JSON rejects NaN)
    - datetimes, dates, times, pandas Timestamps (anything with ``isoformat``) -> ISO 8601 text
    - bytes -> base64 text; paths -> their text; anything else unknown -> ``str(value)``

    With ``bind=True`` the value is instead made fit for a database driver's bound parameters:
    only NumPy scalars (and pandas NA, as None) change, also inside dicts, lists and tuples,
    which keep their type; bytes, datetimes and NaN are left for the driver.
    """
    if bind:
        return _bindable(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value if type(value) is str else str(value)  # e.g. numpy.str_
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_key(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return _sorted([jsonable(item) for item in value])
    if _is_missing(value):
        return None
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic | numpy.ndarray):
        return jsonable(value.item() if isinstance(value, numpy.generic) else value.tolist())
    if hasattr(value, "isoformat"):  # datetime, date, time, pandas Timestamp
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if _module_of(value) == "pandas" and hasattr(value, "tolist"):  # Series, Index
        return jsonable(value.tolist())
    return str(value)


def _bindable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _bindable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_bindable(item) for item in value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return value.item()
    return None if _is_missing(value) else value


def _key(key: Any) -> str:
    """A dict key as text (JSON object keys are strings); NumPy scalar keys by their value."""
    return key if isinstance(key, str) else str(jsonable(key))


def _sorted(items: list[Any]) -> list[Any]:
    """A set's items in a stable order where they compare, else as they came."""
    try:
        return sorted(items)
    except TypeError:
        return items


def _module_of(value: Any) -> str:
    return type(value).__module__.partition(".")[0]


def _is_missing(value: Any) -> bool:
    """``pandas.NA`` or ``pandas.NaT`` (checked only when pandas is loaded)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and (value is pandas.NA or value is pandas.NaT)
