"""Train an MDEQ segmentation model.

    python tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml [KEY VALUE ...]

The program is ``mdeq.tools.seg_train`` (options and outputs are described there); this file keeps the original
command line. Installed without a clone, the same program runs as ``python -m mdeq.tools.seg_train`` or
``mdeq-seg-train``.
"""
import sys

try:
    from mdeq.tools.seg_train import main
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.startswith("mdeq."):
        raise
    print(f"error: {exc.name} is not installed for {sys.executable}: run `bash scripts/setup.sh` once, then "
          f"`.venv/bin/python tools/seg_train.py ...` (or `pip install -e .` into your own environment)",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
