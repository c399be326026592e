"""Train an MDEQ classifier.

    python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/cls_train.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml

The program is ``mdeq.tools.cls_train`` (options and outputs are described there); this file keeps the original
command line. Installed without a clone, the same program runs as ``python -m mdeq.tools.cls_train`` or
``mdeq-cls-train``.
"""
import sys

try:
    from mdeq.tools.cls_train import main
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.startswith("mdeq."):
        raise
    print(f"error: {exc.name} is not installed for {sys.executable}: run `bash scripts/setup.sh` once, then "
          f"`.venv/bin/python tools/cls_train.py ...` (or `pip install -e .` into your own environment)",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
