"""Where third-party libraries' log lines go: nowhere by default, to stderr with ``--verbose``.

TensorFlow, absl, tf2onnx, onnxruntime, JAX and torch log through Python's ``logging`` (and
Python's ``warnings``); with no handler configured, Python prints every warning on stderr, so a
user asking for one line would get the libraries' lines as well. The CLI calls
``route_third_party_logs`` once per command, before any of these libraries is imported.
TensorFlow's native (C++) lines are silenced where it is used (``tf_convert.quiet_tensorflow``),
unless ``VERBOSE_ENV`` is set, which ``--verbose`` does.
"""

from __future__ import annotations

import logging
import os
import sys

THIRD_PARTY_LOGGERS = ("tensorflow", "absl", "tf2onnx", "onnxruntime", "onnxscript", "jax",
                       "jax2onnx", "jaxlib", "torch", "h5py", "keras", "py.warnings")
"""Loggers of the libraries specprof drives (``py.warnings``: Python warnings, once routed)."""
VERBOSE_ENV = "SPECPROF_VERBOSE"
"""Set to 1 by ``--verbose``: converters then let their native log lines through too."""


def route_third_party_logs(verbose: bool) -> None:
    """Send the third-party loggers and Python warnings to stderr when ``verbose``, else
    nowhere (a ``NullHandler``, not propagated). specprof's own messages are not affected."""
    logging.captureWarnings(True)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if getattr(old, "specprof_route", False):
                logger.removeHandler(old)
        handler: logging.Handler = (logging.StreamHandler(sys.stderr) if verbose
                                    else logging.NullHandler())
        handler.specprof_route = True  # type: ignore[attr-defined]
        if verbose:
            handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
