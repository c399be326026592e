"""Test helpers of tests/datasets: puts this folder on sys.path (for ``cityscapes_fixture``) and offers fixtures.

``cityscapes_root`` writes the tiny Cityscapes tree of ``cityscapes_fixture.make_cityscapes_fixture`` into a
temporary folder and returns ``(root, written)``.
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from cityscapes_fixture import make_cityscapes_fixture  # noqa: E402


@pytest.fixture
def cityscapes_root(tmp_path):
    """A tiny Cityscapes tree in the real layout: (root folder as str, what was written per split)."""
    root = str(tmp_path / "data")
    return root, make_cityscapes_fixture(root)
