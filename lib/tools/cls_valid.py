"""Evaluate an MDEQ classifier (ours or an original .pkl) on the whole test set.

    python tools/cls_valid.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml --testModel pretrained_models/X.pkl

The same program runs as ``python -m mdeq.tools.cls_valid`` or ``mdeq-cls-valid`` from an installed package;
``--cfg`` also takes a shipped experiment by name (``cifar/cls_mdeq_TINY.yaml``).
"""
import sys
from typing import Optional, Sequence

from mdeq.config import parse_args
from mdeq.core.classification import run_valid
from mdeq.tools._common import resolve_cfg_argv
from mdeq.utils.cli import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the tool on ``argv`` (``sys.argv[1:]`` when None); returns the exit code."""
    argv = resolve_cfg_argv(argv)
    return run_tool(lambda: run_valid(parse_args("Evaluate an MDEQ classification model", argv)))


if __name__ == "__main__":
    sys.exit(main())
