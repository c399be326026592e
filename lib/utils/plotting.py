"""Reading the per-epoch ``metrics.csv`` of training runs and drawing them into a PNG.

A run folder (``OUTPUT_DIR/<dataset>/<config name>/``) holds ``metrics.csv``, one row per finished epoch, written
and flushed after each validation. :func:`plot_runs` draws one or several runs into one PNG: the validation
metric (top-1 accuracy, or mIoU for segmentation) against epochs and against training seconds, the loss, and
the solver's forward / backward iterations. Any column may be empty (unrolled epochs have no solver columns)
and a run may have a single row.

matplotlib is needed only here and is imported when a plot is drawn (with the Agg backend, which needs no
display); without it the functions raise an ImportError that says how to install it.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

# The columns of metrics.csv, in file order (see docs/visualising_runs.md for their meaning).
METRICS_COLUMNS = (
    "epoch", "phase", "step", "seconds", "lr", "train_loss", "train_top1", "valid_loss", "valid_top1",
    "valid_top5", "valid_mIoU", "valid_pixel_acc", "forward_nstep", "forward_abs_res", "forward_rel_res",
    "backward_nstep", "backward_abs_res", "backward_rel_res", "valid_forward_nstep", "f_calls_forward",
    "f_calls_backward",
)
TEXT_COLUMNS = ("phase",)
INSTALL_HINT = "plotting needs matplotlib; install it with `pip install matplotlib` (or the package's `plot` extra)"

Metrics = Dict[str, list]


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display).

    Raises:
        ImportError: matplotlib is not installed; the message says how to install it.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ reading
def find_metrics(path: str) -> str:
    """The metrics.csv of a run: ``path`` itself when it is a file, else ``path/metrics.csv``.

    Raises:
        FileNotFoundError: neither exists; the message lists metrics.csv files found below ``path``, if any.
    """
    if os.path.isfile(path):
        return path
    candidate = os.path.join(path, "metrics.csv")
    if os.path.isfile(candidate):
        return candidate
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass a run folder (OUTPUT_DIR/<dataset>/<config name>) "
                                f"or the path of its metrics.csv")
    below = sorted(glob.glob(os.path.join(path, "**", "metrics.csv"), recursive=True))
    hint = f"; found below it: {', '.join(os.path.dirname(p) for p in below[:5])}" if below else ""
    raise FileNotFoundError(f"no metrics.csv in {path}; pass a run folder (OUTPUT_DIR/<dataset>/<config name>) "
                            f"or the path of its metrics.csv{hint}")


def _number(text: Optional[str]) -> Optional[float]:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(path: str) -> Metrics:
    """Reads a metrics.csv (or the one in a run folder) into columns.

    Every column of :data:`METRICS_COLUMNS` is present in the result (all ``None`` when the file lacks it);
    further columns of the file are kept too. Numbers become floats, empty or unreadable cells ``None``;
    ``phase`` stays text. A last line without its newline (a row being written) is left out.

    Raises:
        FileNotFoundError: no such file or run folder.
        ValueError: the file has no header line.
    """
    path = find_metrics(path)
    with open(path, "r", encoding="utf-8", newline="") as fh:
        text = fh.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines or "epoch" not in lines[0].split(","):
        raise ValueError(f"{path} has no header line with an 'epoch' column; is it a metrics.csv of a run?")
    reader = csv.DictReader(lines)
    names = list(dict.fromkeys(list(METRICS_COLUMNS) + list(reader.fieldnames or [])))
    columns: Metrics = {name: [] for name in names}
    for row in reader:
        for name in names:
            raw = row.get(name)
            columns[name].append((raw or "") if name in TEXT_COLUMNS else _number(raw))
    return columns


def series(metrics: Metrics, x: str, y: str) -> Tuple[List[float], List[float]]:
    """The points (x, y) of two columns where both are finite numbers."""
    xs, ys = [], []
    for a, b in zip(metrics.get(x, []), metrics.get(y, [])):
        if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
            xs.append(a)
            ys.append(b)
    return xs, ys


def finite(metrics: Metrics, column: str) -> List[float]:
    """The finite numbers of a column."""
    return [v for v in metrics.get(column, []) if isinstance(v, float) and math.isfinite(v)]


def has_values(metrics: Metrics, column: str) -> bool:
    """Whether a column holds at least one finite number."""
    return bool(finite(metrics, column))


def valid_metric(metrics: Metrics) -> str:
    """``valid_top1`` for a classification run, ``valid_mIoU`` for a segmentation run."""
    if not has_values(metrics, "valid_top1") and has_values(metrics, "valid_mIoU"):
        return "valid_mIoU"
    return "valid_top1"


def default_labels(paths: Sequence[str]) -> List[str]:
    """Run folder names; where two are equal, with as many parent folders as make them different."""
    folders = [os.path.normpath(os.path.abspath(os.path.dirname(find_metrics(p)))).split(os.sep) for p in paths]
    depth = [1] * len(folders)
    while True:
        labels = ["/".join(f[-d:]) for f, d in zip(folders, depth)]
        clashes = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(folders[i])]
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


# ------------------------------------------------------------------------------------------------ drawing
@dataclass
class Line:
    """One curve: points, legend label, line style, and the index of its colour (the same run keeps one).

    With ``legend`` False the line is left out of the legend (a run's second and third curves in one panel,
    told apart by the line style that the panel's title explains).
    """

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"
    color: int = 0
    legend: bool = True


@dataclass
class Panel:
    """One set of axes; ``integer_x`` for axes that count (epochs), ``x_from_zero`` for an x axis that starts at 0
    (times and counts, so that recipes compare by length), ``label_last`` to write each line's last y value by
    its last point."""

    title: str
    xlabel: str
    ylabel: str
    lines: List[Line] = field(default_factory=list)
    integer_x: bool = False
    x_from_zero: bool = False
    label_last: bool = False


def legend_once_per_run(panel: Panel) -> Panel:
    """Keeps one legend entry per colour (run): its first line with points."""
    seen = set()
    for line in panel.lines:
        line.legend = bool(line.x) and line.color not in seen
        if line.legend:
            seen.add(line.color)
    return panel


def time_unit(seconds: Sequence[float]) -> Tuple[float, str]:
    """(divisor, name) for a time axis: seconds up to 5 minutes, minutes up to 2 hours, then hours."""
    top = max(seconds, default=0.0)
    if top > 7200:
        return 3600.0, "hours"
    if top > 300:
        return 60.0, "minutes"
    return 1.0, "seconds"


def draw_panels(panels: Sequence[Panel], out: str, title: str = "", ncols: int = 2) -> str:
    """Draws panels of lines into a PNG and returns its path.

    Every line gets markers, so a run with a single row shows as a point; a panel without any point says so.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    ncols = max(1, min(ncols, len(panels)))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), squeeze=False)
    try:
        for ax, panel in zip(axes.flat, panels):
            drawn = 0
            for line in panel.lines:
                if not line.x:
                    continue
                ax.plot(line.x, line.y, line.style, color=f"C{line.color % 10}", marker="o", markersize=3,
                        label=line.label if line.legend else "_nolegend_")
                if panel.label_last:
                    ax.annotate(f"{line.y[-1]:.2f}", (line.x[-1], line.y[-1]), textcoords="offset points",
                                xytext=(4, 4), fontsize="small", color=f"C{line.color % 10}")
                drawn += 1
            if panel.integer_x:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if panel.x_from_zero and drawn:
                ax.set_xlim(left=0, right=1.08 * max(max(line.x) for line in panel.lines if line.x))
            ax.set_title(panel.title)
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            ax.grid(True, alpha=0.3)
            if drawn:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def run_panels(runs: Sequence[Metrics], labels: Sequence[str]) -> List[Panel]:
    """The four panels of :func:`plot_runs` for runs already read."""
    metrics = [valid_metric(m) for m in runs]
    names = {"valid_top1": "top-1 accuracy", "valid_mIoU": "mIoU"}
    ylabel = " / ".join(dict.fromkeys(names[m] for m in metrics))
    divisor, unit = time_unit([t for m in runs for t in finite(m, "seconds")])
    by_epoch = Panel(f"validation {ylabel} per epoch", "epoch", ylabel, integer_x=True)
    by_time = Panel(f"validation {ylabel} against training time", f"training {unit}", ylabel)
    loss = Panel("loss (solid: train, dashed: validation)", "epoch", "loss", integer_x=True)
    nstep = Panel("solver iterations per step (solid: forward, dashed: backward,\ndotted: validation forward)",
                  "epoch", "nstep", integer_x=True)
    for i, (m, metric, label) in enumerate(zip(runs, metrics, labels)):
        by_epoch.lines.append(Line(label, *series(m, "epoch", metric), color=i))
        xs, ys = series(m, "seconds", metric)
        by_time.lines.append(Line(label, [x / divisor for x in xs], ys, color=i))
        loss.lines.append(Line(label, *series(m, "epoch", "train_loss"), color=i))
        loss.lines.append(Line(label, *series(m, "epoch", "valid_loss"), style="--", color=i))
        nstep.lines.append(Line(label, *series(m, "epoch", "forward_nstep"), color=i))
        nstep.lines.append(Line(label, *series(m, "epoch", "backward_nstep"), style="--", color=i))
        nstep.lines.append(Line(label, *series(m, "epoch", "valid_forward_nstep"), style=":", color=i))
    return [by_epoch, by_time, legend_once_per_run(loss), legend_once_per_run(nstep)]


