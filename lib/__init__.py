"""Multiscale Deep Equilibrium Models (MDEQ): models, solvers, training and evaluation."""
__version__ = "0.1.0"
