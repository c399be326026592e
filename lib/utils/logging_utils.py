"""Logging set-up for the tools: one text log per run, written by rank 0 only."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

from mdeq.utils.distributed import get_rank

FORMAT = "%(asctime)-15s %(message)s"


class ConsoleHandler(logging.StreamHandler):
    """Writes log lines to stdout through tqdm when it is installed, so that a progress bar on the same terminal
    is cleared before the line and drawn again after it (the two never glue together)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging does: a broken console must not stop training
            self.handleError(record)


def setup_logger(log_dir: Optional[str], phase: str, cfg_name: str) -> logging.Logger:
    """Logs to the console and to ``log_dir/<cfg_name>_<time>_<phase>.log`` on rank 0; other ranks log warnings
    only, to the console. Returns the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    rank = get_rank()
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    console = ConsoleHandler(sys.stdout)
    console.setFormatter(logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] " + FORMAT))
    root.addHandler(console)
    if rank == 0 and log_dir:
        os.makedirs(log_dir, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
        fh = logging.FileHandler(os.path.join(log_dir, f"{cfg_name}_{stamp}_{phase}.log"))
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)
    return root
