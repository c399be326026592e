"""Evaluate an MDEQ classifier (ours or an original .pkl) on the whole test set.

    python tools/cls_valid.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml --testModel pretrained_models/X.pkl
"""
import sys

from mdeq.config import parse_args
from mdeq.core.classification import run_valid
from mdeq.utils.cli import run_tool


def main(argv=None):
    return run_tool(lambda: run_valid(parse_args("Evaluate an MDEQ classification model", argv)))


if __name__ == "__main__":
    sys.exit(main())
