"""Hypergraph class separation through the filter-SVD directions (Praggastis et al. 2022).

For each linear layer with filter SVD ``reshape(W, c_out, -1) = U S V^T`` (stored by the
``filter`` backend), an input's activation ``a`` (one c_out vector per spatial position p) is
projected on the left singular vectors: ``s_i(p) = u_i^T (a(p) - b)``. Since
``a(p) - b = W x_p = U S V^T x_p`` (``x_p`` the input patch), ``s_i(p) = sigma_i v_i^T x_p``:
the projection already carries the singular value. The projections are aggregated over space
(max |s|, mean |s|, L2, or DeepDataProfiler's |mean s|), ranked, and the smallest set of
directions whose share of the total reaches ``threshold`` is the input's set of *influential*
directions (DeepDataProfiler's rule, default 0.1).

Hypergraph per layer (hypernetx): nodes are the layer's directions, one hyperedge per input
(its influential directions) and one per class (the directions influential for at least
``class_fraction`` of the class's inputs). Metrics per layer are defined in docs/hypergraph.md:
pairwise class Jaccard overlap, 1-connected components of the class hypergraph, modularity of
the class partition, and separation = 1 - mean Jaccard.

Inputs stream through onnxruntime batch by batch; per layer only class usage counts (and, for
the input hyperedges, one bit per input and direction) are kept, so memory does not grow with
the activations of the whole data set.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import AnalysisContext, Analyzer
from specprof.engine.errors import SpecprofError
from specprof.engine.jsonable import jsonable
from specprof.engine.types import Layer, LoadedModel, Spectrum

Aggregate = Literal["max", "mean", "l2", "signed-mean"]
AGGREGATES: tuple[str, ...] = ("max", "mean", "l2", "signed-mean")
ANALYZER = "hypergraph"
FILTER_BACKEND = "filter"
COMPONENT_S = 1
"""Class hyperedges are adjacent when they share at least this many directions."""
METRIC_COLUMNS = ["layer", "depth", "op_type", "n_directions", "n_inputs", "n_classes",
                  "mean_influential", "separation", "mean_jaccard", "min_jaccard",
                  "max_jaccard", "n_components", "modularity", "n_empty_classes"]
EXPORT_FORMAT = "specprof-hypergraph"
EXPORT_VERSION = 1


class HypergraphError(SpecprofError):
    """The hypergraph analysis cannot run with the given model, data or options."""


# --- the mathematics, on arrays -----------------------------------------------------------------


def channel_first(activation: np.ndarray, layer: Layer) -> np.ndarray:
    """A layer output as (batch, channels, positions): conv (N, C, *spatial); matrices
    (N, ..., out) with the leading extra axes as positions, or (out, N) for ``W @ X``."""
    out = layer.out_channels
    if layer.is_conv:
        return activation.reshape(activation.shape[0], activation.shape[1], -1)
    if activation.ndim == 2 and activation.shape[1] != out and activation.shape[0] == out:
        activation = activation.T  # the weight was the left operand: columns are samples
    moved = np.moveaxis(activation, -1, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def project(activation: np.ndarray, left_vectors: np.ndarray,
            bias: np.ndarray | None = None) -> np.ndarray:
    """s[n, i, p] = u_i^T (a[n, :, p] - b) for activations (N, C, P) and U (C, r)."""
    centred = activation.astype(np.float64, copy=False)
    if bias is not None:
        centred = centred - np.asarray(bias, dtype=np.float64).reshape(1, -1, 1)
    return np.einsum("cr,ncp->nrp", np.asarray(left_vectors, dtype=np.float64), centred,
                     optimize=True)


def aggregate(projections: np.ndarray, how: str = "max") -> np.ndarray:
    """(N, r, P) -> (N, r): max |s|, mean |s|, L2 norm over positions, or |mean s| (DDP's)."""
    if how == "max":
        return np.abs(projections).max(axis=2)
    if how == "mean":
        return np.abs(projections).mean(axis=2)
    if how == "l2":
        return np.sqrt(np.square(projections).sum(axis=2))
    if how == "signed-mean":
        return np.abs(projections.mean(axis=2))
    raise HypergraphError(f"unknown aggregate '{how}'", f"use one of: {', '.join(AGGREGATES)}")


def influential_directions(scores: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Boolean (N, r): per row, the smallest set of largest scores whose sum reaches
    ``threshold`` of the row's total. A row of zeros has no influential direction.

    Ties are broken by direction index (a stable sort), so the answer is deterministic.
    """
    if not 0 < threshold <= 1:
        raise HypergraphError(f"threshold must be in (0, 1], not {threshold}", "e.g. --threshold 0.1")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return influential_directions(scores[None], threshold)[0]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    total = ranked.sum(axis=1, keepdims=True)
    share = np.divide(np.cumsum(ranked, axis=1), total, out=np.zeros_like(ranked), where=total > 0)
    # k = 1 + the first rank where the cumulative share reaches the threshold (rounding-safe).
    reached = share >= threshold * (1 - 1e-12)
    count = np.where(total[:, 0] > 0, reached.argmax(axis=1) + 1, 0)
    keep_ranked = np.arange(scores.shape[1])[None, :] < count[:, None]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, keep_ranked, axis=1)
    return mask


def class_edges(counts: dict[Any, np.ndarray], sizes: dict[Any, int],
                class_fraction: float = 0.5) -> dict[Any, frozenset[int]]:
    """Per class, the directions influential for at least ``class_fraction`` of its inputs."""
    if not 0 < class_fraction <= 1:
        raise HypergraphError(f"class fraction must be in (0, 1], not {class_fraction}",
                              "e.g. class_fraction=0.5")
    return {label: frozenset(np.flatnonzero(counts[label] >= class_fraction * sizes[label] - 1e-9)
                             .tolist()) for label in counts}


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """|a & b| / |a | b|, and 1 for two empty sets (nothing tells them apart)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def jaccard_matrix(edges: dict[Any, frozenset[int]]) -> Any:
    """The pairwise Jaccard overlaps of class hyperedges as a labelled DataFrame."""
    import pandas as pd

    labels = list(edges)
    values = [[jaccard(edges[a], edges[b]) for b in labels] for a in labels]
    return pd.DataFrame(values, index=labels, columns=labels)


def separation(edges: dict[Any, frozenset[int]]) -> tuple[float, float, float, float]:
    """(separation, mean, min, max Jaccard) over the pairs of classes; separation =
    1 - mean Jaccard: 1 when all class hyperedges are disjoint, 0 when all are identical."""
    pairs = [jaccard(edges[a], edges[b]) for a, b in itertools.combinations(list(edges), 2)]
    if not pairs:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(np.mean(pairs))
    return 1.0 - mean, mean, float(min(pairs)), float(max(pairs))


def n_components(edges: dict[Any, frozenset[int]], s: int = COMPONENT_S) -> int:
    """Number of s-connected components of the class hypergraph (hypernetx ``s_components``
    over edges); a class with an empty hyperedge is a component of its own."""
    import hypernetx as hnx

    nonempty = {f"class:{label}": sorted(nodes) for label, nodes in edges.items() if nodes}
    empty = len(edges) - len(nonempty)
    if not nonempty:
        return empty
    graph = hnx.Hypergraph(nonempty)
    return empty + sum(1 for _ in graph.s_components(s=s, edges=True))


def class_modularity(counts: dict[Any, np.ndarray], size_sums: dict[Any, int]) -> float:
    """Newman modularity of the class partition of the inputs in the weighted clique expansion
    of the dual hypergraph: inputs i != j joined with weight |e_i & e_j| (shared influential
    directions), as ``networkx.community.modularity(G, classes, weight="weight")`` computes it.

    Closed form from per-class sums, without the N x N graph: with B the (N, r) incidence,
    c_k = B^T 1_k (``counts[k]``), c = sum_k c_k and t_k = sum over class k of |e_i|
    (``size_sums[k]``): within-class weight (ordered pairs) W_k = |c_k|^2 - t_k, class degree
    K_k = c_k . c - t_k, 2m = |c|^2 - sum_k t_k, and Q = sum_k W_k / 2m - (K_k / 2m)^2.
    """
    labels = list(counts)
    if not labels:
        return math.nan
    c = np.sum([counts[k].astype(np.float64) for k in labels], axis=0)
    two_m = float(c @ c) - float(sum(size_sums[k] for k in labels))
    if two_m <= 0:
        return math.nan
    q = 0.0
    for k in labels:
        ck = counts[k].astype(np.float64)
        within = float(ck @ ck) - size_sums[k]
        degree = float(ck @ c) - size_sums[k]
        q += within / two_m - (degree / two_m) ** 2
    return q


# --- streaming accumulation ---------------------------------------------------------------------


@dataclass
class LayerState:
    """What one layer keeps while inputs stream: class usage counts and packed input edges."""

    layer: Layer
    depth: int
    left_vectors: np.ndarray
    sigma: np.ndarray
    layer_id: int | None = None
    spectrum_id: int | None = None
    counts: dict[int, np.ndarray] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    size_sums: dict[int, int] = field(default_factory=dict)
    packed: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.left_vectors.shape[1])

    def update(self, y: np.ndarray, activation: np.ndarray, options: HypergraphOptions) -> None:
        a = channel_first(activation, self.layer)
        if a.shape[1] != self.left_vectors.shape[0]:
            raise HypergraphError(
                f"layer {self.layer.name}: its output has {a.shape[1]} channels but its filter "
                f"SVD has {self.left_vectors.shape[0]}", "exclude it with --layers")
        scores = aggregate(project(a, self.left_vectors, self.layer.bias), options.aggregate)
        if options.weight == "sigma":
            scores = scores * self.sigma[None, :]
        mask = influential_directions(scores, options.threshold)
        sizes = mask.sum(axis=1)
        for label in np.unique(y):
            rows = y == label
            key = int(label)
            self.counts[key] = self.counts.get(key, 0) + mask[rows].sum(axis=0)
            self.sizes[key] = self.sizes.get(key, 0) + int(rows.sum())
            self.size_sums[key] = self.size_sums.get(key, 0) + int(sizes[rows].sum())
        if options.input_edges:
            self.packed.append(np.packbits(mask, axis=1))
            self.labels.append(y.copy())

    def input_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, r) influential masks and (N,) labels of every input seen (input_edges only)."""
        if not self.packed:
            return np.zeros((0, self.rank), dtype=bool), np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(np.concatenate(self.packed), axis=1, count=self.rank).astype(bool)
        return bits, np.concatenate(self.labels)


@dataclass(frozen=True)
class HypergraphOptions:
    """The analysis parameters; stored with the results (they identify them)."""

    threshold: float = 0.1
    aggregate: str = "max"
    class_fraction: float = 0.5
    weight: Literal["none", "sigma"] = "none"
    input_edges: bool = True

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "aggregate": self.aggregate,
                "class_fraction": self.class_fraction, "weight": self.weight,
                "s": COMPONENT_S}

    def check(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise HypergraphError(f"unknown aggregate '{self.aggregate}'",
                                  f"use one of: {', '.join(AGGREGATES)}")
        if self.weight not in ("none", "sigma"):
            raise HypergraphError(f"unknown weight '{self.weight}'", "use 'none' or 'sigma'")
        influential_directions(np.ones((1, 1)), self.threshold)
        class_edges({}, {}, self.class_fraction)


def node_name(layer: str, direction: int) -> str:
    return f"{layer}:{direction}"


def layer_metrics(state: LayerState, options: HypergraphOptions) -> dict[str, Any]:
    """The per-layer metrics row (see docs/hypergraph.md for the definitions)."""
    edges = class_edges(state.counts, state.sizes, options.class_fraction)
    sep, mean_j, min_j, max_j = separation(edges)
    n_inputs = sum(state.sizes.values())
    return {
        "layer": state.layer.name, "depth": state.depth, "op_type": state.layer.op_type,
        "n_directions": state.rank, "n_inputs": n_inputs, "n_classes": len(edges),
        "mean_influential": sum(state.size_sums.values()) / n_inputs if n_inputs else math.nan,
        "separation": sep, "mean_jaccard": mean_j, "min_jaccard": min_j, "max_jaccard": max_j,
        "n_components": n_components(edges),
        "modularity": class_modularity(state.counts, state.size_sums),
        "n_empty_classes": sum(1 for nodes in edges.values() if not nodes),
    }


def incidence(state: LayerState, options: HypergraphOptions, class_names: Sequence[str] = ()
              ) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(incidence, edge properties, node properties) of one layer's hypergraph: edges
    ``class:<name>`` then ``input:<k>`` (k: position in the data), nodes ``<layer>:<i>``."""
    name = state.layer.name

    def label_name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    edges: dict[str, list[str]] = {}
    edge_props: dict[str, dict[str, Any]] = {}
    for label, nodes in sorted(class_edges(state.counts, state.sizes, options.class_fraction).items()):
        key = f"class:{label_name(label)}"
        edges[key] = [node_name(name, i) for i in sorted(nodes)]
        edge_props[key] = {"kind": "class", "label": label, "n_inputs": state.sizes[label]}
    masks, labels = state.input_masks()
    for k, (row, label) in enumerate(zip(masks, labels, strict=True)):
        key = f"input:{k}"
        edges[key] = [node_name(name, int(i)) for i in np.flatnonzero(row)]
        edge_props[key] = {"kind": "input", "label": int(label)}
    node_props = {node_name(name, i): {"layer": name, "direction": i,
                                        "sigma": float(state.sigma[i])} for i in range(state.rank)}
    return edges, edge_props, node_props


