"""Shared command-line plumbing: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class Interrupted(Exception):
    """A run stopped by a signal after saving what it had (exit code 128 + the signal number)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


# OS errors that mean the environment (permissions, a full disk, a path that is a file), not a bug.
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
                      errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (shown as one line), not a bug (shown with a traceback)."""
    from guided_diffusion.checkpoint import CheckpointError
    from guided_diffusion.data.datasets import DataError

    types: list[type[BaseException]] = [CheckpointError, DataError, ValueError, FileNotFoundError]
    try:
        from guided_diffusion.training.core import TrainingDiverged

        types.append(TrainingDiverged)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def first_line(exc: BaseException) -> str:
    """The one line a user needs. An error raised in a DataLoader worker comes back as "Caught DataError in
    DataLoader worker process 1. Original Traceback ...": its own message is the traceback's last line."""
    text = str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        qualified, sep, message = lines[-1].partition(": ")  # "guided_diffusion.data.datasets.DataError: ..."
        return message if sep and qualified.split(".")[-1] == type(exc).__name__ else lines[-1]
    return lines[0]


def environment_error(exc: BaseException) -> str | None:
    """One line for an OS error a user can fix (permission, full disk, a file where a folder goes), or for running
    out of memory; None for anything else."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        hint = {errno.ENOSPC: "; free space or use another --out_dir", errno.EDQUOT: "; free space or use another "
                "--out_dir"}.get(exc.errno, "; check the path and its permissions")
        return f"{where}{exc.strerror or exc}{hint}"
    out_of_memory = isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("out of memory", "can't allocate memory", "Cannot allocate memory")))
    if out_of_memory:
        return ("out of memory: lower --batch_size or --image_size (or the network's --num_channels); "
                + first_line(exc)[:160])
    return None


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main; a user error prints `error: <one line>` and exits 2 (SEG_DEBUG=1: traceback)."""
    try:
        main()
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except user_error_types() as exc:
        if os.environ.get("SEG_DEBUG"):
            raise
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (OSError, RuntimeError, MemoryError) as exc:
        line = environment_error(exc)
        if line is None or os.environ.get("SEG_DEBUG"):
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
