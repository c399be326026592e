"""Batch-wide stopping, the first original's circular L-Broyden and the second generation's stopping rules,
against the results of both originals' own Broyden solvers (recorded by tests/data/record_original.py)."""
import os

import pytest
import torch

from mdeq.modules.solvers import broyden
from original_format import DATA

ORACLE = torch.load(os.path.join(DATA, "original_oracle_solvers.pt"), weights_only=False)


def _f(z):  # (B, D) -> (B, D), the recorded problems z = tanh(A z + b)
    return torch.tanh(torch.bmm(ORACLE["a"], z.unsqueeze(-1)).squeeze(-1) + ORACLE["b"])


def _first(case, overflow="circular"):
    """The first original's choices: 27 kept updates overwritten circularly, one residual for the batch,
    the no-progress stop after 30 steps, the start as a candidate."""
    x0 = torch.zeros_like(ORACLE["b"])
    return broyden(_f, x0, case["threshold"], case["eps"], "abs", memory=27, overflow=overflow, scope="batch",
                   stall=30, keep_start=True)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_batch_stops_as_a_whole_at_the_originals_step():
    case = ORACLE["cases"]["first_batch_tol"]
    z, stats = _first(case)
    assert case["nstep"] < case["threshold"]  # the recorded solve stopped on the tolerance
    assert stats["nstep"].tolist() == [case["nstep"]] * 3  # one step count for the whole batch
    assert stats["best_step"].tolist() == [case["lowest_step"]] * 3
    assert _rel(z, case["result"]) < 1e-8
    # per sample, some samples would have stopped earlier and others later
    _, own = broyden(_f, torch.zeros_like(ORACLE["b"]), case["threshold"], case["eps"] / 3 ** 0.5, "abs", memory=27,
                     overflow="circular")
    assert len(set(own["nstep"].tolist())) > 1


def test_circular_memory_past_27_updates_matches_the_first_original():
    case = ORACLE["cases"]["first_circular"]
    z, stats = _first(case)
    assert case["lowest_step"] > 27  # the recorded best iterate came after the first overwrite
    assert stats["best_step"].tolist() == [case["lowest_step"]] * 3
    assert _rel(z, case["result"]) < 1e-6
    trace = [float(t[0]) for t in stats["trace"]]
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(trace, case["trace"]))
    # the window policy (this project's) takes other steps once the memory is full
    _, window = _first(case, overflow="window")
    late = [abs(float(t[0]) - b) / b for t, b in zip(window["trace"][29:], case["trace"][29:])]
    assert max(late) > 0.1


@pytest.mark.parametrize("name", ["second_abs_6", "second_abs_25", "second_rel_6", "second_rel_25"])
def test_second_generation_stopping(name):
    case = ORACLE["cases"][name]
    x0 = torch.zeros_like(ORACLE["b"])
    z, stats = broyden(_f, x0, case["threshold"], 1e-3, case["stop_mode"], memory=None, scope="batch", stall=30,
                       keep_start=False)
    assert stats["best_step"].tolist() == [case["lowest_step"]] * 3
    assert _rel(z, case["result"]) < 1e-8


def test_stall_stops_a_solve_that_no_longer_progresses():
    """The originals' rule: stop once the residual is below 3 tol and the last 30 residuals lie within a factor
    1.3 of each other. A map with a slowly converging component (fixed-point iteration, rate 0.999) gets there."""
    from mdeq.modules.solvers import fixed_point

    def slow(z):  # (B, 2): one coordinate converges in one step, the other by 0.1 % per step
        return torch.stack([torch.zeros_like(z[:, 0]), 0.999 * z[:, 1]], dim=1)

    x0 = torch.tensor([[1.0, 1e-3]], dtype=torch.float64)
    tol = 5e-7  # from step 1 on the residual is 1e-6 * 0.999^k: below 3 tol, above tol for ~690 steps
    _, stats = fixed_point(slow, x0, 100, tol, "abs", scope="batch", stall=30)
    assert stats["stalled"].all() and not stats["converged"].any() and int(stats["nstep"][0]) == 31
    _, stats = fixed_point(slow, x0, 100, tol, "abs", scope="batch", stall=0)
    assert not stats["stalled"].any() and int(stats["nstep"][0]) == 100
    _, stats = fixed_point(slow, x0, 100, tol / 10, "abs", scope="batch", stall=30)  # residual never < 3 tol
    assert not stats["stalled"].any() and int(stats["nstep"][0]) == 100


def test_batch_scope_on_the_accelerator_path(monkeypatch):
    """The masked (no host synchronisation) code path used on GPUs gives the same batch-wide results."""
    import importlib

    for module in ("mdeq.modules.solvers.common", "mdeq.modules.solvers.broyden"):
        monkeypatch.setattr(importlib.import_module(module), "host_checks_are_free", lambda t: False)
    for name in ("first_batch_tol", "first_circular"):
        case = ORACLE["cases"][name]
        x0 = torch.zeros_like(ORACLE["b"])
        z, stats = broyden(_f, x0, case["threshold"], case["eps"], "abs", memory=27, overflow="circular",
                           scope="batch", stall=30, keep_start=True, check_every=4)
        assert stats["best_step"].tolist() == [case["lowest_step"]] * 3
        assert _rel(z, case["result"]) < 1e-6


@pytest.mark.parametrize("name", ["broyden", "lbroyden", "anderson", "fixed_point"])
def test_every_solver_stops_the_batch_as_a_whole(name):
    from mdeq.modules.solvers import get_solver

    solver = get_solver(name)
    scale = torch.tensor([0.05, 0.5, 0.9], dtype=torch.float64)[:, None]  # easy, medium and hard samples

    def f(z):
        return scale * torch.tanh(z) + 1.0

    x0 = torch.zeros(3, 5, dtype=torch.float64)
    tol = 1e-6
    z_b, batch = solver(f, x0, 60, tol * 3 ** 0.5, "abs", scope="batch")
    z_s, sample = solver(f, x0, 60, tol, "abs", scope="sample")
    assert len(set(batch["nstep"].tolist())) == 1 and len(set(batch["best_step"].tolist())) == 1
    assert len(set(sample["nstep"].tolist())) > 1  # alone, the easy sample stops first
    assert float((f(z_b) - z_b).norm()) < tol * 3 ** 0.5  # the batch's residual is below the batch tolerance
    _, late = solver(f, x0, 60, 1e-300, "abs", scope="batch", keep_start=False)
    assert int(late["best_step"][0]) >= 1
