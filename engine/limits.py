"""Resource limits checked before a layer is computed, so that a layer too big for this machine
is refused with a reason and a way out instead of being killed by the operating system.

Each backend estimates its peak memory (``Backend.memory``, bytes) and time (``Backend.cost``,
seconds at ``NOMINAL_FLOPS``). The profiler refuses a backend whose memory estimate is above
``Request.max_memory`` (default: ``DEFAULT_MEMORY_SHARE`` of the memory available when the run
starts), and an approximate backend whose time estimate is above ``Request.max_seconds``.
Estimates err on the high side: they add up the arrays of every phase of a computation.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from specprof.engine.errors import SpecprofError

if TYPE_CHECKING:
    from specprof.engine.base import Backend
    from specprof.engine.types import Layer, Request

DEFAULT_MEMORY_SHARE = 0.5
"""Share of the memory available at the start of a run that one layer may take by default."""
DEFAULT_MAX_SECONDS = 300.0
"""Default time budget of an approximate backend on one layer (estimated, nominal seconds)."""
PRODUCT_BUFFERS = 4 * 2**27
"""Chunk buffers of the matrix-free conv products (``ConvApply``: ~128 MiB chunks, a few alive)."""

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of memory available to new work (Linux ``MemAvailable``, else free physical pages);
    None where the system does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return _free_pages_memory()  # not Linux, or an unusual /proc
    return _free_pages_memory()


def _free_pages_memory() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_max_memory() -> int | None:
    """``DEFAULT_MEMORY_SHARE`` of the available memory; None where it is unknown."""
    available = available_memory()
    return None if available is None else int(available * DEFAULT_MEMORY_SHARE)


def parse_memory(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5GB"`` or a number of bytes -> bytes (units of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise SpecprofError(f"cannot read the memory size '{text}'",
                            "write a number with an optional unit, e.g. --max-memory 8G or 512M")
    size = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not math.isfinite(size) or size < 1 or size >= 2**63:
        raise SpecprofError(f"memory size '{text}' is out of range",
                            "give at least one byte and less than 8 EiB, e.g. --max-memory 8G")
    return int(size)


def format_bytes(size: float) -> str:
    """``5905580032`` -> ``"5.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def conv_products_bytes(rows: int, cols: int, output_positions: int, taps: int,
                        in_channels: int) -> int:
    """Peak bytes of matrix-free products with a conv's matrix (rows x cols): the int64 gather
    table (output positions x kernel taps, built with two temporaries of its size), a few
    vectors of each side and the chunk buffers (im2col columns, at most ~128 MiB each)."""
    buffers = min(PRODUCT_BUFFERS, 4 * 8 * output_positions * taps * in_channels)
    return 3 * 8 * output_positions * taps + 4 * 8 * (rows + cols) + buffers


def lanczos_bytes(size: int, vectors: int) -> int:
    """ARPACK's Krylov basis and work vectors on a Gram matrix of side ``size``."""
    return 8 * (vectors + 4) * size


def limit_refusal(backend: Backend, layer: Layer, request: Request) -> str:
    """Why ``backend`` must not run on ``layer`` under the request's limits; '' when it may.

    Called where ``backend.supports`` said yes. A backend without an estimate is never refused.
    """
    limit = request.max_memory
    if limit is not None:
        try:
            needed = backend.memory(layer, request)
        except SpecprofError:
            needed = None
        if needed is not None and needed > limit:
            other = "another --backend (e.g. toeplitz)" if backend.exact else "another --backend"
            return (f"{backend.name} would need ~{format_bytes(needed)} of memory, above the "
                    f"{format_bytes(limit)} limit: use --top-k K, {other}, a smaller "
                    f"--input-shape, or --max-memory {_ceil_size(needed)}")
    if request.max_seconds is not None and not backend.exact:
        try:
            seconds = backend.cost(layer, request)
        except SpecprofError:
            seconds = None
        if seconds is not None and seconds > request.max_seconds:
            return (f"{backend.name} is estimated at ~{seconds:.3g} s, above the "
                    f"{request.max_seconds:g} s budget of an approximate backend: use a smaller "
                    f"--input-shape, --top-k K with --backend exact, or --max-seconds "
                    f"{math.ceil(seconds)}")
    return ""


def _ceil_size(size: int) -> str:
    """A --max-memory value just above ``size``, in whole MiB or GiB."""
    if size < 2**30:
        return f"{math.ceil(size / 2**20)}M"
    return f"{math.ceil(size / 2**30)}G"
