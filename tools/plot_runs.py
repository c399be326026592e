"""Plot training runs: validation accuracy (or mIoU) against epochs and training time, loss, solver iterations.

    python tools/plot_runs.py output/fashion_mnist/cls_mdeq_quick
    python tools/plot_runs.py runA/output/cifar10/cls_mdeq_TINY runB/output/cifar10/cls_mdeq_TINY \
        --labels default opt-in --out tiny.png
"""
import sys

from mdeq.utils.cli import run_tool


def main(argv=None):
    try:
        import matplotlib  # noqa: F401  (only checked here; the plotting module imports it)
    except ImportError:
        print("error: plotting needs matplotlib; install it with `pip install matplotlib` "
              "(or the package's `plot` extra)", file=sys.stderr)
        return 2
    from mdeq.utils.plotting import main as plot_main

    return run_tool(lambda: print(f"wrote {plot_main(argv)}"))


if __name__ == "__main__":
    sys.exit(main())
