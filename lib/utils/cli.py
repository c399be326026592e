"""Turns the errors a user can fix into one clear message and a non-zero exit, instead of a traceback."""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable

from mdeq.config import ConfigError
from mdeq.utils.errors import UserError

logger = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, UserError, FileNotFoundError, ValueError)


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


def _log_to_files(message: str) -> None:
    """Writes ``message`` into the run's log file(s) only (the console gets it from :func:`run_tool` itself)."""
    record = logging.LogRecord("mdeq", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_tool(main: Callable[[], object]) -> int:
    """Runs a tool's main function; a user error prints ``error: <message>``
    (or the error's own ``prefix``) (also into the run's log file) and
    returns its exit code (2, or the error's own ``exit_code``).

    Set the environment variable MDEQ_TRACEBACK=1 to see the full traceback of such an error.
    """
    try:
        main()
    except USER_ERRORS as exc:
        if os.environ.get("MDEQ_TRACEBACK"):
            raise
        message = f"{getattr(exc, 'prefix', 'error')}: {user_message(exc)}"
        _log_to_files(message)
        print(message, file=sys.stderr, flush=True)
        return int(getattr(exc, "exit_code", 2))
    return 0
