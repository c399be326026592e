"""Train an MDEQ segmentation model.

    python tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml \
        MODEL.PRETRAINED pretrained_models/MDEQ_Small_Imagenet.pth

The last line printed is ``mIoU: X`` (the final validation); the log holds the per-class IoU table.
"""
import sys

from mdeq.config import parse_args
from mdeq.core.segmentation import run_train
from mdeq.utils.cli import run_tool


def main(argv=None, hooks=()):
    """Runs the tool; ``hooks``: extra trainer hooks (tests and benchmarks register theirs here)."""
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
