"""Train an MDEQ classifier.

    python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/cls_train.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml

The same program runs as ``python -m mdeq.tools.cls_train`` or ``mdeq-cls-train`` from an installed package;
``--cfg`` also takes a shipped experiment by name (``cifar/cls_mdeq_TINY.yaml``).
"""
import sys
from typing import Optional, Sequence

from mdeq.config import parse_args
from mdeq.core.classification import run_train
from mdeq.core.events import Hook
from mdeq.tools._common import resolve_cfg_argv
from mdeq.utils.cli import run_tool


def main(argv: Optional[Sequence[str]] = None, hooks: Sequence[Hook] = ()) -> int:
    """Runs the tool on ``argv`` (``sys.argv[1:]`` when None); returns the exit code. ``hooks``: extra trainer
    hooks (tests and benchmarks register theirs here)."""
    argv = resolve_cfg_argv(argv)
    return run_tool(lambda: run_train(parse_args("Train an MDEQ classification model", argv), hooks))


if __name__ == "__main__":
    sys.exit(main())
