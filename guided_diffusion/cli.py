"""Shared command-line plumbing: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable


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


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main; a user error prints `error: <one line>` and exits 2 (SEG_DEBUG=1: traceback)."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except user_error_types() as exc:
        if os.environ.get("SEG_DEBUG"):
            raise
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        sys.exit(2)
