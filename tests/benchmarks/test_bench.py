"""benchmarks/bench.py on a tiny configuration: one valid JSON object with every field, consistent counts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import torch
from helpers.tiny import MODEL_4_8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")
CFG = os.path.join(ROOT, "experiments", "cifar", "cls_mdeq_TINY.yaml")
TINY = MODEL_4_8 + [
        "MODEL.IMAGE_SIZE", "[8, 8]", "MODEL.NUM_LAYERS", "3", "DEQ.F_THRES", "5", "DEQ.B_THRES", "6"]


def run_bench(args: List[str]) -> Dict[str, Any]:
    done = subprocess.run([sys.executable, BENCH, "--cfg", CFG] + args, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def result() -> Dict[str, Any]:
    return run_bench(["--threads", "1", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                      "--eval-batch-size", "2", "--eval-images", "4"] + TINY)


def test_every_field_is_there(result: Dict[str, Any]) -> None:
    for key in ("cfg", "device", "batch_size", "image", "threads", "parameters", "machine", "loadavg_start",
                "f_theta", "train_unrolled", "train_equilibrium", "eval", "memory", "loadavg_end"):
        assert key in result, key
    assert result["image"] == [3, 8, 8] and result["batch_size"] == 2 and result["threads"] == 1
    for key in ("f_s", "vjp_s", "f_gflop", "f_gflops_per_s", "peak_matmul_gflops_per_s", "f_share_of_peak"):
        assert result["f_theta"][key] > 0, key
    assert result["train_unrolled"]["median_s"] > 0 and len(result["train_unrolled"]["times_s"]) == 2
    eq = result["train_equilibrium"]
    for key in ("median_s", "f_s", "vjp_s", "f_backward_s", "forward_solve_s", "backward_solve_s",
                "solver_overhead_s", "solver_overhead_share", "outside_f_and_vjp_share"):
        assert key in eq, key
    assert len(eq["times_s"]) == len(eq["probed_times_s"]) == 2 and eq["median_s"] > 0
    assert 0 < eq["f_s"] + eq["vjp_s"] < eq["probed_median_s"]
    assert eq["solver_overhead_share"] < eq["outside_f_and_vjp_share"] < 1
    ev = result["eval"]
    assert ev["images"] == 4 and ev["images_per_s"] > 0 and ev["seconds"] > 0
    for part in ("unrolled", "equilibrium", "eval"):
        mem = result["memory"][part]
        assert mem["method"] in ("rss_hwm", "rss_sampler") and mem["peak_increase_mb"] > -1.0  # RSS noise of a few pages


def test_counts_of_f_and_vjps_match_the_solver_statistics(result: Dict[str, Any]) -> None:
    eq = result["train_equilibrium"]
    assert eq["forward"]["nfev"] == eq["forward"]["nstep"] + 1 <= 6
    # one differentiable call at z*, and one at f(z*) for the original's adjoint (DEQ.ADJOINT_AT f_z, the TINY
    # yaml's default)
    assert eq["f_calls"] == eq["forward"]["nfev"] + 2
    assert eq["vjp_calls"] == eq["backward"]["nfev"] == eq["backward"]["nstep"] + 1


def test_flop_count_of_a_known_convolution() -> None:
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    flops = bench.conv_flops(conv, lambda: conv(torch.randn(2, 3, 4, 6)))
    assert flops == 2 * (2 * 5 * 4 * 6) * 3 * 9


def test_parts_and_overrides_are_honoured() -> None:
    out = run_bench(["--threads", "1", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--parts",
                     "equilibrium", "DEQ.F_SOLVER", "anderson"] + TINY)
    assert "train_unrolled" not in out and "eval" not in out and "memory" not in out
    assert out["solvers"]["forward"] == "anderson"
    assert out["train_equilibrium"]["f_calls"] == out["train_equilibrium"]["forward"]["nfev"] + 2


def test_flops_are_counted_for_a_compiled_f_theta_too(result: Dict[str, Any]) -> None:
    out = run_bench(["--threads", "1", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--parts", "fcost",
                     "--compile", "eager"] + TINY)
    assert out["compile"] == "eager"
    assert out["f_theta"]["f_gflop"] == result["f_theta"]["f_gflop"] > 0
