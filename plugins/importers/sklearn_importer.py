"""The scikit-learn importer: fitted MLPClassifier/MLPRegressor objects and Pipelines holding one.

skl2onnx turns each dense layer into a MatMul (weights ``coefs_[i]``, in x out) plus an Add,
which the extractor reports as (out, in) matrices. Only in-memory objects are accepted:
a pickle or joblib file is a program, and unpickling one runs whatever code it holds, so
specprof never opens them. Users load their own trusted file in Python and pass the object.
sklearn and skl2onnx are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specprof.engine import hookimpl
from specprof.engine.base import Importer, ImportOptions
from specprof.engine.errors import InputShapeError, MissingExtraError, ModelLoadError
from specprof.engine.types import TARGET_OPSET

if TYPE_CHECKING:  # onnx is imported when a model is converted, not when listed
    import onnx

# skl2onnx writes preprocessing steps (StandardScaler, ...) in the ai.onnx.ml domain; version 3
# is the one onnx's checker and shape inference know for every opset specprof targets.
_ML_OPSET = 3


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _mlp_steps(obj: Any) -> list[Any]:
    """The MLP estimators in ``obj``: itself, or the steps of a (nested) Pipeline."""
    sklearn = sys.modules.get("sklearn")
    if sklearn is None:
        return []
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline

    if isinstance(obj, MLPClassifier | MLPRegressor):
        return [obj]
    if isinstance(obj, Pipeline):
        return [mlp for _, step in obj.steps for mlp in _mlp_steps(step)]
    return []


class SklearnImporter(Importer):
    """Fitted scikit-learn MLPs, alone or inside a Pipeline, from the Python API."""

    name = "sklearn"
    description = ("scikit-learn MLPClassifier/MLPRegressor and Pipelines holding one "
                   "(Python objects only; pickle files are refused)")
    framework = "scikit-learn"
    suffixes = (".joblib",)
    requires = ("sklearn", "skl2onnx")
    extra = "sklearn"

    def accepts(self, obj: Any) -> bool:
        # An sklearn object can only exist if sklearn is loaded: no import needed to refuse.
        return bool(_mlp_steps(obj))

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        if isinstance(source, str | Path):
            raise ModelLoadError(
                f"{source}: specprof does not open pickle/joblib files, because unpickling "
                "runs any code the file holds",
                "load the fitted model yourself in Python and pass it: "
                "specprof.load_model(model, input_shape=(n_features,))",
            )
        try:
            from skl2onnx import convert_sklearn
            from skl2onnx.common.data_types import FloatTensorType
            from sklearn.exceptions import NotFittedError
            from sklearn.utils.validation import check_is_fitted
        except ImportError as error:
            raise MissingExtraError("scikit-learn models", "sklearn") from error
        mlps = _mlp_steps(source)
        if not mlps:
            raise ModelLoadError(
                f"a {type(source).__name__} holds no MLPClassifier or MLPRegressor",
                "pass a fitted MLP or a Pipeline that ends in one",
            )
        try:
            check_is_fitted(source)
        except NotFittedError as error:
            raise ModelLoadError(f"the {type(source).__name__} is not fitted",
                                 "call fit() before profiling it") from error
        n_features = getattr(source, "n_features_in_", None) or mlps[0].n_features_in_
        if options.input_shape is not None and tuple(options.input_shape) != (n_features,):
            raise InputShapeError(
                f"input shape {options.input_shape} does not match the {n_features} features "
                f"the {type(source).__name__} was fitted on",
                f"pass input_shape=({n_features},) or leave it out",
            )
        # Probabilities as a plain tensor (no ZipMap): the ZipMap op yields a sequence of maps,
        # which has nothing to profile and which shape inference does not type.
        no_zipmap = {id(mlp): {"zipmap": False} for mlp in mlps if hasattr(mlp, "classes_")}
        try:
            with _quiet():
                return convert_sklearn(
                    source,
                    name=type(source).__name__,
                    initial_types=[("input", FloatTensorType([None, int(n_features)]))],
                    target_opset={"": TARGET_OPSET, "ai.onnx.ml": _ML_OPSET},
                    options=no_zipmap or None,
                )
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(f"skl2onnx cannot convert this {type(source).__name__} ({reason})",
                                 "profile the MLP step alone (pipeline[-1])") from error


@hookimpl
def specprof_register_importers() -> list[type]:
    return [SklearnImporter]