def to_hypernetx(edges: dict[str, list[str]], edge_props: dict[str, dict[str, Any]],
                 node_props: dict[str, dict[str, Any]]) -> Any:
    """A hypernetx Hypergraph with the edge and node properties (empty edges are dropped by
    hypernetx; their class still counts in the metrics)."""
    import hypernetx as hnx

    used = {node for nodes in edges.values() for node in nodes}
    return hnx.Hypergraph({key: nodes for key, nodes in edges.items() if nodes},
                          edge_properties={k: v for k, v in edge_props.items() if edges[k]},
                          node_properties={k: v for k, v in node_props.items() if k in used})


def class_hypergraph(graph: Any) -> Any:
    """The class hyperedges of a layer's hypergraph (drops the per-input ones)."""
    return graph.restrict_to_edges([e for e in graph.edges if str(e).startswith("class:")])


# --- the analysis: spectra from the store, activations from onnxruntime --------------------------


def select_layers(layers: Sequence[Layer], patterns: Sequence[str] | str | None) -> list[Layer]:
    """The layers whose name matches one of the globs (all when None)."""
    if patterns is None:
        return list(layers)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [layer for layer in layers
              if any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in patterns)]
    if not chosen:
        names = ", ".join(layer.name for layer in layers[:8])
        raise HypergraphError(f"no layer matches {', '.join(patterns)}",
                              f"the model's layers are: {names}{', ...' if len(layers) > 8 else ''}")
    return chosen


