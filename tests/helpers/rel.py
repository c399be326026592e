"""Helpers of the fault tests (tests/reliability and the multi-process tool tests), handed out by
tests/reliability/conftest.py as the ``rel`` fixture.

On top of :mod:`helpers.kit` (available here as ``tools``): fingerprints of folders, the segmentation run
options, and running a tool through ``tests/reliability/rel_hooks.py`` (in a subprocess, with a fault injected
on cue) and killing it.
"""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import kit as tools
from helpers.cityscapes import make_cityscapes_fixture
from helpers.tiny import SEG_RUN

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
HOOKS = os.path.join(TESTS, "reliability", "rel_hooks.py")
SEG_CFG = os.path.join(REPO, "experiments", "cityscapes", "seg_mdeq_SMALL.yaml")
SEG_TINY = SEG_RUN + ["MODEL.PRETRAINED", ""]


def fingerprint(folder):
    """{relative path: sha256 of the bytes} of every file under folder ({} when it does not exist)."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def partial_files(folder):
    """Temporary files of interrupted checkpoint writes under folder."""
    return sorted(os.path.relpath(os.path.join(b, n), folder) for b, _, files in os.walk(folder)
                  for n in files if n.endswith(".tmp"))


def hooked(tool, argv):
    """The arguments of ``python`` that run a tool through rel_hooks.py (faults chosen by REL_* variables)."""
    return [HOOKS, tool] + list(argv)


def subprocess_env(**extra):
    """The environment of a tool subprocess: one thread, no launcher variables leaking in from outside."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MDEQ_TRACEBACK",
                "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(args, env, log_path):
    """Starts ``python args...`` from the repository root in its own process group, output to log_path."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable] + list(args), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def wait_for(path, proc, timeout=120.0):
    """Waits until path exists; fails when the process ends first or the time is up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit code {proc.returncode}) before {path} appeared")
        time.sleep(0.05)
    pytest.fail(f"{path} did not appear within {timeout} s")


def kill_group(proc):
    """SIGKILLs the process and its children (its own process group) and reaps it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_to_end(args, env, log_path, timeout=300):
    """Runs ``python args...`` in its own process group with output to ``log_path`` until it ends (killed with its
    group if the test fails or times out first); returns (exit code, output)."""
    proc, fh = start(args, env, log_path)
    try:
        code = proc.wait(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    finally:
        fh.close()
    return code, read(log_path)


def read(path):
    with open(path, errors="replace") as fh:
        return fh.read()


def make_cityscapes(root):
    return make_cityscapes_fixture(root)
