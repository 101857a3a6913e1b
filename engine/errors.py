"""Errors that reach the user as one line: what went wrong, and what to do about it."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: control characters (ESC of ANSI/OSC sequences,
    BEL, backspace, C1 codes, ...) shown as ``\\xNN`` escapes instead of acted on. A layer
    name or a path comes from a file someone else wrote."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class SpecprofError(Exception):
    """A problem the user can fix. ``hint`` says how; the CLI prints both on one line."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return printable(" ".join(text.split()))


class ModelLoadError(SpecprofError):
    """The model file is missing, corrupt, of an unknown format, or needs a missing extra."""


class MissingExtraError(ModelLoadError):
    """An optional dependency is not installed."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(
            f"{what} needs the '{extra}' extra, which is not installed",
            f"run: pip install 'specprof[{extra}]'",
        )
        self.extra = extra


class InputShapeError(SpecprofError):
    """The input shape is missing, malformed, or does not fit the model."""


class BackendError(SpecprofError):
    """A backend was asked for something it cannot do."""


class StoreError(SpecprofError):
    """The results database cannot be reached, is of the wrong version, or refused a write."""