def _filter_spectra(store: Any, run_id: int) -> dict[str, tuple[dict[str, Any], Spectrum]]:
    found = {}
    for row, spectrum in store.spectra_for_run(run_id, backend=FILTER_BACKEND, kind="filter"):
        if spectrum.left_vectors is not None:
            found[row["name"]] = (row, spectrum)
    return found


def find_filter_run(store: Any, model: LoadedModel, layers: Sequence[Layer]) -> int | None:
    """The newest complete run of this model (same content) with filter spectra, if its
    spectra, with left singular vectors, cover ``layers``; None otherwise."""
    from specprof.engine.errors import StoreError

    model_id, _ = store.add_model(model)
    try:
        run_id = int(store.find_run(model_id=model_id, backend=FILTER_BACKEND, kind="filter"))
    except StoreError:  # none stored: the caller computes them
        return None
    wanted = {layer.name for layer in layers}
    return run_id if wanted <= set(_filter_spectra(store, run_id)) else None


def ensure_filter_run(store: Any, model: LoadedModel, layers: Sequence[Layer], registry: Any,
                      say: Callable[[str], None]) -> int:
    """A run with the filter spectra of ``layers``: a stored one, or one computed now."""
    run_id = find_filter_run(store, model, layers)
    if run_id is not None:
        return run_id
    from specprof.engine.profile import ProfileConfig, profile_model

    say(f"no stored filter spectra for {model.name}: computing them with the '{FILTER_BACKEND}' "
        "backend and storing them")
    result = profile_model(model, ProfileConfig(backends=(FILTER_BACKEND,)), store, registry)
    missing = [o.layer.name for o in result.outcomes
               if o.status not in ("ok", "reused") and o.layer.name in {x.name for x in layers}]
    if missing:
        reasons = "; ".join(f"{o.layer.name}: {o.reason}" for o in result.outcomes
                            if o.layer.name in missing)
        raise HypergraphError(f"the filter SVD failed for {len(missing)} layer(s) ({reasons})",
                              "exclude them with --layers")
    return result.run_id


