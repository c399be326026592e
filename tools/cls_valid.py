"""Evaluate an MDEQ classifier (ours or an original .pkl) on the whole test set.

    python tools/cls_valid.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml --testModel pretrained_models/X.pkl

The program is ``mdeq.tools.cls_valid`` (options and outputs are described there); this file keeps the original
command line. Installed without a clone, the same program runs as ``python -m mdeq.tools.cls_valid`` or
``mdeq-cls-valid``.
"""
import sys

try:
    from mdeq.tools.cls_valid import main
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.startswith("mdeq."):
        raise
    print(f"error: {exc.name} is not installed for {sys.executable}: run `bash scripts/setup.sh` once, then "
          f"`.venv/bin/python tools/cls_valid.py ...` (or `pip install -e .` into your own environment)",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
