"""Helpers for the importers that convert TensorFlow models (Keras, SavedModel, TFLite) with
tf2onnx: importing the converter, silencing it, checking and laying out what it returns.

tensorflow, tf2onnx and onnx are imported inside the functions that need them: tensorflow
takes seconds to import, and ``import specprof`` must stay light.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from specprof.engine.errors import MissingExtraError, ModelLoadError

if TYPE_CHECKING:
    import onnx


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Silence TensorFlow's and tf2onnx's log lines and warnings; failures still raise.

    ``TF_CPP_MIN_LOG_LEVEL`` only takes effect if set before tensorflow is first imported,
    so it is set (when the user has not set it) for the duration of the call.
    """
    if os.environ.get("SPECPROF_VERBOSE") == "1":  # --verbose (engine/logs.py): show it all
        yield
        return
    previous = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if previous is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    loggers = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx", "absl")]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                native_stderr_silenced():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if previous is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration: TensorFlow's C++ side (absl,
    oneDNN) writes its log lines there directly, before any Python setting can stop them.
    Python exceptions still propagate and are reported by the caller."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (e.g. captured by a test runner)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (converters write whole pages)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def import_tf2onnx(what: str, extra: str) -> tuple[Any, Any]:
    """(tensorflow, tf2onnx), or ``MissingExtraError`` naming ``extra``."""
    try:
        with quiet_tensorflow():
            import tensorflow as tf
            import tf2onnx
    except ImportError as error:
        raise MissingExtraError(what, extra) from error
    return tf, tf2onnx


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Ops tf2onnx could not convert: it leaves them as nodes in a non-ONNX domain."""
    known = {"", "ai.onnx", "ai.onnx.ml"}
    return sorted({f"{node.op_type}" for node in model.graph.node if node.domain not in known})


def check_converted(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Refuse a conversion that left TensorFlow ops in the graph, naming them."""
    ops = unsupported_ops(model)
    if ops:
        raise ModelLoadError(
            f"{source}: tf2onnx cannot convert the op(s) {', '.join(ops)}",
            "these ops have no ONNX equivalent; export the model without them "
            "(e.g. a non-streaming, float or int8 variant)",
        )
    return model


def inputs_channels_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every channels-last graph input of rank >= 3 channels-first, in place.

    The input keeps its name (users and ``--input-shape`` see it) and gets the (N, C, *spatial)
    shape; a Transpose to (N, *spatial, C) feeds the nodes that read it.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    front = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        rank = len(dims)
        if rank < 3:
            continue
        inner = f"{value.name}__channels_last"
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
        front.append(helper.make_node("Transpose", [value.name], [inner],
                                      perm=[0, *range(2, rank), 1],
                                      name=f"{value.name}__to_channels_last"))
        old = [onnx.TensorShapeProto.Dimension() for _ in range(rank)]
        for copy, dim in zip(old, dims, strict=True):
            copy.CopyFrom(dim)
        reordered = [old[0], old[-1], *old[1:-1]]
        del dims[:]
        for dim in reordered:
            dims.add().CopyFrom(dim)
    if front:
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(front + nodes)
    return model