@dataclass
class HypergraphResult:
    """What one analysis produced: per-layer hypergraphs and metrics, and where they are stored."""

    hypergraphs: dict[str, Any]
    metrics: Any
    run_id: int
    params: dict[str, Any]
    model: str
    incidences: dict[str, tuple[dict[str, list[str]], dict[str, Any], dict[str, Any]]]


def analyze_run(store: Any, run_id: int, model: LoadedModel, data: Any, *,
                layers: Sequence[str] | str | None = None, options: HypergraphOptions | None = None,
                batch_size: int = 64, on_batch: Callable[[int], None] | None = None,
                threads: int | None = None) -> HypergraphResult:
    """Run ``model`` on ``data``, build the hypergraphs of the run's filter spectra, and store
    the metrics (``analyses``) and hypergraphs of the run."""
    import pandas as pd

    from specprof.plugins.analyzers.activations import ActivationRunner, model_input
    from specprof.plugins.analyzers.datasets import open_data

    options = options or HypergraphOptions()
    options.check()
    if model.proto is None:
        raise HypergraphError(f"model {model.name} was loaded without its ONNX graph",
                              "load it again with specprof.load_model")
    chosen = select_layers(model.layers, layers)
    spectra = _filter_spectra(store, run_id)
    missing = [layer.name for layer in chosen if layer.name not in spectra]
    if missing:
        raise HypergraphError(f"run {run_id} has no filter spectra with vectors for "
                              f"{', '.join(missing[:4])}",
                              f"profile the model with --backend {FILTER_BACKEND}")
    source = open_data(data, model_input(model.proto).sample_shape, batch_size)
    states = [LayerState(layer, layer.index + 1, np.asarray(spectra[layer.name][1].left_vectors),
                         np.asarray(spectra[layer.name][1].values),
                         layer_id=spectra[layer.name][0].get("id"),
                         spectrum_id=spectra[layer.name][0].get("spectrum_id"))
              for layer in chosen]
    runner = ActivationRunner(model.proto, chosen, threads)
    for y, activations in runner.stream(source.batches):
        for state in states:
            state.update(y, activations[state.layer.name], options)
        if on_batch is not None:
            on_batch(len(y))
    if not states or not states[0].sizes:
        raise HypergraphError(f"no inputs in {source.description}", "give labelled inputs")
    if len(states[0].sizes) < 2:
        raise HypergraphError(f"all inputs in {source.description} have the same label",
                              "class separation needs inputs of at least two classes")
    rows = [layer_metrics(state, options) for state in states]
    params = options.params()
    store.add_analysis(run_id, ANALYZER, params,
                       [{"layer_id": s.layer_id, "spectrum_id": s.spectrum_id, "metrics": r}
                        for s, r in zip(states, rows, strict=True)])
    graphs, incidences = {}, {}
    for state in states:
        edges, edge_props, node_props = incidence(state, options, source.class_names)
        incidences[state.layer.name] = (edges, edge_props, node_props)
        store.add_hypergraph(run_id, ANALYZER, state.layer.name, params, edges, edge_props,
                             node_props)
        graphs[state.layer.name] = to_hypernetx(edges, edge_props, node_props)
    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    frame.attrs.update(run_id=run_id, params=params)
    return HypergraphResult(graphs, frame, run_id, params, model.name, incidences)


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda _text: None) if quiet else (lambda text: print(f"specprof: {text}", file=sys.stderr))


