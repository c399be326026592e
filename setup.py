"""Package layout for setuptools (the metadata is in pyproject.toml): ``lib/`` is the package ``mdeq`` with
every sub-package found under it, and ``experiments/`` travels as ``mdeq/experiments`` (yaml files only)."""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def package_dirs():
    """{package name: folder} for lib/ and each of its folders with an __init__.py, plus the experiments."""
    packages = {}
    for folder, _, files in os.walk(os.path.join(HERE, "lib")):
        if "__init__.py" in files and "__pycache__" not in folder:
            rel = os.path.relpath(folder, HERE).replace(os.sep, "/")
            packages["mdeq" + rel[len("lib"):].replace("/", ".")] = rel
    packages["mdeq.experiments"] = "experiments"
    return packages


PACKAGES = package_dirs()

setup(packages=sorted(PACKAGES), package_dir=PACKAGES)
