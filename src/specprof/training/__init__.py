"""Spectral control while training (torch only): certified, differentiable operator-norm bounds
of layers and of ``nn.Sequential`` chains, Sedghi-style clipping, and a monitor that profiles
the weights into the store as runs tagged with the training step.

Imported on demand (``import specprof`` does not import torch); needs the ``torch`` extra.
See docs/training.md.
"""

from __future__ import annotations

import importlib.util

from specprof.engine.errors import MissingExtraError

if importlib.util.find_spec("torch") is None:
    raise MissingExtraError("specprof.training", "torch")

from specprof.training.bounds import (
    OperatorNormBound,
    clip_operator_norm_,
    module_layer,
    operator_norm_bound,
)
from specprof.training.chain import LipschitzBound, lipschitz_bound, lipschitz_factors
from specprof.training.monitor import (
    SpectralMonitor,
    TrainingProfileConfig,
    layer_input_shapes,
)

__all__ = [
    "LipschitzBound",
    "OperatorNormBound",
    "SpectralMonitor",
    "TrainingProfileConfig",
    "clip_operator_norm_",
    "layer_input_shapes",
    "lipschitz_bound",
    "lipschitz_factors",
    "module_layer",
    "operator_norm_bound",
]
