"""The base class of errors a user can fix: the tools print their one-line message and exit with ``exit_code``."""
from __future__ import annotations


class UserError(Exception):
    """An error whose message names the problem and the fix; no traceback is shown for it.

    Subclasses may set ``exit_code`` (2 unless said otherwise) and ``prefix``, the word the tools print before
    the message (``error``).
    """

    exit_code = 2
    prefix = "error"