def run_hypergraph(model: Any, data: Any, *, db: str | None = None,
                   layers: Sequence[str] | str | None = None, threshold: float = 0.1,
                   aggregate: str = "max", class_fraction: float = 0.5,
                   weight: Literal["none", "sigma"] = "none", batch_size: int = 64,
                   input_edges: bool = True, input_shape: Any = None, quiet: bool = False,
                   registry: Any = None, on_batch: Callable[[int], None] | None = None
                   ) -> HypergraphResult:
    """``hypergraph`` with everything it produced (run id, incidences for export)."""
    from specprof.engine.loading import load_model
    from specprof.engine.plugins import get_registry
    from specprof.engine.store import Store

    options = HypergraphOptions(threshold=threshold, aggregate=aggregate,
                                class_fraction=class_fraction, weight=weight,
                                input_edges=input_edges)
    options.check()
    registry = registry or get_registry()
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, input_shape=input_shape, registry=registry)
    chosen = select_layers(loaded.layers, layers)
    if isinstance(data, str | os.PathLike):
        # Check a data file before anything is computed or stored for it.
        from specprof.plugins.analyzers.activations import model_input
        from specprof.plugins.analyzers.datasets import open_data

        open_data(data, model_input(loaded.proto).sample_shape, batch_size)
    with Store.open(db) as store:
        run_id = ensure_filter_run(store, loaded, chosen, registry, _say(quiet))
        return analyze_run(store, run_id, loaded, data, layers=[x.name for x in chosen],
                           options=options, batch_size=batch_size, on_batch=on_batch)


