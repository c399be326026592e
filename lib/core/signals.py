"""Stopping cleanly on a signal: preemption and time limits on clusters.

On one of TRAIN.STOP_SIGNALS (SIGTERM and SIGUSR1 by default) the handler only records the request; at the next
step boundary every rank agrees to stop (one rank's signal is enough), a mid-epoch training checkpoint is written
(the kind TRAIN.CHECKPOINT_EVERY_STEPS writes), and the tool exits with status 3. Running the same command with
AUTO_RESUME True continues from that batch. A second signal while the checkpoint is written changes nothing
(writes are atomic in any case). With TRAIN.REQUEUE under SLURM, rank 0 then asks SLURM to requeue the job.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any, Dict, List

from mdeq.core.events import Hook
from mdeq.core.trainer import Trainer

logger = logging.getLogger(__name__)

EXIT_STOPPED = 3


def signal_number(name: str) -> int:
    """``SIGTERM`` / ``TERM`` / ``15`` -> the signal's number.

    Raises:
        ValueError: no such signal on this platform.
    """
    text = str(name).strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    number = getattr(signal, text, None)
    if not isinstance(number, int):
        raise ValueError(f"TRAIN.STOP_SIGNALS: unknown signal {name!r}; use names such as SIGTERM, SIGUSR1, SIGINT")
    return int(number)


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python signal handler that does nothing."""


class StopOnSignal(Hook):
    """Installs handlers for the given signals while the run lasts and turns a signal into a clean stop."""

    def __init__(self, names: List[str], requeue: bool = False) -> None:
        self.numbers = [signal_number(n) for n in names]
        self.requeue = requeue
        self.trainer: Any = None
        self.previous: Dict[int, Any] = {}
        self.received: List[int] = []

    def _handler(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self.trainer is not None and self.trainer.stop_reason is None:
            self.trainer.request_stop(f"received {signal.Signals(signum).name}")
        # A signal to the whole process group (SLURM, timeout) also ends the data loader's workers. The loader
        # would raise from its SIGCHLD handler in the middle of the step; the run stops before it fetches the next
        # batch. The replacement is a Python handler that does nothing, not SIG_DFL: a SIGCHLD that arrived
        # before this point but is handled after it would otherwise be reported by Python as "ignored due to
        # race condition" with a traceback on stderr.
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self.previous:
            self.previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore_signal)

    def on_run_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: TRAIN.STOP_SIGNALS are not handled")
            return
        for number in self.numbers:
            self.previous[number] = signal.signal(number, self._handler)
        logger.info("on %s the run stops at the next step with a resumable checkpoint (exit status %d)",
                    ", ".join(signal.Signals(n).name for n in self.numbers), EXIT_STOPPED)

    def on_stopped(self, trainer: Trainer, checkpoint: str) -> None:
        if self.requeue and trainer.ctx.is_main:
            self._requeue()

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            logger.warning("TRAIN.REQUEUE is set but this is not a SLURM job (no SLURM_JOB_ID); not requeued")
            return
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
            logger.info("asked SLURM to requeue job %s; it continues with AUTO_RESUME", job)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("could not requeue SLURM job %s: %s", job, exc)

    def close(self, trainer: Trainer) -> None:
        """Puts back the handlers that were installed before the run."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()
