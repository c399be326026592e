"""Plot training runs: validation accuracy (or mIoU) against epochs and training time, loss, solver iterations.

    python tools/plot_runs.py output/fashion_mnist/cls_mdeq_quick
    python tools/plot_runs.py runA/output/cifar10/cls_mdeq_TINY runB/output/cifar10/cls_mdeq_TINY \
        --labels default opt-in --out tiny.png
"""
import sys

from mdeq.utils.cli import run_tool
from mdeq.utils.plotting import INSTALL_HINT, main as plot_main, pyplot


def main(argv=None):
    try:
        pyplot()  # matplotlib with the Agg backend
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    return run_tool(lambda: print(f"wrote {plot_main(argv)}"))


if __name__ == "__main__":
    sys.exit(main())
