"""Writing results safely: every file appears whole or not at all, and a full disk says so.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows). A set of files (a report: tables and
figures) is first written completely under temporary names and only then renamed, so a crash or a
full disk leaves the previous complete set, never new tables beside a truncated figure.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import NoSpaceError, UserError, is_disk_full

Writer = Callable[[IO[bytes]], Any]

# Below this much free space a failed write is reported as a full disk (torch's serializer hides the errno).
_NEARLY_FULL_BYTES = 1 << 20


def _disk_nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def _write_temp(path: Path, write: Writer) -> Path:
    """``write`` into a new temporary file beside ``path`` (flushed and synced) -> its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and (is_disk_full(err) or _disk_nearly_full(path.parent)):
            raise NoSpaceError(path.parent) from err
        raise
    return Path(tmp)


def atomic_write(path: str | Path, write: Writer) -> Path:
    """Write ``path`` through ``write(binary_handle)`` atomically (see module doc) -> ``path``."""
    path = Path(path)
    tmp = _write_temp(path, write)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """A UTF-8 text file, written atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_set(files: Mapping[str | Path, Writer | str]) -> list[Path]:
    """Write several files as a set: all to temporary names first, then each renamed into place.

    A value is a writer (see :func:`atomic_write`) or a text. If any write fails, nothing is
    renamed and the previous files stay as they were.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            if isinstance(content, str):
                data = content.encode("utf-8")
                content = lambda handle, data=data: handle.write(data)  # noqa: E731
            temps.append((_write_temp(path, content), path))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    return [path for _, path in temps]


def remove_stale_temps(folder: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete temporary files left by a write that was killed (``.<name>.*.tmp``) -> what was removed.

    ``names`` limits it to the temporaries of those target names.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        if names is not None and not any(tmp.name.startswith(f".{name}.") for name in names):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and check that a file can be written there, before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medsegx-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if is_disk_full(err):
            raise NoSpaceError(path) from None
        reason = err.strerror or str(err)
        raise UserError(f"cannot write to the {what} {path}: {reason}") from None
    return path
