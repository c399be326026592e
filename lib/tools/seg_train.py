"""Train an MDEQ segmentation model.

    python tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml \
        MODEL.PRETRAINED pretrained_models/MDEQ_Small_Imagenet.pth

The last line printed is ``mIoU: X`` (the final validation); the log holds the per-class IoU table.

The same program runs as ``python -m mdeq.tools.seg_train`` or ``mdeq-seg-train`` from an installed package;
``--cfg`` also takes a shipped experiment by name (``cifar/cls_mdeq_TINY.yaml``).
"""
import sys
from typing import Optional, Sequence

from mdeq.config import parse_args
from mdeq.core.segmentation import run_train
from mdeq.core.events import Hook
from mdeq.tools._common import resolve_cfg_argv
from mdeq.utils.cli import run_tool


def main(argv: Optional[Sequence[str]] = None, hooks: Sequence[Hook] = ()) -> int:
    """Runs the tool on ``argv`` (``sys.argv[1:]`` when None); returns the exit code. ``hooks``: extra trainer
    hooks (tests and benchmarks register theirs here)."""
    argv = resolve_cfg_argv(argv)
    result = {}

    def run():
        result.update(run_train(parse_args("Train an MDEQ segmentation model", argv), hooks))

    code = run_tool(run)
    if code == 0 and result.get("rank", 0) == 0 and "mIoU" in result:
        print(f"best mIoU: {result['best_mIoU']:.6f}")
        print(f"mIoU: {result['mIoU']:.6f}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
