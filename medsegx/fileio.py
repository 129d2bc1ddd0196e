"""Writing results safely: every file appears whole or not at all, and a full disk says so.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows). A set of files (a report: tables and
figures) is first written completely under temporary names and only then renamed, so a crash or a
full disk leaves the previous complete set, never new tables beside a truncated figure.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import NoSpaceError, UserError, is_disk_full

Writer = Callable[[IO[bytes]], Any]
NamedWriter = Callable[[Path], Any]  # writes the file it is given by name (SimpleITK picks the format by extension)

# Below this much free space a failed write is reported as a full disk (torch's serializer hides the errno).
_NEARLY_FULL_BYTES = 1 << 20


def _disk_nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def _read_open_mode() -> int:
    """The permissions ``open()`` gives a new file (the umask's), not ``mkstemp``'s owner-only 0600."""
    umask = os.umask(0)  # the only way to read it; done once, at import, before any thread of ours writes
    os.umask(umask)
    return 0o666 & ~umask


# Read once: setting the umask to read it would, in a threaded server, briefly give every file any other
# thread creates world-writable permissions.
_OPEN_MODE = _read_open_mode()


def file_extension(path: Path) -> str:
    """``.nii.gz`` for ``x.nii.gz``, else the last suffix."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def _write_temp(path: Path, write: Writer | NamedWriter, *, like_open: bool = False, named: bool = False) -> Path:
    """``write`` into a new temporary file beside ``path`` (flushed and synced) -> its path.

    ``named``: ``write`` takes the temporary file's path, which keeps ``path``'s extension;
    ``like_open``: the file gets the permissions ``open()`` would give (:data:`_OPEN_MODE`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + (file_extension(path) if named else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        if like_open:
            os.chmod(tmp, _OPEN_MODE)
        if named:
            os.close(fd)
            write(Path(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
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


def atomic_write(path: str | Path, write: Writer, *, like_open: bool = False) -> Path:
    """Write ``path`` through ``write(binary_handle)`` atomically (see module doc) -> ``path``.

    ``like_open``: the permissions ``open()`` would give (the umask's) instead of owner-only.
    """
    path = Path(path)
    tmp = _write_temp(path, write, like_open=like_open)
    os.replace(tmp, path)
    return path


def atomic_write_named(path: str | Path, write: NamedWriter) -> Path:
    """Write ``path`` atomically through ``write(temporary_path)``, for writers that take a file name;
    the temporary file keeps ``path``'s extension and gets ``open()``'s permissions -> ``path``."""
    path = Path(path)
    tmp = _write_temp(path, write, like_open=True, named=True)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str, *, like_open: bool = False) -> Path:
    """A UTF-8 text file, written atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data), like_open=like_open)


def format_json(value: object, indent: int = 0, width: int = 170) -> str:
    """JSON with one line per short item (a slice's record), nested blocks otherwise."""
    flat = json.dumps(value, allow_nan=False)
    if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {format_json(v, indent + 1, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + format_json(v, indent + 1, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


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


class NotWritableError(UserError):
    """A folder that cannot be created or written to; ``reason`` is the system's word for why."""

    def __init__(self, path: Path, what: str, reason: str) -> None:
        super().__init__(f"cannot write to the {what} {path}: {reason}")
        self.path, self.reason = path, reason


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
        raise NotWritableError(path, what, err.strerror or str(err)) from None
    return path
