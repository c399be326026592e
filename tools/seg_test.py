"""Evaluate an MDEQ segmentation model, or render its predictions.

    python tools/seg_test.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml --testModel MODEL.pth

The program is ``mdeq.tools.seg_test`` (options and outputs are described there); this file keeps the original
command line. Installed without a clone, the same program runs as ``python -m mdeq.tools.seg_test`` or
``mdeq-seg-test``.
"""
import sys

try:
    from mdeq.tools.seg_test import main
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.startswith("mdeq."):
        raise
    print(f"error: {exc.name} is not installed for {sys.executable}: run `bash scripts/setup.sh` once, then "
          f"`.venv/bin/python tools/seg_test.py ...` (or `pip install -e .` into your own environment)",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
