"""Installs the ``lib/`` folder as the importable package ``mdeq`` (``pip install .`` or ``pip install -e .``)."""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_packages_under_lib():
    """Every folder of lib/ with an __init__.py, named as a sub-package of mdeq."""
    packages = {}
    for folder, _, files in os.walk(os.path.join(HERE, "lib")):
        if "__init__.py" in files and "__pycache__" not in folder:
            rel = os.path.relpath(folder, HERE).replace(os.sep, "/")
            name = "mdeq" + rel[len("lib"):].replace("/", ".")
            packages[name] = rel
    return packages


PACKAGES = find_packages_under_lib()

with open(os.path.join(HERE, "requirements.txt")) as fh:
    REQUIREMENTS = [line.strip() for line in fh if line.strip() and not line.startswith("#")]

setup(
    name="mdeq",
    version="0.1.0",
    description="Multiscale Deep Equilibrium Models: training, evaluation and checkpoint compatibility",
    packages=sorted(PACKAGES),
    package_dir=PACKAGES,
    python_requires=">=3.9",
    install_requires=REQUIREMENTS,
)
