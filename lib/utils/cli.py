"""Turns the errors a user can fix into one clear message and a non-zero exit, instead of a traceback."""
from __future__ import annotations

import logging
import re
import sys
from typing import Callable

from mdeq.config import ConfigError
from mdeq.utils.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(exc: BaseException) -> str:
    """The text of a user error, without the traceback that a DataLoader worker process embeds in the message of
    an error it hands back (only the worker's own error line or lines are kept)."""
    text = str(exc)
    if _WORKER_TRACEBACK not in text:
        return text
    tail = text.split(_WORKER_TRACEBACK)[-1]
    tail = tail.split("Traceback (most recent call last):")[-1]  # the last error of a chain
    lines = [line for line in tail.splitlines() if line.strip() and not line.startswith(" ")]
    message = "\n".join(lines)
    return re.sub(r"^[\w.]+: ", "", message) or text


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
        print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
        return 2
    return 0
