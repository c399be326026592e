"""Helpers of the reliability tests (tests/reliability), importable as ``rel_kit`` by the tests of this folder and
handed out by its conftest as the ``rel`` fixture.

The tool-test helpers of tests/tools/conftest.py (tiny model options, data fixtures in the real on-disk formats,
running a tool in-process or in a subprocess) are loaded from that file as ``tools``; this module adds what the
fault tests need on top: fingerprints of folders, segmentation options, and running a tool through
``rel_hooks.py`` (in a subprocess, with a fault injected on cue) and killing it.
"""
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
HOOKS = os.path.join(HERE, "rel_hooks.py")
SEG_CFG = os.path.join(REPO, "experiments", "cityscapes", "seg_mdeq_SMALL.yaml")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tools = _load("_rel_tools_conftest", os.path.join(TESTS, "tools", "conftest.py"))
_cityscapes = _load("_rel_cityscapes_fixture", os.path.join(TESTS, "datasets", "cityscapes_fixture.py"))

# A segmentation model of two branches with 8 and 16 channels, on 64x32 crops of the tiny Cityscapes fixture.
SEG_TINY = [
    "GPUS", "(0,)", "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXPANSION_FACTOR", "1", "MODEL.NUM_GROUPS", "2",
    "MODEL.F_THRES", "4", "MODEL.B_THRES", "4", "MODEL.PRETRAINED", "",
    "TRAIN.IMAGE_SIZE", "[64, 32]", "TRAIN.MULTI_SCALE", "False", "TRAIN.BATCH_SIZE_PER_GPU", "2",
    "TRAIN.PRETRAIN_STEPS", "1", "TEST.IMAGE_SIZE", "[64, 32]", "TEST.BASE_SIZE", "64", "TEST.BATCH_SIZE_PER_GPU", "1",
    "WORKERS", "0", "PRINT_FREQ", "1", "SEED", "0", "TENSORBOARD", "False", "DEVICE", "cpu",
]


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


def read(path):
    with open(path, errors="replace") as fh:
        return fh.read()


def make_cityscapes(root):
    return _cityscapes.make_cityscapes_fixture(root)