def hypergraph(model: Any, data: Any, *, db: str | None = None,
               layers: Sequence[str] | str | None = None, threshold: float = 0.1,
               aggregate: str = "max", class_fraction: float = 0.5,
               weight: Literal["none", "sigma"] = "none", batch_size: int = 64,
               input_edges: bool = True, input_shape: Any = None, quiet: bool = False,
               registry: Any = None) -> tuple[dict[str, Any], Any]:
    """Class separation through ``model``'s filter-SVD directions, layer by layer.

    ``model``: a path or model object (or a ``LoadedModel``); ``data``: a ``.npz`` with ``x``
    and ``y``, an image folder with class subfolders, ``(x, y)`` arrays, or an iterable of
    ``(x, y)`` pairs. ``layers``: name globs (default all). ``threshold``: share of the total
    aggregated projection the influential directions reach; ``aggregate``: max, mean, l2 or
    signed-mean over positions; ``class_fraction``: how many of a class's inputs must use a
    direction for it to be in the class hyperedge; ``weight='sigma'`` multiplies the scores by
    sigma_i once more (the projection already carries it).

    The filter spectra come from the store (computed and stored first if missing); metrics and
    hypergraphs are stored with that run. Returns ({layer: hypernetx.Hypergraph}, metrics
    DataFrame with the run id in ``attrs['run_id']``).
    """
    result = run_hypergraph(model, data, db=db, layers=layers, threshold=threshold,
                            aggregate=aggregate, class_fraction=class_fraction, weight=weight,
                            batch_size=batch_size, input_edges=input_edges,
                            input_shape=input_shape, quiet=quiet, registry=registry)
    return result.hypergraphs, result.metrics


# --- export -------------------------------------------------------------------------------------


def export_document(result: HypergraphResult) -> dict[str, Any]:
    """The JSON incidence-list document (schemas/hypergraph-export.schema.json)."""
    metrics = {row["layer"]: row for row in result.metrics.to_dict("records")}
    layers = []
    for name, (edges, edge_props, node_props) in result.incidences.items():
        row = metrics[name]
        layers.append({
            "layer": name, "depth": int(row["depth"]),
            "metrics": {k: v for k, v in row.items() if k not in ("layer", "depth")},
            "nodes": [{"id": node, **props} for node, props in node_props.items()],
            "edges": [{"id": edge, **edge_props[edge], "nodes": nodes}
                      for edge, nodes in edges.items()],
        })
    return jsonable({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": result.model,
                   "run": result.run_id, "params": result.params, "layers": layers})


def write_export(result: HypergraphResult, path: str | Path) -> Path:
    target = Path(path)
    target.write_text(json.dumps(export_document(result), indent=1))
    return target


# --- plugin -------------------------------------------------------------------------------------


TABLE_COLUMNS = ["layer", "depth", "op_type", "separation", "mean_jaccard", "n_components",
                 "modularity"]


