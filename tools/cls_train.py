"""Train an MDEQ classifier.

    python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/cls_train.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml
"""
import sys

from mdeq.config import parse_args
from mdeq.core.classification import run_train
from mdeq.utils.cli import run_tool


def main(argv=None, hooks=()):
    """Runs the tool; ``hooks``: extra trainer hooks (tests and benchmarks register theirs here)."""
    return run_tool(lambda: run_train(parse_args("Train an MDEQ classification model", argv), hooks))


if __name__ == "__main__":
    sys.exit(main())
