"""Turns the errors a user can fix into one clear message and a non-zero exit, instead of a traceback."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from mdeq.config import ConfigError
from mdeq.utils.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def run_tool(main: Callable[[], object]) -> int:
    """Runs a tool's main function; user errors print ``error: <message>`` and return exit code 2.

    Set the environment variable MDEQ_TRACEBACK=1 to see the full traceback of such an error.
    """
    import os

    from mdeq.core.engine import TrainingDiverged

    try:
        main()
    except (*USER_ERRORS, TrainingDiverged) as exc:
        if os.environ.get("MDEQ_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