def plot_runs(paths: Sequence[str], out: str, labels: Optional[Sequence[str]] = None, title: str = "") -> str:
    """Draws one or several runs into a PNG and returns its path.

    Args:
        paths: Run folders or paths of metrics.csv files.
        out: The PNG to write (its folder is created).
        labels: One legend label per run; by default the run folder names.
        title: A title above the panels.

    Raises:
        FileNotFoundError: a run has no metrics.csv.
        ValueError: the number of labels differs from the number of runs, or a file is not a metrics.csv.
        ImportError: matplotlib is missing (the message says how to install it).
    """
    if not paths:
        raise ValueError("no runs given; pass one or more run folders or metrics.csv files")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs; give one label per run (or none)")
    runs = [read_metrics(p) for p in paths]
    return draw_panels(run_panels(runs, list(labels) if labels else default_labels(paths)), out, title)


def default_output(paths: Sequence[str]) -> str:
    """Where ``plot_runs`` writes by default: the run folder's metrics.png for one run, runs.png for several."""
    if len(paths) == 1:
        return os.path.join(os.path.dirname(find_metrics(paths[0])), "metrics.png")
    return "runs.png"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of tools/plot_runs.py."""
    p = argparse.ArgumentParser(
        description="Plot the metrics.csv of one or several training runs into a PNG: validation accuracy (or "
                    "mIoU) against epochs and training time, loss, and solver iterations.")
    p.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR/<dataset>/<config name>) or metrics.csv files")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    p.add_argument("--out", default="", help="PNG to write (default: <run>/metrics.png for one run, runs.png for "
                                             "several)")
    p.add_argument("--title", default="", help="title above the panels")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Command-line entry: plots the runs and returns the path of the PNG."""
    args = parse_args(argv)
    return plot_runs(args.runs, args.out or default_output(args.runs), args.labels, args.title)
