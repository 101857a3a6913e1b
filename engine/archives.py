"""Zip archives checked before any framework opens them.

PyTorch (``torch.save``, ``torch.jit.save``, ``torch.export.save``) and Keras 3 (``.keras``)
write their models as zip files, and their loaders trust what the archive says. A model from
the internet may lie: member names that climb out of a folder (``../x``, ``/etc/x``), a bomb
(sizes declared far beyond what the file holds, or a ratio no model compresses to), more
members than any model has, or members a model of that kind never has. ``check_zip`` reads
the central directory only (no member is decompressed) and refuses all of these with one line.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from specprof.engine.errors import ModelLoadError, printable

MAX_MEMBERS = 200_000
"""More members than any model archive has (a torch checkpoint: one per tensor, plus a few)."""
MAX_RATIO = 1000
"""Largest declared ratio of a member's size to its compressed size: weights compress ~1.1x,
JSON and code ~10x; a bomb compresses runs of zeros ~1000x and more."""
MAX_TOTAL = 2**40
"""Largest declared total size of an archive's members (1 TiB)."""
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ZipSummary:
    """What an accepted archive holds: its member names and their declared total size."""

    names: tuple[str, ...]
    total_size: int


def _bad_name(name: str) -> str:
    """Why ``name`` is not a safe member name; '' when it is."""
    if not name or "\x00" in name:
        return "an empty name or a NUL byte"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "an absolute path"
    if "\\" in name:
        return "a backslash (a Windows path)"
    if ".." in PurePosixPath(name).parts:
        return "a '..' that climbs out of the archive"
    return ""


def check_zip(path: Path, what: str, expected: Callable[[str], bool] | None = None,
              hint: str = "re-save the model with its framework's own save function") -> ZipSummary:
    """Refuse ``path`` unless it is a zip archive whose members are safe to hand to a loader.

    ``what`` names the format in messages ("PyTorch archive"); ``expected(name)`` says whether
    a member belongs in an archive of that kind (None: any name). Raises ``ModelLoadError``.
    """
    try:
        file_size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
        raise ModelLoadError(f"{path} is not a readable {what} ({type(error).__name__}: "
                             f"{printable(str(error))})", hint) from error
    if len(members) > MAX_MEMBERS:
        raise ModelLoadError(f"{path} has {len(members)} members, more than any {what} "
                             f"({MAX_MEMBERS})", hint)
    seen: set[str] = set()
    total = 0
    for member in members:
        name = member.filename
        shown = printable(repr(name))
        why = _bad_name(name)
        if why:
            raise ModelLoadError(f"{path} holds the member {shown} with {why}", hint)
        if name in seen:
            raise ModelLoadError(f"{path} holds the member {shown} twice", hint)
        seen.add(name)
        if expected is not None and not expected(name):
            raise ModelLoadError(f"{path} holds the member {shown}, which a {what} never has",
                                 hint)
        if member.header_offset + member.compress_size > file_size:
            raise ModelLoadError(f"{path} is truncated: member {shown} ends past the end of "
                                 "the file", hint)
        if member.file_size > MAX_RATIO * max(member.compress_size, 1):
            raise ModelLoadError(
                f"{path} looks like a zip bomb: member {shown} declares {member.file_size} "
                f"bytes from {member.compress_size} compressed", hint)
        total += member.file_size
    if total > MAX_TOTAL:
        raise ModelLoadError(f"{path} declares {total} bytes of members, more than any {what}",
                             hint)
    return ZipSummary(tuple(member.filename for member in members), total)
