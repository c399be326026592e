"""Fixtures of tests/datasets: ``cityscapes_root`` writes the tiny Cityscapes tree of
:func:`helpers.cityscapes.make_cityscapes_fixture` into a temporary folder and returns ``(root, written)``."""
import pytest

from helpers.cityscapes import make_cityscapes_fixture


@pytest.fixture
def cityscapes_root(tmp_path):
    """A tiny Cityscapes tree in the real layout: (root folder as str, what was written per split)."""
    root = str(tmp_path / "data")
    return root, make_cityscapes_fixture(root)