class HypergraphAnalyzer(Analyzer):
    """Reads a run's filter spectra and stores per-layer class-separation metrics."""

    name: ClassVar[str] = ANALYZER
    description: ClassVar[str] = ("class separation through filter-SVD directions "
                                  "(Praggastis et al. 2022), as hypergraphs")
    requires: ClassVar[tuple[str, ...]] = ("hypernetx", "onnxruntime")
    extra: ClassVar[str | None] = "hypergraph"

    def analyze(self, context: AnalysisContext, run_id: int) -> Any:
        """``context.options``: ``model`` (the run's model: a path, a model object or a
        ``LoadedModel``), ``data``, and any of layers, threshold, aggregate, class_fraction,
        weight, batch_size, input_edges, input_shape."""
        options = context.options
        if options.get("model") is None or options.get("data") is None:
            raise HypergraphError("the hypergraph analyzer needs the model and labelled data",
                                  "give MODEL as a file and -O data=PATH")
        loaded = options["model"]
        if not isinstance(loaded, LoadedModel):
            loaded = context.load(loaded, input_shape=options.get("input_shape"))
        fields = {k: options[k] for k in ("threshold", "aggregate", "class_fraction", "weight",
                                          "input_edges") if k in options}
        with context.track(None, f"running {loaded.name}") as tick:
            result = analyze_run(context.store, run_id, loaded, options["data"],
                                 layers=options.get("layers"),
                                 options=HypergraphOptions(**fields),
                                 batch_size=int(options.get("batch_size", 64)), on_batch=tick)
        result.metrics.attrs.update(
            title=f"run {run_id}: class separation of {loaded.name}",
            table_columns=TABLE_COLUMNS)
        return result.metrics


@hookimpl
def specprof_register_analyzers() -> list[type]:
    return [HypergraphAnalyzer]


@hookimpl
def specprof_register_commands(cli: Any) -> None:
    import click

    from specprof.engine.cli_common import DB_OPTION, OUTPUT_FORMATS, emit

    @cli.command(name="hypergraph")
    @click.argument("model", type=click.Path(dir_okay=True))
    @click.option("--data", required=True, metavar="PATH",
                  help="Labelled inputs: a .npz with x and y, or a folder of images in class "
                       "subfolders (already at the model's input size).")
    @click.option("--layers", metavar="GLOB,...", help="Only these layers (name globs).")
    @click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.1,
                  show_default=True, help="Share of the total projection the influential "
                                          "directions of an input reach.")
    @click.option("--aggregate", type=click.Choice(list(AGGREGATES)), default="max",
                  show_default=True, help="How projections are pooled over positions.")
    @click.option("--class-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.5,
                  show_default=True, help="Share of a class's inputs that must use a direction.")
    @click.option("--weight", type=click.Choice(["none", "sigma"]), default="none",
                  show_default=True, help="'sigma': rank by projection times sigma_i.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
    @click.option("--input-shape", metavar="C,H,W", help="Input size, for dynamic models.")
    @DB_OPTION
    @click.option("--format", "--output-format", "fmt", type=OUTPUT_FORMATS, default="table",
                  show_default=True)
    @click.option("--export", type=click.Path(dir_okay=False), metavar="FILE.json",
                  help="Also write the hypergraphs as a JSON incidence list.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar or messages.")
    def hypergraph_command(model: str, data: str, layers: str | None, threshold: float,
                           aggregate: str, class_fraction: float, weight: str, batch_size: int,
                           input_shape: str | None, db: str | None, fmt: str,
                           export: str | None, quiet: bool) -> None:
        """How well the classes of DATA separate at each layer of MODEL (filter-SVD hypergraph)."""
        from specprof.engine.progress import layer_progress

        quiet_bar = quiet or fmt != "table"
        # The number of inputs is unknown until the data is open: an open-ended bar.
        with layer_progress(None, f"running {model} on {data}", quiet_bar) as tick:  # type: ignore[arg-type]
            result = run_hypergraph(model, data, db=db, layers=layers, threshold=threshold,
                                    aggregate=aggregate, class_fraction=class_fraction,
                                    weight=weight,  # type: ignore[arg-type]
                                    batch_size=batch_size, input_shape=input_shape,
                                    quiet=quiet, on_batch=tick)
        if export is not None:
            write_export(result, export)
        title = (f"run {result.run_id}: class separation of {result.model} "
                 f"(threshold {threshold}, {aggregate})")
        emit(result.metrics, fmt, title, columns=TABLE_COLUMNS if fmt == "table" else None)

