"""User errors and how entry points show them.

A :class:`UserError` is a problem with what the user gave: a path that is not there, a checkpoint
that does not fit or is unsafe, bad data, an argument out of range, a folder that cannot be
written. Every entry point runs under :func:`user_errors`, which prints such an error as one line
``error: ...`` on stderr and exits with status 2, without a traceback (``--debug`` or
``MEDSEGX_DEBUG=1`` shows it). Anything else is a program bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or environment; the message names the file or flag."""


class NoSpaceError(UserError, OSError):
    """The disk holding ``path`` is full."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(f"no space left on {path}")
        self.path = Path(path)


def debug_requested(args: object = None) -> bool:
    """``--debug`` on the command line or ``MEDSEGX_DEBUG`` set to a true value."""
    if getattr(args, "debug", False):
        return True
    return os.environ.get("MEDSEGX_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def is_disk_full(err: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT, or torch's serializer failing because the disk filled up."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and is_disk_full(cause)


def as_user_error(err: BaseException) -> UserError | None:
    """The user-facing form of an environment error (missing file, no permission, full disk), else None."""
    if isinstance(err, UserError):
        return err
    if is_disk_full(err):
        where = getattr(err, "filename", None)
        return NoSpaceError(where or "the output disk")
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        what = {FileNotFoundError: "not found", NotADirectoryError: "not a folder",
                IsADirectoryError: "is a folder", PermissionError: "permission denied"}[type(err)]
        if err.filename is not None:
            return UserError(f"{err.filename}: {what}")
        return UserError(str(err))
    return None


def format_error(err: BaseException) -> str:
    """``error: <message>`` on one line (further lines of the message are indented details)."""
    text = str(err).strip() or type(err).__name__
    first, *rest = text.splitlines()
    return "\n".join([f"error: {first}", *(f"  {line.strip()}" for line in rest if line.strip())])


@contextlib.contextmanager
def user_errors(args: object = None) -> Iterator[None]:
    """Run an entry point: user errors become ``error: ...`` and exit status 2 (see module doc)."""
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - program bugs are re-raised below
        user = as_user_error(err)
        if user is None or debug_requested(args):
            raise
        sys.stdout.flush()
        print(format_error(user), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
