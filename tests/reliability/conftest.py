"""Fixtures of the reliability tests: the ``kit`` of :mod:`helpers.kit` (with its one-thread, state-restoring autouse
fixture) and ``rel``, the helpers of :mod:`helpers.rel` as a namespace."""
import types

import pytest

from helpers import rel as rel_kit
from helpers.kit import kit, restore_process_state, skip_cifar_md5  # noqa: F401  (registered as fixtures)


@pytest.fixture
def rel():
    """The helpers of rel_kit.py, as one namespace."""
    return types.SimpleNamespace(
        REPO=rel_kit.REPO, HOOKS=rel_kit.HOOKS, SEG_CFG=rel_kit.SEG_CFG, SEG_TINY=list(rel_kit.SEG_TINY),
        fingerprint=rel_kit.fingerprint, partial_files=rel_kit.partial_files, hooked=rel_kit.hooked,
        env=rel_kit.subprocess_env, start=rel_kit.start, wait_for=rel_kit.wait_for, kill_group=rel_kit.kill_group,
        read=rel_kit.read, run_to_end=rel_kit.run_to_end, make_cityscapes=rel_kit.make_cityscapes)
