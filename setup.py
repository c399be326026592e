"""Installs the ``lib/`` folder as the importable package ``mdeq``."""
from setuptools import setup

PACKAGES = ["mdeq"] + [
    "mdeq." + sub for sub in ("config", "models", "modules", "modules.solvers", "core", "datasets", "utils")
]

with open("requirements.txt") as fh:
    REQUIREMENTS = [line.strip() for line in fh if line.strip() and not line.startswith("#")]

setup(
    name="mdeq",
    version="0.1.0",
    description="Multiscale Deep Equilibrium Models: training, evaluation and checkpoint compatibility",
    packages=PACKAGES,
    package_dir={"mdeq": "lib", **{p: "lib/" + p.split(".", 1)[1].replace(".", "/") for p in PACKAGES[1:]}},
    python_requires=">=3.9",
    install_requires=REQUIREMENTS,
)
