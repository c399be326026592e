"""Time to accuracy: train a recipe (a yaml and overrides) for a time budget; accuracy against seconds and calls of f.

Runs ``python tools/cls_train.py --cfg CFG [KEY VALUE ...]`` with OUTPUT_DIR and LOG_DIR under
``<out>/runs/<label>/``. When the budget (wall-clock seconds since the training process started, its start-up
included) is spent, the run is sent SIGTERM (the training loop then saves a checkpoint and exits); if it has not
exited after ``--grace-seconds`` (60), it is killed. The run's metrics.csv then becomes ``<out>/<label>.csv``
with the columns ``label,epoch,seconds,valid_top1,f_calls_forward,f_calls_backward``, and
``<out>/time_to_accuracy.png`` is redrawn from every such CSV in ``<out>``: validation accuracy against training
seconds, against calls of f (forward solves + backward passes) and against forward calls alone; one line per
recipe. A one-line summary per recipe is printed (best accuracy, and the training seconds at which it was
first reached).

Examples::

    python benchmarks/time_to_accuracy.py --cfg experiments/fashion_mnist/cls_mdeq_quick.yaml \\
        --budget-seconds 120 --out tta --label quick
    python benchmarks/time_to_accuracy.py --cfg experiments/fashion_mnist/cls_mdeq_quick.yaml \\
        --budget-seconds 120 --out tta --label quick-anderson DEQ.F_SOLVER anderson
    python benchmarks/time_to_accuracy.py --out tta --plot-only --target 90
    python benchmarks/time_to_accuracy.py --out tta --label best \
        --from-metrics output/fashion_mnist/cls_mdeq_best/metrics.csv

``--from-metrics`` takes the curve of a run made without this tool (cls_train's own metrics.csv) instead of
training one.

``seconds`` is the training time the run itself reports (validations included, start-up excluded); the budget
is wall-clock time of the whole process, so a recipe's curve ends a little before the budget.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from mdeq.utils.plotting import Line, Panel, draw_panels, read_metrics, time_unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TOOL = os.path.join(ROOT, "tools", "cls_train.py")
CSV_COLUMNS = ("label", "epoch", "seconds", "valid_top1", "f_calls_forward", "f_calls_backward")
PNG_NAME = "time_to_accuracy.png"


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="", help="experiment yaml file")
    p.add_argument("--budget-seconds", type=float, default=0.0,
                   help="stop the run after this many wall-clock seconds (0: let it finish)")
    p.add_argument("--out", required=True, help="folder for the runs, the per-recipe CSVs and the PNG")
    p.add_argument("--label", default="", help="name of the recipe (default: from the yaml name and overrides)")
    p.add_argument("--plot-only", action="store_true", help="only redraw the PNG from the CSVs in --out")
    p.add_argument("--from-metrics", default="", metavar="METRICS_CSV",
                   help="take the recipe's curve from this finished run's metrics.csv instead of training it")
    p.add_argument("--target", type=float, default=None, help="also report when each recipe first reaches this "
                                                             "accuracy")
    p.add_argument("--force", action="store_true", help="replace an earlier run of the same label")
    p.add_argument("--grace-seconds", type=float, default=60.0,
                   help="after SIGTERM, wait this long for the run to save and exit before killing it")
    p.add_argument("--tool", default=TRAIN_TOOL, help="training script to run (default: tools/cls_train.py)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if not args.plot_only and not args.cfg and not args.from_metrics:
        p.error("--cfg is required unless --plot-only or --from-metrics is given")
    if args.from_metrics and not args.label:
        p.error("--from-metrics needs a --label for the recipe")
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs; got an odd number: {args.opts}")
    return args


def default_label(cfg: str, opts: Sequence[str]) -> str:
    """The yaml's name, followed by the overrides as KEY=VALUE, in characters safe for a file name."""
    name = os.path.splitext(os.path.basename(cfg))[0]
    pairs = [f"{k.split('.')[-1]}={v}" for k, v in zip(opts[0::2], opts[1::2])]
    label = "_".join([name] + pairs)
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", label)[:120]


