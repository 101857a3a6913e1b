"""The default answer to "which backend for this layer?" when the user asks for ``auto``.

Every installed backend of kind ``operator`` that supports the layer is a candidate,
third-party ones included; each says what it costs (``Backend.cost``, seconds at a nominal
rate) and whether its values are exact. The policy:

1. The user's order first: the first backend of ``--prefer`` (``Request.prefer``) that
   supports the layer.
2. The cheapest exact backend, if its estimate is within ``EXACT_BUDGET_S`` (always, when
   only the top values are asked for: those are never approximated).
3. Else the cheapest approximate backend (``toeplitz``: an asymptotic spectrum with
   certified bounds on sigma_max).
4. Else the cheapest exact backend, however long it takes.

Backends without an estimate (``cost`` returns None) are chosen only by name or through
``--prefer``, or when no candidate has one. Ties go to the backend registered first (the
built-ins). The reason returned says which rule decided, with the estimate.

Third-party plugins can still answer ``specprof_select_backend`` before this one (pluggy
calls later registered plugins first) to replace the policy altogether.
"""

from __future__ import annotations

from typing import Any

from specprof.engine import hookimpl
from specprof.engine.errors import SpecprofError
from specprof.engine.types import Layer, Request

EXACT_BUDGET_S = 2.0
"""Longest estimated exact computation ``auto`` runs on one layer when all values are asked
for (about a 2e10-flop dense SVD). Above it an approximation with certified bounds is
preferred; ``--backend exact`` forces the exact one, ``--top-k K`` asks for exact top values."""


def _seconds(estimate: float) -> str:
    return f"~{estimate:.2g}s" if estimate >= 0.01 else "<0.01s"  # one word: tables wrap


def _estimate(backend: Any, layer: Layer, request: Request) -> float | None:
    """The backend's cost estimate; None where it gives none or cannot size the layer."""
    try:
        estimate = backend.cost(layer, request)
    except SpecprofError:
        return None
    return None if estimate is None else float(estimate)


def select_backend(layer: Layer, request: Request,
                   backends: dict[str, Any]) -> tuple[str, str] | None:
    """(name, reason) of the backend ``auto`` runs on ``layer``; None if none supports it."""
    supporting = {name: backend for name, backend in backends.items()
                  if backend.kind == "operator" and backend.supports(layer, request)}
    if not supporting:
        return None
    for name in request.prefer:
        if name in supporting:
            return name, f"preferred (--prefer {name})"
    costs = {name: _estimate(backend, layer, request) for name, backend in supporting.items()}
    order = list(supporting)
    costed = sorted((name for name in order if costs[name] is not None),
                    key=lambda name: (costs[name], order.index(name)))
    exact = [name for name in costed if supporting[name].exact]
    approximate = [name for name in costed if not supporting[name].exact]
    if exact:
        name = exact[0]
        estimate = costs[name]
        assert estimate is not None
        if request.top_k is not None:
            return name, f"top-{request.top_k}: cheapest exact, {_seconds(estimate)}"
        if estimate <= EXACT_BUDGET_S or not approximate:
            return name, f"cheapest exact, {_seconds(estimate)}"
    if approximate:
        name = approximate[0]
        slowest = f"exact {_seconds(costs[exact[0]] or 0.0)}" if exact else "no exact fits"
        return name, f"certified approx.; {slowest}"
    first = order[0]
    return first, supporting[first].supports(layer, request).reason or "no cost estimates"


@hookimpl
def specprof_select_backend(layer: Layer, request: Request,
                            backends: dict[str, Any]) -> tuple[str, str] | None:
    return select_backend(layer, request, backends)
