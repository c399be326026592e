"""Tests of the fixed-point solvers in mdeq.modules.solvers (float64, CPU-sized)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import pytest
import torch
from torch import Tensor

from mdeq.modules.solvers import SOLVERS, anderson, broyden, fixed_point, get_solver, lbroyden

DT = torch.float64
COS_FIXED_POINT = 0.7390851332151607
NAMES = sorted(SOLVERS)


def _counting(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Wraps ``f`` so that ``wrapped.calls`` counts its calls."""

    def wrapped(z: Tensor) -> Tensor:
        wrapped.calls += 1
        return f(z)

    wrapped.calls = 0
    return wrapped


def _contraction(dim: int, norm: float, seed: int) -> Tensor:
    """A random non-symmetric (dim, dim) matrix with spectral norm ``norm``."""
    gen = torch.Generator().manual_seed(seed)
    mat = torch.randn(dim, dim, generator=gen, dtype=DT)
    return norm * mat / torch.linalg.matrix_norm(mat, ord=2)


def _symmetric(dim: int, low: float, high: float, seed: int) -> Tensor:
    """A random symmetric matrix with eigenvalues evenly spread over [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DT))
    return q @ torch.diag(torch.linspace(low, high, dim, dtype=DT)) @ q.T


def _affine_solution(a: Tensor, b: Tensor) -> Tensor:
    eye = torch.eye(a.shape[0], dtype=DT)
    return torch.linalg.solve(eye - a, b.T).T


# ----------------------------------------------------------------------------------------------------
# Known fixed points


@pytest.mark.parametrize("name", NAMES)
def test_cosine_fixed_point(name: str) -> None:
    x0 = torch.tensor([[0.0], [1.0], [-0.5]], dtype=DT)
    z, stats = SOLVERS[name](torch.cos, x0, 200, 1e-12)
    assert z.shape == x0.shape and z.dtype == DT
    assert torch.allclose(z, torch.full_like(z, COS_FIXED_POINT), atol=1e-11, rtol=0)
    assert stats["converged"].all() and not stats["diverged"].any()
    assert (stats["abs_res"] < 1e-12).all()


@pytest.mark.parametrize("name", NAMES)
def test_elementwise_affine_fixed_point(name: str) -> None:
    x0 = torch.zeros(2, 5, dtype=DT)
    z, stats = SOLVERS[name](lambda t: 0.5 * t + 1.0, x0, 200, 1e-12)
    assert torch.allclose(z, torch.full_like(z, 2.0), atol=1e-11, rtol=0)
    assert stats["converged"].all()


@pytest.mark.parametrize("name", NAMES)
def test_random_contractive_affine_map_200d(name: str) -> None:
    a = _contraction(200, 0.9, seed=0)
    b = torch.randn(3, 200, generator=torch.Generator().manual_seed(1), dtype=DT)
    z_star = _affine_solution(a, b)
    z, stats = SOLVERS[name](lambda t: t @ a.T + b, torch.zeros_like(b), 500, 1e-10)
    rel_err = torch.linalg.vector_norm(z - z_star, dim=1) / torch.linalg.vector_norm(z_star, dim=1)
    assert (rel_err < 1e-8).all(), rel_err
    assert stats["converged"].all()


@pytest.mark.parametrize("name", NAMES)
def test_float32_keeps_dtype(name: str) -> None:
    x0 = torch.zeros(2, 3, dtype=torch.float32)
    z, stats = SOLVERS[name](torch.cos, x0, 200, 1e-5)
    assert z.dtype == torch.float32
    assert stats["abs_res"].dtype == torch.float32
    assert torch.allclose(z, torch.full_like(z, COS_FIXED_POINT), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_relative_stop_mode_and_reported_residuals(name: str) -> None:
    a = _contraction(40, 0.8, seed=2)
    b = torch.randn(2, 40, generator=torch.Generator().manual_seed(3), dtype=DT)
    f = lambda t: t @ a.T + b  # noqa: E731
    z, stats = SOLVERS[name](f, torch.zeros_like(b), 300, 1e-9, stop_mode="rel")
    fz = f(z)
    abs_res = torch.linalg.vector_norm(fz - z, dim=1)
    rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1) + 1e-9)
    assert torch.allclose(stats["abs_res"], abs_res, rtol=1e-6, atol=1e-15)
    assert torch.allclose(stats["rel_res"], rel_res, rtol=1e-6, atol=1e-15)
    assert (stats["rel_res"] < 1e-9).all() and stats["converged"].all()


# ----------------------------------------------------------------------------------------------------
# Speed and memory of (limited-memory) Broyden


def test_broyden_and_lbroyden_beat_fixed_point() -> None:
    a = _symmetric(100, -0.95, 0.95, seed=4)
    b = torch.randn(2, 100, generator=torch.Generator().manual_seed(5), dtype=DT)
    z_star = _affine_solution(a, b)
    f = lambda t: t @ a.T + b  # noqa: E731
    x0 = torch.zeros_like(b)
    _, fp_stats = fixed_point(f, x0, 2000, 1e-9)
    assert fp_stats["converged"].all()
    for solve in (lambda: broyden(f, x0, 2000, 1e-9), lambda: lbroyden(f, x0, 2000, 1e-9, memory=8)):
        z, stats = solve()
        assert stats["converged"].all()
        assert (stats["nstep"] < fp_stats["nstep"]).all(), (stats["nstep"], fp_stats["nstep"])
        assert torch.allclose(z, z_star, atol=1e-8, rtol=0)


@pytest.mark.parametrize("overflow", ["window", "restart"])
def test_lbroyden_memory_is_bounded_and_converges(overflow: str) -> None:
    a = _symmetric(60, 0.0, 0.95, seed=6)
    b = torch.randn(2, 60, generator=torch.Generator().manual_seed(7), dtype=DT)
    z_star = _affine_solution(a, b)
    f = lambda t: t @ a.T + b  # noqa: E731
    for max_iter in (20, 200, 2000):
        z, stats = lbroyden(f, torch.zeros_like(b), max_iter, 1e-10, memory=8, overflow=overflow)
        assert stats["memory"] == 8
    # With the largest cap the solver ran far past its memory and still converged.
    assert stats["converged"].all() and (stats["nstep"] > 8).all()
    assert torch.allclose(z, z_star, atol=1e-8, rtol=0)


def test_lbroyden_default_memory_and_full_broyden_memory() -> None:
    f = lambda t: 0.5 * torch.tanh(t) + 1.0  # noqa: E731
    x0 = torch.zeros(1, 3, dtype=DT)
    assert lbroyden(f, x0, 100, 1e-10)[1]["memory"] == 8
    assert broyden(f, x0, 50, 1e-10)[1]["memory"] == 50
    assert broyden(f, x0, 50, 1e-10, memory=100)[1]["memory"] == 50


@pytest.mark.parametrize("overflow", ["window", "restart", "circular"])
def test_limited_memory_matches_full_broyden_until_the_buffer_is_full(overflow: str) -> None:
    a = _contraction(30, 0.9, seed=8)
    b = torch.randn(2, 30, generator=torch.Generator().manual_seed(9), dtype=DT)
    f = lambda t: torch.tanh(t @ a.T) + b  # noqa: E731
    x0 = torch.zeros_like(b)
    full = broyden(f, x0, 12, 0.0)[1]["trace"]
    limited = lbroyden(f, x0, 12, 0.0, memory=4, overflow=overflow)[1]["trace"]
    # Iterates 0..5 only use updates 1..4: identical; the overflow policy shows from there on.
    for k in range(6):
        assert torch.allclose(full[k], limited[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["broyden", "lbroyden"])
def test_broyden_zero_denominator_update_is_dropped(name: str) -> None:
    # g(z) = 1 for z <= 1, so the first secant pair has dg = 0 and a zero denominator; the update must
    # be skipped (H stays -I), and the next plain step lands on the fixed point 2 of 0.5 z + 1.
    f = lambda t: torch.where(t <= 1.0, t + 1.0, 0.5 * t + 1.0)  # noqa: E731
    z, stats = SOLVERS[name](f, torch.zeros(2, 1, dtype=DT), 20, 1e-12)
    assert torch.allclose(z, torch.full_like(z, 2.0), rtol=0, atol=1e-12)
    assert stats["converged"].all() and (stats["nstep"] == 2).all()


# ----------------------------------------------------------------------------------------------------
# Per-sample semantics


def _mixed_difficulty_map(dim: int) -> Callable[[Tensor], Tensor]:
    """Row-wise map with a different contraction factor and offset for each of 4 samples."""
    w = _contraction(dim, 1.0, seed=10)
    scale = torch.tensor([0.3, 0.6, 0.85, 0.95], dtype=DT)
    offset = torch.randn(4, dim, generator=torch.Generator().manual_seed(11), dtype=DT)

    def build(rows: List[int]) -> Callable[[Tensor], Tensor]:
        s, c = scale[rows, None], offset[rows]
        return lambda t: s * torch.tanh(t @ w.T) + c

    return build


SOLVER_CASES: Dict[str, Callable] = {
    "broyden": broyden,
    "lbroyden_window": lambda *a, **k: lbroyden(*a, memory=4, overflow="window", **k),
    "lbroyden_restart": lambda *a, **k: lbroyden(*a, memory=4, overflow="restart", **k),
    "anderson": anderson,
    "anderson_damped": lambda *a, **k: anderson(*a, m=3, beta=0.8, **k),
    "fixed_point": fixed_point,
}


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("case", sorted(SOLVER_CASES))
def test_batch_independence(case: str, check_every: int) -> None:
    solve = SOLVER_CASES[case]
    build = _mixed_difficulty_map(20)
    x0 = torch.zeros(4, 20, dtype=DT)
    z, stats = solve(build([0, 1, 2, 3]), x0, 300, 1e-10, check_every=check_every)
    assert stats["converged"].all()
    assert len(set(stats["nstep"].tolist())) > 1, "samples should stop at different steps"
    for i in range(4):
        zi, si = solve(build([i]), x0[i:i + 1], 300, 1e-10, check_every=check_every)
        assert torch.allclose(z[i], zi[0], rtol=0, atol=1e-12)
        assert stats["nstep"][i] == si["nstep"][0]
        assert stats["best_step"][i] == si["best_step"][0]


@pytest.mark.parametrize("case", sorted(SOLVER_CASES))
def test_check_every_does_not_change_results(case: str) -> None:
    solve = SOLVER_CASES[case]
    f = _mixed_difficulty_map(20)([0, 1, 2, 3])
    x0 = torch.zeros(4, 20, dtype=DT)
    z1, s1 = solve(f, x0, 300, 1e-10, check_every=1)
    z7, s7 = solve(f, x0, 300, 1e-10, check_every=7)
    assert torch.equal(z1, z7)
    assert torch.equal(s1["nstep"], s7["nstep"])
    assert s7["nfev"] >= s1["nfev"]
    assert (s7["nfev"] - 1) % 7 == 0


@pytest.mark.parametrize("name", NAMES)
def test_one_call_of_f_per_iteration(name: str) -> None:
    f = _counting(lambda t: 0.8 * torch.cos(t) + 0.1)
    z, stats = SOLVERS[name](f, torch.zeros(3, 4, dtype=DT), 100, 1e-10)
    assert stats["nfev"] == f.calls
    assert f.calls == 1 + int(stats["nstep"].max())
    assert len(stats["trace"]) == f.calls
    assert all(t.shape == (3,) for t in stats["trace"])
    assert stats["nstep"].dtype == torch.long and stats["best_step"].dtype == torch.long
    assert stats["diverged"].dtype == torch.bool and stats["converged"].dtype == torch.bool


@pytest.mark.parametrize("name", NAMES)
def test_stops_at_max_iter(name: str) -> None:
    f = _counting(lambda t: 0.99 * torch.sin(t) + 1.0)
    z, stats = SOLVERS[name](f, torch.zeros(2, 3, dtype=DT), 3, 1e-30)
    assert f.calls == 4
    assert (stats["nstep"] == 3).all()
    assert not stats["converged"].any() and not stats["diverged"].any()


@pytest.mark.parametrize("name", NAMES)
def test_already_converged_start_runs_no_iteration(name: str) -> None:
    f = _counting(lambda t: 0.5 * t + 1.0)
    z, stats = SOLVERS[name](f, torch.full((2, 3), 2.0, dtype=DT), 50, 1e-12)
    assert f.calls == 1
    assert (stats["nstep"] == 0).all() and stats["converged"].all()


@pytest.mark.parametrize("name", NAMES)
def test_no_autograd_graph(name: str) -> None:
    weight = torch.tensor(0.5, dtype=DT, requires_grad=True)
    z, stats = SOLVERS[name](lambda t: weight * t + 1.0, torch.zeros(2, 3, dtype=DT), 50, 1e-10)
    assert not z.requires_grad
    assert not stats["abs_res"].requires_grad


# ----------------------------------------------------------------------------------------------------
# NaN / Inf / divergence


def _nan_after(k: int, w: Tensor, bad_rows: List[int]) -> Callable[[Tensor], Tensor]:
    """0.9 tanh(W z) + 1 whose rows in ``bad_rows`` become NaN from call k + 2 on (iterate k + 1)."""

    def f(t: Tensor) -> Tensor:
        f.calls += 1
        out = 0.9 * torch.tanh(t @ w.T) + 1.0
        if f.calls > k + 1 and bad_rows:
            out = out.clone()
            out[bad_rows] = float("nan")
        return out

    f.calls = 0
    return f


@pytest.mark.parametrize("case", sorted(SOLVER_CASES))
def test_nan_marks_sample_diverged_and_keeps_best_finite_iterate(case: str) -> None:
    solve = SOLVER_CASES[case]
    w = _contraction(10, 1.0, seed=12)
    x0 = torch.stack([torch.zeros(10, dtype=DT), torch.full((10,), 0.3, dtype=DT)])
    k = 5
    z, stats = solve(_nan_after(k, w, [0]), x0, 300, 1e-10)
    assert stats["diverged"][0] and not stats["converged"][0]
    assert stats["nstep"][0] == k + 1
    assert torch.isfinite(z).all() and torch.isfinite(stats["abs_res"]).all()
    # The returned iterate is the best of iterates 0..k, i.e. what a clean run capped at k returns.
    z_ref, s_ref = solve(_nan_after(10 ** 9, w, []), x0[:1], k, 1e-10)
    assert torch.allclose(z[0], z_ref[0], rtol=0, atol=1e-12)
    assert stats["best_step"][0] == s_ref["best_step"][0]
    # The healthy sample is unaffected.
    z_ok, s_ok = solve(_nan_after(10 ** 9, w, []), x0[1:], 300, 1e-10)
    assert stats["converged"][1] and not stats["diverged"][1]
    assert torch.allclose(z[1], z_ok[0], rtol=0, atol=1e-12)
    assert stats["nstep"][1] == s_ok["nstep"][0]


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_start_and_inf_do_not_raise(name: str) -> None:
    def f(t: Tensor) -> Tensor:
        out = 0.5 * t + 1.0
        out = out.clone()
        out[0] = float("nan")
        out[1] = float("inf")
        return out

    x0 = torch.zeros(3, 2, dtype=DT)
    z, stats = SOLVERS[name](f, x0, 20, 1e-10)
    assert stats["diverged"].tolist() == [True, True, False]
    assert stats["nstep"][:2].tolist() == [0, 0]
    assert torch.equal(z[:2], x0[:2])
    assert torch.allclose(z[2], torch.full((2,), 2.0, dtype=DT), atol=1e-9)


def test_exploding_residual_is_divergence() -> None:
    x0 = torch.zeros(2, 3, dtype=DT)
    f = lambda t: torch.cat([2.0 * t[:1] + 1.0, 0.5 * t[1:] + 1.0])  # noqa: E731
    z, stats = fixed_point(f, x0, 500, 1e-10)
    assert stats["diverged"].tolist() == [True, False]
    # The residual doubles per step: past 1e6 times the initial one after about 20 steps.
    assert 15 <= int(stats["nstep"][0]) <= 25
    assert torch.equal(z[0], x0[0]) and stats["best_step"][0] == 0
    assert torch.allclose(z[1], torch.full((3,), 2.0, dtype=DT), atol=1e-9)


def test_relative_divergence_threshold() -> None:
    # rel residual of 3 t + 1 from t = 0 grows towards 2/3, i.e. below 1e3 times the initial 1: no divergence.
    z, stats = fixed_point(lambda t: 3.0 * t + 1.0, torch.zeros(1, 2, dtype=DT), 30, 1e-10, stop_mode="rel")
    assert not stats["diverged"].any()
    # with the absolute residual it explodes.
    z, stats = fixed_point(lambda t: 3.0 * t + 1.0, torch.zeros(1, 2, dtype=DT), 30, 1e-10, stop_mode="abs")
    assert stats["diverged"].all()


# ----------------------------------------------------------------------------------------------------
# Anderson with a singular least-squares system


@pytest.mark.parametrize("lam", [0.0, 1e-4])
def test_anderson_singular_history(lam: float, monkeypatch: pytest.MonkeyPatch) -> None:
    infos: List[Tensor] = []
    original = torch.linalg.solve_ex

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        infos.append(out[1].clone())
        return out

    monkeypatch.setattr(torch.linalg, "solve_ex", recording)
    c = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 0.25]], dtype=DT)
    # tol = 0 never converges, so the history fills with identical (z = c, g = 0) entries.
    z, stats = anderson(lambda t: c.clone(), torch.zeros_like(c), 10, 0.0, m=4, lam=lam)
    assert torch.allclose(z, c, rtol=0, atol=1e-12)
    assert (stats["abs_res"] < 1e-12).all()
    assert not stats["diverged"].any()
    if lam == 0.0:
        assert any(bool((i != 0).any()) for i in infos), "the singular system was not exercised"


def test_anderson_rank_deficient_one_dimensional_history() -> None:
    # In one dimension the residual Gram matrix has rank 1 whatever the history size.
    x0 = torch.tensor([[0.0], [2.0]], dtype=DT)
    for lam in (0.0, 1e-4):
        z, stats = anderson(torch.cos, x0, 100, 1e-12, m=5, lam=lam)
        assert torch.allclose(z, torch.full_like(z, COS_FIXED_POINT), atol=1e-11, rtol=0)
        assert stats["converged"].all()


# ----------------------------------------------------------------------------------------------------
# Argument handling and registry


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_raises_type_error(name: str) -> None:
    with pytest.raises(TypeError):
        SOLVERS[name](torch.cos, torch.zeros(1, 1, dtype=DT), 5, 1e-6, not_an_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_value_error(name: str) -> None:
    solve = SOLVERS[name]
    with pytest.raises(ValueError):
        solve(torch.cos, torch.zeros(3, dtype=DT), 5, 1e-6)
    with pytest.raises(ValueError):
        solve(torch.cos, torch.zeros(1, 3, dtype=DT), 5, 1e-6, stop_mode="nope")
    with pytest.raises(ValueError):
        solve(torch.cos, torch.zeros(1, 3, dtype=DT), 0, 1e-6)
    with pytest.raises(ValueError):
        solve(torch.cos, torch.zeros(1, 3, dtype=DT), 5, 1e-6, check_every=0)


def test_own_option_validation() -> None:
    x0 = torch.zeros(1, 2, dtype=DT)
    with pytest.raises(ValueError):
        broyden(torch.cos, x0, 5, 1e-6, memory=0)
    with pytest.raises(ValueError):
        lbroyden(torch.cos, x0, 5, 1e-6, overflow="sometimes")
    with pytest.raises(ValueError):
        anderson(torch.cos, x0, 5, 1e-6, m=0)
    with pytest.raises(ValueError):
        anderson(torch.cos, x0, 5, 1e-6, lam=-1.0)


def test_registry() -> None:
    assert set(SOLVERS) == {"broyden", "lbroyden", "anderson", "fixed_point"}
    assert get_solver("broyden") is broyden
    assert get_solver("LBroyden") is lbroyden
    assert get_solver("anderson") is anderson and get_solver("fixed_point") is fixed_point
    for exc in (KeyError, ValueError):
        with pytest.raises(exc) as info:
            get_solver("newton")
        message = str(info.value)
        assert "newton" in message
        assert all(name in message for name in SOLVERS)


def test_trace_starts_with_initial_residual() -> None:
    x0 = torch.zeros(2, 1, dtype=DT)
    _, stats = fixed_point(torch.cos, x0, 5, 1e-12)
    assert torch.allclose(stats["trace"][0], torch.ones(2, dtype=DT))
    assert math.isclose(float(stats["trace"][1][0]), abs(math.cos(1.0) - 1.0), rel_tol=1e-12)