# ------------------------------------------------------------------------------------------------ running
def run_with_budget(command: Sequence[str], budget_s: float, grace_s: float = 60.0, poll_s: float = 0.5,
                    cwd: Optional[str] = None) -> Dict[str, object]:
    """Runs ``command`` and stops it when ``budget_s`` wall-clock seconds have passed.

    The process gets SIGTERM at the budget and SIGKILL (with its whole process group, e.g. data-loader workers)
    ``grace_s`` seconds later if it is still running. Ctrl-C stops it the same way before passing on.

    Returns:
        {"returncode": int, "stopped": bool (SIGTERM was sent), "killed": bool (SIGKILL was sent),
         "wall_s": float}
    """
    start = time.monotonic()
    proc = subprocess.Popen(list(command), cwd=cwd, start_new_session=True)
    stopped = killed = False

    def stop() -> None:
        nonlocal killed
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            killed = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    try:
        while proc.poll() is None:
            remaining = budget_s - (time.monotonic() - start) if budget_s > 0 else poll_s
            if remaining <= 0:
                stopped = True
                stop()
                break
            try:
                proc.wait(timeout=min(poll_s, remaining))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        if proc.poll() is None:
            stop()
        raise
    return {"returncode": proc.returncode, "stopped": stopped, "killed": killed,
            "wall_s": time.monotonic() - start}


def newest_metrics(output_dir: str) -> str:
    """The most recently written metrics.csv below a run's OUTPUT_DIR.

    Raises:
        FileNotFoundError: the run wrote none (it stopped before its first validation).
    """
    found = glob.glob(os.path.join(output_dir, "**", "metrics.csv"), recursive=True)
    if not found:
        raise FileNotFoundError(f"the run wrote no metrics.csv below {output_dir}: it stopped before its first "
                                f"validation (or its training loop writes none); give it a larger "
                                f"--budget-seconds or fewer images per epoch")
    return max(found, key=os.path.getmtime)


# ------------------------------------------------------------------------------------------------ curves
def _cell(value: Optional[float]) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def write_curve(metrics_csv: str, label: str, out_csv: str) -> List[Dict[str, object]]:
    """Writes the time-to-accuracy rows of a run's metrics.csv (epochs with a validation accuracy); returns them."""
    m = read_metrics(metrics_csv)
    rows = []
    for i in range(len(m["epoch"])):
        if m["valid_top1"][i] is None or m["seconds"][i] is None:
            continue
        rows.append({"label": label, **{c: m[c][i] for c in CSV_COLUMNS[1:]}})
    os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
    with open(out_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row["label"]] + [_cell(row[c]) for c in CSV_COLUMNS[1:]])
    return rows


def read_curves(out: str) -> Dict[str, List[Dict[str, object]]]:
    """Every time-to-accuracy CSV in ``out`` (files with exactly :data:`CSV_COLUMNS`), by label, sorted by name."""
    curves: Dict[str, List[Dict[str, object]]] = {}
    for path in sorted(glob.glob(os.path.join(out, "*.csv"))):
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                continue
            rows = []
            for raw in reader:
                row: Dict[str, object] = {"label": raw["label"]}
                for c in CSV_COLUMNS[1:]:
                    row[c] = float(raw[c]) if raw[c] not in ("", None) else None
                rows.append(row)
        label = rows[0]["label"] if rows else os.path.splitext(os.path.basename(path))[0]
        curves[str(label)] = rows
    return curves


def _points(rows: Sequence[Dict[str, object]], x_of) -> tuple:
    xs, ys = [], []
    for row in rows:
        x, y = x_of(row), row["valid_top1"]
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _both_calls(row: Dict[str, object]) -> Optional[float]:
    f, b = row["f_calls_forward"], row["f_calls_backward"]
    return None if f is None or b is None else f + b


def plot_curves(curves: Dict[str, List[Dict[str, object]]], png: str) -> str:
    """Accuracy against training time, against calls of f (forward + backward) and forward calls alone."""
    divisor, unit = time_unit([r["seconds"] for rows in curves.values() for r in rows if r["seconds"] is not None])
    axes = dict(x_from_zero=True, label_last=True)
    by_time = Panel("accuracy against training time", f"training {unit}", "validation top-1", **axes)
    by_calls = Panel("accuracy against calls of f (forward + backward)", "calls of f", "validation top-1", **axes)
    by_forward = Panel("accuracy against forward calls of f", "forward calls of f", "validation top-1", **axes)
    for i, (label, rows) in enumerate(curves.items()):
        xs, ys = _points(rows, lambda r: r["seconds"])
        by_time.lines.append(Line(label, [x / divisor for x in xs], ys, color=i))
        by_calls.lines.append(Line(label, *_points(rows, _both_calls), color=i))
        by_forward.lines.append(Line(label, *_points(rows, lambda r: r["f_calls_forward"]), color=i))
    return draw_panels([by_time, by_calls, by_forward], png, title="time to accuracy", ncols=3)


