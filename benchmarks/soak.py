"""Soak test: trains for a while and watches the process's memory for growth.

    python benchmarks/soak.py --minutes 30                      # the documented soak (quick-start config)
    python benchmarks/soak.py --minutes 4 --sample-every 25 PERCENT 0.2
    python benchmarks/soak.py --epochs 2 --cfg experiments/cifar/cls_mdeq_TINY.yaml DATASET.ROOT data/cifar10

Runs cls_train's training (run_train: training, validation after every epoch, checkpoints) with a hook on the
configuration given by ``--cfg`` (default: experiments/fashion_mnist/cls_mdeq_quick.yaml) with trailing KEY VALUE
overrides, for ``--minutes`` of wall time or ``--epochs`` epochs, whichever ends first. It samples the resident
set size (RSS, from /proc/self/status; the peak as well), the number of open file descriptors, live Python
threads, the median step time, and on a GPU the allocated, reserved and peak CUDA memory: every ``--sample-every`` steps and at the
start and end of every epoch (so after each validation). It prints one JSON object with the samples and a
verdict:

- ``stable``: after the warm-up (the first epoch, or the first quarter of the step samples when the run has one
  epoch) RSS grew less than ``--max-growth-mb`` in total or less than ``--max-slope-mb`` per 1000 steps (least
  squares over the step samples), and neither open files nor threads kept growing;
- ``growing``: otherwise (a leak is likely; compare the per-epoch figures to see whether it is per step or per
  epoch);
- ``inconclusive``: fewer than 4 samples after the warm-up (run longer, or sample more often).

Outputs (checkpoints, logs) go to a temporary folder unless OUTPUT_DIR / LOG_DIR are given. The process uses
``--threads`` threads (default: torch's default).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CFG = os.path.join(REPO, "experiments", "fashion_mnist", "cls_mdeq_quick.yaml")


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_sample() -> Dict[str, Any]:
    """RSS and its peak (MiB), open file descriptors, threads, and CUDA memory (MiB) when a GPU is in use."""
    rss, peak = _status_kb("VmRSS"), _status_kb("VmHWM")
    if rss is None:  # not Linux: the peak from getrusage is all there is
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1 if sys.platform != "darwin" else 1024)
        rss = peak
    try:
        fds: Optional[int] = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    out = {"rss_mb": round(rss / 1024, 2), "peak_rss_mb": round(peak / 1024, 2), "open_files": fds,
           "threads": threading.active_count()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mib = 1024 ** 2
        out.update(cuda_allocated_mb=round(torch.cuda.memory_allocated() / mib, 2),
                   cuda_reserved_mb=round(torch.cuda.memory_reserved() / mib, 2),
                   cuda_peak_mb=round(torch.cuda.max_memory_allocated() / mib, 2))
    return out


def slope_per_1000(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of ys over xs, times 1000."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def verdict(steps: List[Dict[str, Any]], epochs: List[Dict[str, Any]], max_growth_mb: float,
            max_slope_mb: float) -> Dict[str, Any]:
    """Growth of RSS (and CUDA memory, open files, threads) after the warm-up, and the verdict."""
    if len(epochs) >= 2 and any(e["event"] == "epoch_end" for e in epochs):
        first_end = next(e for e in epochs if e["event"] == "epoch_end")
        warm = [s for s in steps if s["step"] > first_end["step"]]
        warm_note = "after the first epoch"
    else:
        warm = steps[len(steps) // 4:]
        warm_note = "after the first quarter of the step samples"
    out: Dict[str, Any] = {"warm_up": warm_note, "samples_after_warm_up": len(warm)}
    if len(warm) < 4:
        out["verdict"] = "inconclusive"
        out["reason"] = "fewer than 4 samples after the warm-up; run longer or lower --sample-every"
        return out
    xs = [float(s["step"]) for s in warm]
    growth = warm[-1]["rss_mb"] - warm[0]["rss_mb"]
    slope = slope_per_1000(xs, [s["rss_mb"] for s in warm])
    out.update(rss_start_mb=warm[0]["rss_mb"], rss_end_mb=warm[-1]["rss_mb"], rss_growth_mb=round(growth, 2),
               rss_slope_mb_per_1000_steps=round(slope, 3), rss_max_mb=max(s["rss_mb"] for s in warm))
    reasons = []
    if growth >= max_growth_mb and slope >= max_slope_mb:
        reasons.append(f"RSS grew {growth:.1f} MiB ({slope:.2f} MiB per 1000 steps)")
    for key in ("open_files", "threads"):
        values = [s[key] for s in warm if s.get(key) is not None]
        if values and values[-1] > values[0] and values == sorted(values) and len(set(values)) > 2:
            reasons.append(f"{key} kept growing ({values[0]} -> {values[-1]})")
        out[f"{key}_start"], out[f"{key}_end"] = (values[0], values[-1]) if values else (None, None)
    if "cuda_allocated_mb" in warm[0]:
        cuda_growth = warm[-1]["cuda_allocated_mb"] - warm[0]["cuda_allocated_mb"]
        out["cuda_allocated_growth_mb"] = round(cuda_growth, 2)
        if cuda_growth >= max_growth_mb:
            reasons.append(f"CUDA allocated memory grew {cuda_growth:.1f} MiB")
    out["verdict"] = "growing" if reasons else "stable"
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=DEFAULT_CFG, help="experiment yaml (default: the quick-start config)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-time budget (default 30)")
    parser.add_argument("--epochs", type=int, default=0, help="stop after this many epochs (0: by time only)")
    parser.add_argument("--sample-every", type=int, default=50, help="sample every N training steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-growth-mb", type=float, default=64.0,
                        help="RSS growth after the warm-up below which the run is stable (MiB)")
    parser.add_argument("--max-slope-mb", type=float, default=8.0,
                        help="RSS slope below which the run is stable (MiB per 1000 steps)")
    parser.add_argument("--out", default="", help="also write the JSON to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from mdeq.config import parse_args as tool_args
    from mdeq.core.classification import run_train
    from mdeq.core.trainer import Hook, TrainingStopped

    work = tempfile.mkdtemp(prefix="mdeq_soak_")
    opts = list(args.opts)
    if "OUTPUT_DIR" not in opts[0::2]:
        opts += ["OUTPUT_DIR", os.path.join(work, "output")]
    if "LOG_DIR" not in opts[0::2]:
        opts += ["LOG_DIR", os.path.join(work, "log")]
    end_epoch = args.epochs if args.epochs > 0 else 100000
    opts += ["TRAIN.END_EPOCH", str(end_epoch), "TRAIN.RESUME", "False", "AUTO_RESUME", "False",
             "TRAIN.OVERWRITE", "True"]

    deadline = time.time() + 60.0 * args.minutes
    start = time.time()
    steps: List[Dict[str, Any]] = []
    epochs: List[Dict[str, Any]] = []
    counter = {"step": 0}

    def sample(kind: str, epoch: int, into: List[Dict[str, Any]], **extra: Any) -> None:
        into.append(dict(memory_sample(), event=kind, epoch=epoch, step=counter["step"],
                         elapsed_s=round(time.time() - start, 2), **extra))

    class SoakHook(Hook):
        """Samples memory, open files and step times; asks the run to stop when the time is up."""

        def __init__(self) -> None:
            self.times: List[float] = []

        def on_run_start(self, trainer) -> None:
            sample("epoch_start", trainer.state.epoch, epochs)

        def on_step_end(self, trainer, record) -> None:
            counter["step"] += 1
            self.times.append(record.batch_time)
            if counter["step"] % args.sample_every == 0:
                recent = self.times[-args.sample_every:]
                sample("step", record.epoch, steps, step_time_s=round(sorted(recent)[len(recent) // 2], 4))
            if time.time() >= deadline and trainer.stop_reason is None:
                trainer.request_stop("the soak's time budget is spent")

        def on_epoch_end(self, trainer, summary) -> None:
            sample("epoch_end", summary.epoch - 1, epochs)
            if summary.epoch < trainer.last_epoch:
                sample("epoch_start", summary.epoch, epochs)

    stopped_by = "epochs"
    try:
        run_train(tool_args("soak", ["--cfg", args.cfg] + opts), hooks=[SoakHook()])
    except TrainingStopped:
        stopped_by = "time"
    final = memory_sample()
    report = {
        "benchmark": "soak", "cfg": os.path.relpath(args.cfg, REPO) if args.cfg.startswith(REPO) else args.cfg,
        "overrides": list(args.opts), "minutes_budget": args.minutes, "epochs_budget": args.epochs,
        "stopped_by": stopped_by, "elapsed_s": round(time.time() - start, 1), "steps": counter["step"],
        "epochs_completed": sum(1 for e in epochs if e["event"] == "epoch_end"), "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "final": final, "summary": verdict(steps, epochs, args.max_growth_mb, args.max_slope_mb),
        "per_epoch": epochs, "per_steps": steps,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
