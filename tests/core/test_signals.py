"""StopOnSignal in one process: a stop signal that arrives together with the SIGCHLD of dying loader workers."""
from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

import pytest

from mdeq.core.signals import StopOnSignal

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGCHLD") or not hasattr(signal, "pthread_sigmask"),
                                reason="POSIX signals only")


class _FakeTrainer:
    def __init__(self) -> None:
        self.stop_reason: Optional[str] = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason


def test_sigterm_and_a_pending_sigchld_stop_quietly_and_the_handlers_come_back(monkeypatch):
    """A group signal ends the loader's workers too: their SIGCHLD can be pending when the stop signal is handled.
    The run must stop without an error from the loader's SIGCHLD handler and without Python reporting the SIGCHLD
    as "ignored due to race condition" (a traceback on stderr), and the handlers in place before the run return."""
    loader_calls: List[int] = []

    def loader_sigchld_handler(signum, frame):  # what a data loader with dead workers does on SIGCHLD
        loader_calls.append(signum)
        raise RuntimeError("DataLoader worker exited unexpectedly")

    unraisable: List[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: unraisable.append(str(info.exc_value)))
    before_term = signal.getsignal(signal.SIGTERM)
    before_child = signal.signal(signal.SIGCHLD, loader_sigchld_handler)
    hook = StopOnSignal(["SIGTERM"])
    trainer = _FakeTrainer()
    try:
        hook.on_run_start(trainer)
        # both signals pending at once; Python runs the handlers in signal-number order: SIGTERM (15) first
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
        try:
            os.kill(os.getpid(), signal.SIGCHLD)
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})
        assert trainer.stop_reason == "received SIGTERM"
        assert hook.received == [signal.SIGTERM]
        assert loader_calls == [] and unraisable == []
        hook.close(trainer)
        assert signal.getsignal(signal.SIGTERM) == before_term
        assert signal.getsignal(signal.SIGCHLD) is loader_sigchld_handler
    finally:
        signal.signal(signal.SIGCHLD, before_child)
        signal.signal(signal.SIGTERM, before_term)
