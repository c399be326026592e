"""Speed and memory of an MDEQ configuration: prints one JSON object.

Measures, on random data of the configuration's image size and channels:

* the median time of a training step (forward, loss, backward, optimizer step) in unrolled and in equilibrium
  mode, after warm-up steps;
* in equilibrium mode, the solver statistics of a step (forward and backward steps and evaluations of f), the
  time spent in calls of f, in the vector-Jacobian products (VJPs) of the adjoint solve and in the backward
  pass through the differentiable call of f at z* (synchronised timers around each), and the rest of the step
  ("solver overhead");
* evaluation throughput (images per second, and seconds for ``--eval-images`` images);
* the cost of one call of f_theta and one VJP, f_theta's FLOPs (counted from its convolution shapes) and the
  share of the machine's peak rate (a large matrix product) that it reaches;
* peak memory of each measured step: on CUDA the peak allocated memory; on the CPU the growth of the resident
  set during the step, measured in a fresh subprocess per measurement (see :func:`measure_cpu_peak`).

Example::

    python benchmarks/bench.py --cfg experiments/cifar/cls_mdeq_TINY.yaml --threads 2 --steps 3 --warmup 1
    python benchmarks/bench.py --cfg experiments/cifar/cls_mdeq_TINY.yaml MODEL.CHANNELS_LAST True

Trailing ``KEY VALUE`` pairs override the configuration as on the training command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mdeq.config import check_config, load_config
from mdeq.core.optim import build_optimizer
from mdeq.datasets.common import SEG_DATASETS
from mdeq.models import get_cls_net, get_seg_net, input_channels
from mdeq.modules.deq import list2vec
from mdeq.modules.optimizations import tune_cpu_allocator

logger = logging.getLogger("bench")

PARTS = ("unrolled", "equilibrium", "eval", "fcost", "memory")


# ------------------------------------------------------------------------------------------------ set-up
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="experiment yaml file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=0, help="training batch (0: TRAIN.BATCH_SIZE_PER_GPU)")
    p.add_argument("--eval-batch-size", type=int, default=0, help="evaluation batch (0: TEST.BATCH_SIZE_PER_GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=3, help="measured training steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per mode (not measured)")
    p.add_argument("--eval-images", type=int, default=256, help="images evaluated for the throughput")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--compile", default="", metavar="BACKEND",
                   help="torch.compile f_theta with this backend (e.g. inductor), as MODEL.COMPILE does")
    p.add_argument("--amp-on-cpu", action="store_true",
                   help="with TRAIN.AMP, also autocast to bfloat16 on the CPU (the trainer does so only on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON object to this file")
    p.add_argument("--memory-probe", default="", help=argparse.SUPPRESS)  # internal: one memory measurement
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; valid parts are {list(PARTS)}")
    return args


def is_segmentation(cfg: Any) -> bool:
    """Whether the configuration describes a segmentation model."""
    return cfg.DATASET.DATASET.lower() in SEG_DATASETS


class Setup:
    """Model, optimizer, loss and random data of one configuration on one device.

    Args:
        args: The parsed command line.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = check_config(load_config(args.cfg, args.opts))
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.cfg.CUDNN.BENCHMARK)
            torch.backends.cudnn.enabled = bool(self.cfg.CUDNN.ENABLED)
        if self.device.type == "cpu":
            tune_cpu_allocator()  # as the tools do (mdeq.core.run.setup_run)
        torch.manual_seed(args.seed)
        self.seg = is_segmentation(self.cfg)
        channels = input_channels(self.cfg)
        if self.seg:
            width, height = self.cfg.TRAIN.IMAGE_SIZE
            self.model: nn.Module = get_seg_net(self.cfg, in_channels=channels)
        else:
            width, height = self.cfg.MODEL.IMAGE_SIZE
            self.model = get_cls_net(self.cfg, in_channels=channels)
        self.model.to(self.device)
        if args.compile:
            self.model.compile_f_theta(backend=args.compile)
        self.model.pretrain_steps = max(int(self.model.pretrain_steps), 1)  # train_step 0 is unrolled
        self.image = (channels, int(height), int(width))
        self.batch = args.batch_size or int(self.cfg.TRAIN.BATCH_SIZE_PER_GPU)
        self.eval_batch = args.eval_batch_size or int(self.cfg.TEST.BATCH_SIZE_PER_GPU)
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.amp = bool(self.cfg.TRAIN.AMP) and (self.device.type == "cuda" or args.amp_on_cpu)
        self.jac_weight = float(self.cfg.LOSS.JAC_LOSS_WEIGHT)
        self.x = self.images(self.batch)
        self.num_classes = (int(self.cfg.DATASET.NUM_CLASSES) if self.seg else int(self.cfg.MODEL.NUM_CLASSES))
        self.y: Optional[torch.Tensor] = None

    def images(self, n: int) -> torch.Tensor:
        """Random images (n, C, H, W) on the device."""
        return torch.randn(n, *self.image, device=self.device)

    def sync(self) -> None:
        """Waits for the device's queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> Any:
        """The autocast context of a step (bfloat16 when TRAIN.AMP applies)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self, train_step: int) -> Dict[str, Any]:
        """One training step (forward, loss, backward, optimizer step); returns the model's info dict."""
        self.model.train()
        with self.autocast():
            out, info = self.model(self.x, train_step=train_step, compute_jac_loss=self.jac_weight > 0,
                                   return_info=True)
        out = out.float()
        if self.y is None:
            shape = (out.shape[0],) + tuple(out.shape[2:])
            self.y = torch.randint(0, self.num_classes, shape, device=self.device)
        loss = F.cross_entropy(out, self.y)
        if info.get("jac_loss") is not None:
            loss = loss + self.jac_weight * info["jac_loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return info

    @torch.no_grad()
    def eval_batch_pass(self, x: torch.Tensor) -> Dict[str, Any]:
        """One evaluation forward pass; returns the info dict."""
        self.model.eval()
        with self.autocast():
            _, info = self.model(x, train_step=-1, return_info=True)
        return info


# -------------------------------------------------------------------------------------------- measurement
class TimingProbe:
    """Accumulates the time and number of the equilibrium layer's f calls, VJPs and f backward passes.

    Every begin/end synchronises the device, so on CUDA the intervals are the device's time.

    Args:
        sync: Waits for the device.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.reset()

    def reset(self) -> None:
        """Clears the totals."""
        kinds = ("f", "vjp", "f_backward", "forward_solve", "backward_solve")
        self.seconds: Dict[str, float] = {k: 0.0 for k in kinds}
        self.calls: Dict[str, int] = {k: 0 for k in kinds}
        self._start: Dict[str, float] = {}

    def begin(self, kind: str) -> None:
        self.sync()
        self._start[kind] = time.perf_counter()

    def end(self, kind: str) -> None:
        self.sync()
        self.seconds[kind] += time.perf_counter() - self._start.pop(kind)
        self.calls[kind] += 1


def timed(setup: Setup, fn: Callable[[], Any]) -> Tuple[float, Any]:
    """Runs fn between two device synchronisations; returns (seconds, result)."""
    setup.sync()
    start = time.perf_counter()
    result = fn()
    setup.sync()
    return time.perf_counter() - start, result


def _scalar(x: Any) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


def measure_unrolled(setup: Setup) -> Dict[str, Any]:
    """Median time of an unrolled (weight-tied, NUM_LAYERS applications of f) training step."""
    for _ in range(setup.args.warmup):
        setup.train_step(0)
    times = [timed(setup, lambda: setup.train_step(0))[0] for _ in range(setup.args.steps)]
    return {"median_s": statistics.median(times), "times_s": times, "num_layers": int(setup.model.num_layers)}


def measure_equilibrium(setup: Setup) -> Dict[str, Any]:
    """Median time of an equilibrium training step and where it goes."""
    layer = setup.model.deq
    for _ in range(setup.args.warmup):
        setup.train_step(-1)
    # The step time itself without the probe: the probe synchronises the device around every call of f, which
    # on a GPU would stop the host from running ahead of the device.
    plain = [timed(setup, lambda: setup.train_step(-1))[0] for _ in range(setup.args.steps)]
    probe = TimingProbe(setup.sync)
    layer.probe = probe
    rows = []
    try:
        for _ in range(setup.args.steps):
            probe.reset()
            seconds, info = timed(setup, lambda: setup.train_step(-1))
            fwd, bwd = info["forward"], info.get("backward", {})
            rows.append({
                "step_s": seconds,
                "f_s": probe.seconds["f"], "vjp_s": probe.seconds["vjp"], "f_backward_s": probe.seconds["f_backward"],
                "f_calls": probe.calls["f"], "vjp_calls": probe.calls["vjp"],
                "forward_solve_s": probe.seconds["forward_solve"], "backward_solve_s": probe.seconds["backward_solve"],
                "forward_nstep": _scalar(fwd["nstep"]), "forward_nfev": _scalar(fwd["nfev"]),
                "backward_nstep": _scalar(bwd["nstep"]) if bwd else 0.0,
                "backward_nfev": _scalar(bwd["nfev"]) if bwd else 0.0,
                "forward_rel_res": _scalar(fwd["rel_res"]),
            })
    finally:
        layer.probe = None
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    step = med["step_s"]
    overhead = step - med["f_s"] - med["vjp_s"] - med["f_backward_s"]
    return {
        "median_s": statistics.median(plain),
        "times_s": plain,
        # The breakdown below comes from further steps timed with the probe; shares are of their median.
        "probed_median_s": step,
        "probed_times_s": [r["step_s"] for r in rows],
        "forward": {"nstep": med["forward_nstep"], "nfev": med["forward_nfev"], "rel_res": med["forward_rel_res"]},
        "backward": {"nstep": med["backward_nstep"], "nfev": med["backward_nfev"]},
        "f_calls": med["f_calls"],
        "vjp_calls": med["vjp_calls"],
        "f_s": med["f_s"],
        "vjp_s": med["vjp_s"],
        "f_backward_s": med["f_backward_s"],
        "forward_solve_s": med["forward_solve_s"],
        "backward_solve_s": med["backward_solve_s"],
        # Time inside the two solves that is not f or a VJP (the solvers' own work), and the rest of the step
        # (stem, head, loss, optimizer, the layer's flattening).
        "solver_bookkeeping_s": (med["forward_solve_s"] + med["backward_solve_s"] - med["vjp_s"]
                                 - med["f_s"] * (med["forward_nfev"] / max(med["f_calls"], 1))),
        "solver_overhead_s": overhead,
        "solver_overhead_share": overhead / step,
        # The strict reading: everything but calls of f and adjoint VJPs (the backward pass through the
        # differentiable call of f at z* then counts as overhead too).
        "outside_f_and_vjp_share": (overhead + med["f_backward_s"]) / step,
    }


def measure_eval(setup: Setup) -> Dict[str, Any]:
    """Evaluation throughput over ``--eval-images`` random images (after one warm-up batch)."""
    total = setup.args.eval_images
    batch = min(setup.eval_batch, total)
    x = setup.images(batch)
    setup.eval_batch_pass(x)
    done, seconds, nsteps = 0, 0.0, []
    while done < total:
        n = min(batch, total - done)
        dt, info = timed(setup, lambda: setup.eval_batch_pass(x[:n]))
        seconds += dt
        done += n
        if info.get("forward"):
            nsteps.append(_scalar(info["forward"]["nstep"]))
    return {"images": done, "batch_size": batch, "seconds": seconds, "images_per_s": done / seconds,
            "forward_nstep": statistics.mean(nsteps) if nsteps else 0.0}


def conv_flops(model: nn.Module, run: Callable[[], Any]) -> float:
    """FLOPs (2 per multiply-add) of every 2-d convolution of ``model`` during ``run()``."""
    total = [0.0]

    def hook(mod: nn.Module, inputs: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kh, kw = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * 2
        groups = getattr(mod, "groups", 1)
        total[0] += 2.0 * out.numel() * (mod.in_channels // groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d) or type(m).__name__ == "WNConv2d"]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def peak_matmul_gflops(device: torch.device, n: int = 4096, reps: int = 3) -> float:
    """The best GFLOP/s of an (n, n) @ (n, n) float32 product: the machine's practical peak."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def measure_fcost(setup: Setup, reps: int = 5) -> Dict[str, Any]:
    """Median seconds of one call of f_theta (no autograd, as in the forward solve) and of one VJP."""
    model = setup.model
    model.train()
    with torch.no_grad(), setup.autocast():
        xs = model.injection(setup.x)
    model.fullstage.prepare([e.shape for e in xs], xs[0].device, xs[0].dtype)
    # The equilibrium layer passes None for the zero injections of the lower resolutions (older versions: zeros).
    zero = (lambda e: None) if hasattr(model, "f_theta") else torch.zeros_like
    injection = [xs[0]] + [zero(e) for e in xs[1:]]
    z = [torch.randn_like(e) for e in xs]
    f_theta = getattr(model, "f_theta", model.fullstage)  # (older versions have no compiled wrapper)

    def call() -> Any:
        with torch.no_grad(), setup.autocast():
            return f_theta(z, injection)

    call()

    def call_eager() -> Any:  # (a compiled f_theta runs no module hooks, so count on the module itself)
        with torch.no_grad(), setup.autocast():
            return model.fullstage(z, injection)

    flops = conv_flops(model.fullstage, call_eager)
    f_times = [timed(setup, call)[0] for _ in range(reps)]
    zg = [e.clone().requires_grad_() for e in z]
    with setup.autocast():
        out = f_theta(zg, injection)
    grads = [torch.randn_like(o) for o in out]

    def vjp() -> Any:
        return torch.autograd.grad(out, zg, grads, retain_graph=True)

    vjp()
    vjp_times = [timed(setup, vjp)[0] for _ in range(reps)]
    model.fullstage.release()
    f_s = statistics.median(f_times)
    peak = peak_matmul_gflops(setup.device)
    return {"f_s": f_s, "vjp_s": statistics.median(vjp_times), "f_gflop": flops / 1e9,
            "f_gflops_per_s": flops / f_s / 1e9, "peak_matmul_gflops_per_s": peak,
            "f_share_of_peak": flops / f_s / 1e9 / peak,
            "state_dim": int(list2vec([e[:1] for e in xs]).shape[1])}


# ----------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class RssSampler:
    """Samples the resident set size every ``interval`` seconds in a background thread; keeps the maximum."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def memory_probe(setup: Setup, part: str) -> Dict[str, Any]:
    """One peak-memory measurement in this (fresh) process: warm-up, then the measured step or batch."""
    import gc

    def run() -> Any:
        if part == "eval":
            return setup.eval_batch_pass(setup.images(setup.eval_batch))
        return setup.train_step(0 if part == "unrolled" else -1)

    for _ in range(max(1, setup.args.warmup)):
        run()
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        base = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        run()
        torch.cuda.synchronize(setup.device)
        peak = torch.cuda.max_memory_allocated(setup.device)
        return {"method": "cuda_max_memory_allocated", "peak_increase_mb": (peak - base) / 2 ** 20,
                "peak_mb": peak / 2 ** 20}
    base = _rss_bytes()
    method = "rss_hwm"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak resident set size (VmHWM) to the current one
        run()
        peak = _hwm_bytes()
    except OSError:
        method = "rss_sampler"
        with RssSampler() as sampler:
            run()
        peak = sampler.peak
    return {"method": method, "peak_increase_mb": (peak - base) / 2 ** 20, "baseline_rss_mb": base / 2 ** 20}


def measure_cpu_peak(args: argparse.Namespace, part: str) -> Dict[str, Any]:
    """Runs :func:`memory_probe` for ``part`` in a fresh subprocess and returns its result.

    The subprocess fixes glibc's mmap threshold at 64 KiB, so every large tensor is its own mapping that is
    returned to the system when freed: the resident set then follows the live tensors, and its growth during
    the step is the step's peak memory (allocator caching would otherwise hide or inflate it).
    """
    env = dict(os.environ)
    env.update({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"})
    cmd = [sys.executable, os.path.abspath(__file__), "--cfg", args.cfg, "--device", args.device,
           "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--memory-probe", part]
    if args.amp_on_cpu:
        cmd.append("--amp-on-cpu")
    if args.compile:
        cmd += ["--compile", args.compile]
    cmd += list(args.opts)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ driver
def machine() -> Dict[str, Any]:
    """A description of the machine and the load on it."""
    info: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loadavg() -> List[float]:
    """The 1, 5 and 15 minute load averages (empty where unknown)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Every requested measurement; returns the JSON object."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    setup = Setup(args)
    if args.memory_probe:
        return memory_probe(setup, args.memory_probe)
    parts = args.parts.split(",")
    params = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    result: Dict[str, Any] = {
        "cfg": args.cfg, "opts": list(args.opts), "device": args.device, "batch_size": setup.batch,
        "eval_batch_size": setup.eval_batch, "image": list(setup.image), "threads": torch.get_num_threads(),
        "steps": args.steps, "warmup": args.warmup, "amp": setup.amp, "parameters": params,
        "solvers": {"forward": setup.cfg.DEQ.F_SOLVER, "backward": setup.cfg.DEQ.B_SOLVER,
                    "f_thres": setup.cfg.DEQ.F_THRES, "b_thres": setup.cfg.DEQ.B_THRES,
                    "stop_mode": setup.cfg.DEQ.STOP_MODE, "backward_mode": setup.cfg.DEQ.BACKWARD},
        "channels_last": bool(getattr(setup.model, "channels_last", False)),
        "compile": args.compile or ("inductor" if setup.cfg.MODEL.COMPILE else ""),
        "machine": machine(), "loadavg_start": loadavg(),
    }
    timings = (("fcost", "f_theta", "one call of f_theta and one VJP", measure_fcost),
               ("unrolled", "train_unrolled", "unrolled training steps", measure_unrolled),
               ("equilibrium", "train_equilibrium", "equilibrium training steps", measure_equilibrium),
               ("eval", "eval", "evaluation", measure_eval))
    for part, key, what, measure in timings:
        if part in parts:
            logger.info("timing %s", what)
            result[key] = measure(setup)
    if "memory" in parts:
        logger.info("measuring peak memory (one fresh process per measurement)")
        memory: Dict[str, Any] = {}
        for part in ("unrolled", "equilibrium", "eval"):
            if part in parts or part == "equilibrium":
                memory[part] = (measure_cpu_peak(args, part) if setup.device.type == "cpu"
                                else memory_probe(setup, part))
        result["memory"] = memory
    result["loadavg_end"] = loadavg()
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line, measures, prints (and optionally writes) one JSON object."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=None if args.memory_probe else 2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
