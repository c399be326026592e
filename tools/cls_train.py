"""Train an MDEQ classifier.

    python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/cls_train.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml
"""
import sys

from mdeq.core.cls_runner import run_train
from mdeq.core.engine import parse_args
from mdeq.utils.cli import run_tool


def main(argv=None):
    return run_tool(lambda: run_train(parse_args("Train an MDEQ classification model", argv)))


if __name__ == "__main__":
    sys.exit(main())
