"""The JAX importer: a pure function plus its parameters, converted to ONNX by jax2onnx.

A JAX model is a function, not a file, so this importer serves the Python API only::

    specprof.load_model(JaxFunction(apply, params), input_shape=(3, 32, 32))
    specprof.load_model((apply, params), input_shape=(3, 32, 32))   # the same

``apply(params, x)`` takes one batch ``x``; the parameters are traced as constants, so they
become the ONNX initializers specprof profiles. ``input_shape`` is required (a function has
no shape of its own) and is channels-first, (C, H, W), as for every framework; for a function
written channels-last (Flax's ``nn.Conv`` is NHWC) pass ``channels_last=True`` and the input
is transposed inside the traced function. jax and jax2onnx are imported inside functions only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specprof.engine import hookimpl
from specprof.engine.base import Importer, ImportOptions
from specprof.engine.errors import InputShapeError, MissingExtraError, ModelLoadError
from specprof.engine.types import TARGET_OPSET

if TYPE_CHECKING:  # onnx is imported when a model is converted, not when listed
    import onnx


@dataclass(frozen=True)
class JaxFunction:
    """A JAX model for specprof: ``apply(params, x)``, its ``params``, and the input layout."""

    apply: Callable[[Any, Any], Any]
    params: Any
    channels_last: bool = False
    name: str = "jax_model"


def _has_jax_arrays(tree: Any) -> bool:
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    return any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(tree))


def _as_function(obj: Any) -> JaxFunction | None:
    """``obj`` as a ``JaxFunction``, or None when it is not one nor an (apply, params) pair."""
    if isinstance(obj, JaxFunction):
        return obj
    if (isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0])
            and _has_jax_arrays(obj[1])):
        return JaxFunction(obj[0], obj[1], name=getattr(obj[0], "__name__", "jax_model"))
    return None


class JaxImporter(Importer):
    """JAX/Flax functions with their parameters (Python API) via jax2onnx."""

    name = "jax"
    description = "JAX/Flax: JaxFunction(apply, params) or an (apply, params) pair, via jax2onnx"
    framework = "jax"
    requires = ("jax", "jax2onnx")
    extra = "jax"

    def accepts(self, obj: Any) -> bool:
        return _as_function(obj) is not None

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        model = _as_function(source)
        if model is None:
            raise ModelLoadError(
                f"the jax importer takes a JaxFunction or an (apply, params) pair, "
                f"not a {type(source).__name__}",
                "pass specprof.plugins.importers.jax_importer.JaxFunction(apply, params)",
            )
        if options.input_shape is None:
            raise InputShapeError("a JAX function has no input shape of its own",
                                  "pass input_shape=(C, H, W) (or (FEATURES,)), channels first")
        try:
            import jax
            from jax2onnx import to_onnx
        except ImportError as error:
            raise MissingExtraError("JAX models", "jax") from error
        shape = tuple(int(d) for d in options.input_shape)
        rank = len(shape) + 1
        params = model.params

        def channels_first(x: Any) -> Any:
            if model.channels_last and rank >= 3:
                x = jax.numpy.transpose(x, (0, *range(2, rank), 1))
            return model.apply(params, x)

        try:
            proto = to_onnx(channels_first, [(1, *shape)], model_name=model.name,
                            opset=TARGET_OPSET, return_mode="proto")
        except (TypeError, ValueError, NotImplementedError, KeyError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(f"jax2onnx could not convert '{model.name}' ({reason})",
                                 "check that apply(params, x) runs under jax.jit on this input shape"
                                 ) from error
        import onnx

        if not isinstance(proto, onnx.ModelProto):
            raise ModelLoadError("jax2onnx returned no ONNX model", "upgrade jax2onnx")
        return proto


@hookimpl
def specprof_register_importers() -> list[type]:
    return [JaxImporter]