def summary(label: str, rows: Sequence[Dict[str, object]], target: Optional[float] = None) -> str:
    """One line: best accuracy and the training seconds (and epoch) at which it was first reached."""
    scored = [r for r in rows if r["valid_top1"] is not None]
    if not scored:
        return f"{label}: no validated epoch"
    best = max(r["valid_top1"] for r in scored)
    first = next(r for r in scored if r["valid_top1"] == best)
    line = (f"{label}: best valid_top1 {best:.2f} at {first['seconds']:.1f} s (epoch {int(first['epoch'])}); "
            f"{len(scored)} epochs in {scored[-1]['seconds']:.1f} s")
    if target is not None:
        hit = next((r for r in scored if r["valid_top1"] >= target), None)
        line += (f"; reaches {target:g} at {hit['seconds']:.1f} s (epoch {int(hit['epoch'])})" if hit
                 else f"; does not reach {target:g}")
    return line


# ------------------------------------------------------------------------------------------------ main
def train_recipe(args: argparse.Namespace, label: str, poll_s: float = 0.5) -> str:
    """Runs one recipe within its budget and writes ``<out>/<label>.csv``; returns the CSV's path."""
    if not os.path.isfile(args.cfg):
        raise FileNotFoundError(f"config file {args.cfg} does not exist; pass an existing yaml with --cfg")
    run_dir = os.path.join(args.out, "runs", label)
    if os.path.exists(run_dir) and os.listdir(run_dir):
        if not args.force:
            raise ValueError(f"{run_dir} already holds a run of the recipe {label!r}; pass another --label, or "
                             f"--force to replace it")
        shutil.rmtree(run_dir)
    output_dir, log_dir = os.path.join(run_dir, "output"), os.path.join(run_dir, "log")
    command = [sys.executable, args.tool, "--cfg", args.cfg, *args.opts,
               "OUTPUT_DIR", output_dir, "LOG_DIR", log_dir]
    result = run_with_budget(command, args.budget_seconds, args.grace_seconds, poll_s=poll_s)
    how = ("killed after the grace period" if result["killed"] else "stopped at the budget" if result["stopped"]
           else f"finished with exit code {result['returncode']}")
    print(f"{label}: training {how} after {result['wall_s']:.1f} s", flush=True)
    if not result["stopped"] and result["returncode"] != 0:
        try:
            newest_metrics(output_dir)
        except FileNotFoundError:
            raise ValueError(f"the training of {label!r} failed (exit code {result['returncode']}) before its first "
                             f"validation; see its output above") from None
    out_csv = os.path.join(args.out, f"{label}.csv")
    write_curve(newest_metrics(output_dir), label, out_csv)
    return out_csv


def main(argv: Optional[Sequence[str]] = None, poll_s: float = 0.5) -> int:
    """Command-line entry; returns the exit code (user errors: ``error: ...`` and 2)."""
    args = parse_args(argv)
    try:
        if args.from_metrics and not args.plot_only:
            if not os.path.isfile(args.from_metrics):
                raise FileNotFoundError(f"--from-metrics {args.from_metrics} does not exist; pass the metrics.csv "
                                        f"of a finished run (in its OUTPUT_DIR)")
            write_curve(args.from_metrics, args.label, os.path.join(args.out, f"{args.label}.csv"))
        elif not args.plot_only:
            label = args.label or default_label(args.cfg, args.opts)
            if not re.fullmatch(r"[A-Za-z0-9._=+-]+", label):
                raise ValueError(f"--label {label!r} must be a file name: letters, digits and . _ = + -")
            train_recipe(args, label, poll_s=poll_s)
        curves = read_curves(args.out)
        if not curves:
            raise FileNotFoundError(f"no time-to-accuracy CSV in {args.out}; train a recipe into it first")
        png = plot_curves(curves, os.path.join(args.out, PNG_NAME))
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for label, rows in curves.items():
        print(summary(label, rows, args.target), flush=True)
    print(f"wrote {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
