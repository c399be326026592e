"""Peak memory of the solvers: limited-memory Broyden does not grow with the iteration cap, full Broyden does.

Each solve runs in a fresh process whose glibc hands every block of 64 KiB or more straight back to the
system when it is freed, so the growth of the resident set's high-water mark (VmHWM, reset before the solve)
is the solve's peak tensor memory.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SOLVE = r"""
import sys, torch
from mdeq.modules.solvers import broyden, lbroyden
name, max_iter = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
b = torch.randn(4, 200_000, dtype=torch.float64)  # 1.6 MB per state vector of one sample
f = lambda z: 0.9 * torch.tanh(z) + b  # contraction: the solver runs to its cap (tolerance 1e-30)
x0 = torch.zeros_like(b)
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the current resident set
if name == "lbroyden":
    z, stats = lbroyden(f, x0, max_iter, 1e-30, memory=8)
else:
    z, stats = broyden(f, x0, max_iter, 1e-30)
assert int(stats["nstep"].min()) == max_iter
print((status("VmHWM") - base) / 1024)
"""


def peak_mb(name: str, max_iter: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SOLVE, name, str(max_iter)], env=env, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_lbroyden_peak_memory_does_not_grow_with_the_iteration_cap() -> None:
    lb10, lb40 = peak_mb("lbroyden", 10), peak_mb("lbroyden", 40)
    full10, full40 = peak_mb("broyden", 10), peak_mb("broyden", 40)
    # The measurement sees solver state: full Broyden keeps every residual (4 x 41 x 200k float64 = 262 MB
    # at cap 40 against 70 MB at cap 10); L-Broyden's four (B, 8, D) buffers are 205 MB at any cap.
    assert full40 - full10 > 150
    assert lb10 > 200
    assert abs(lb40 - lb10) <= 0.1 * lb10, (lb10, lb40)
