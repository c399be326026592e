"""Evaluate an MDEQ segmentation model, or render its predictions.

    python tools/seg_test.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml --testModel MODEL.pth
    python tools/seg_test.py --cfg ... --testModel ... TEST.MULTI_SCALE True TEST.SCALE_LIST "[0.75, 1.0, 1.25]" \
        TEST.FLIP_TEST True
    python tools/seg_test.py --cfg ... --testModel ... TEST.SAVE_PREDICTIONS True TEST.OUTPUT_DIR preds/
    python tools/seg_test.py --cfg ... --testModel ... DATASET.TEST_SET list/cityscapes/test.lst

A labelled list prints the per-class IoU table, the pixel accuracy and, last, ``mIoU: X``. With
TEST.SAVE_PREDICTIONS the colourised predictions, overlays and label-id maps are written to TEST.OUTPUT_DIR
(``color/``, ``overlay/``, ``label_ids/``). An image-only list (the test split) writes the label-id maps the
Cityscapes benchmark server accepts and prints where they are.

The same program runs as ``python -m mdeq.tools.seg_test`` or ``mdeq-seg-test`` from an installed package;
``--cfg`` also takes a shipped experiment by name (``cifar/cls_mdeq_TINY.yaml``).
"""
import sys
from typing import Optional, Sequence

from mdeq.config import parse_args
from mdeq.core.segmentation import run_test
from mdeq.tools._common import resolve_cfg_argv
from mdeq.utils.cli import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the tool on ``argv`` (``sys.argv[1:]`` when None); returns the exit code."""
    argv = resolve_cfg_argv(argv)
    result = {}

    def run():
        result.update(run_test(parse_args("Evaluate an MDEQ segmentation model", argv)))

    code = run_tool(run)
    if code != 0 or result.get("rank", 0) != 0:
        return code
    if result.get("output_dir"):
        print(f"predictions: {result['output_dir']}")
    if result.get("has_labels"):
        print(f"pixel accuracy: {result['pixel_acc']:.6f}")
        print(f"mIoU: {result['mIoU']:.6f}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
