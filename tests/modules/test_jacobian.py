"""Tests of mdeq.modules.jacobian: Hutchinson Frobenius estimate and power iteration."""
from __future__ import annotations

import pytest
import torch

from mdeq.modules.jacobian import jac_loss_estimate, power_method

DT = torch.float64


def _matrix(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, dim, generator=gen, dtype=DT) / dim ** 0.5


def test_jac_loss_estimate_of_linear_map_and_its_gradient() -> None:
    dim, bsz = 30, 4
    a = _matrix(dim, seed=0).requires_grad_(True)
    z0 = torch.randn(bsz, dim, generator=torch.Generator().manual_seed(1), dtype=DT).requires_grad_(True)
    f0 = z0 @ a.T
    gen = torch.Generator().manual_seed(2)
    est = jac_loss_estimate(f0, z0, vecs=500, generator=gen)
    exact = (a.detach() ** 2).sum() / dim
    assert est.dim() == 0
    assert abs(float(est.detach()) / float(exact) - 1.0) < 0.03
    (grad,) = torch.autograd.grad(est, a)
    expected = 2.0 * a.detach() / dim
    assert float(grad.norm()) > 0
    cosine = float((grad * expected).sum() / (grad.norm() * expected.norm()))
    assert cosine > 0.98
    assert float((grad - expected).norm() / expected.norm()) < 0.2


def test_jac_loss_estimate_averages_per_sample_norms() -> None:
    # f(z)_b = s_b z_b has J_b = s_b I, so ||J_b||_F^2 / D = s_b^2.
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    z0 = torch.randn(3, 50, generator=torch.Generator().manual_seed(3), dtype=DT).requires_grad_(True)
    f0 = scale[:, None] * z0
    est = jac_loss_estimate(f0, z0, vecs=200, generator=torch.Generator().manual_seed(4))
    assert abs(float(est) / float((scale ** 2).mean()) - 1.0) < 0.03


def test_jac_loss_estimate_create_graph_flag() -> None:
    a = _matrix(8, seed=5).requires_grad_(True)
    z0 = torch.randn(2, 8, dtype=DT).requires_grad_(True)
    f0 = torch.tanh(z0 @ a.T)
    assert jac_loss_estimate(f0, z0, vecs=2, create_graph=True).requires_grad
    assert not jac_loss_estimate(f0, z0, vecs=2, create_graph=False).requires_grad
    # The graph of f0 survives, so the caller can still backpropagate through it.
    f0.sum().backward()
    assert a.grad is not None
    with pytest.raises(ValueError):
        jac_loss_estimate(f0.detach().requires_grad_(True), z0, vecs=0)


def test_power_method_finds_largest_modulus_of_a_non_symmetric_matrix() -> None:
    dim = 12
    gen = torch.Generator().manual_seed(6)
    basis = torch.eye(dim, dtype=DT) + 0.5 * torch.randn(dim, dim, generator=gen, dtype=DT) / dim ** 0.5
    eigs = torch.tensor([-0.9] + [0.6 - 0.05 * i for i in range(dim - 1)], dtype=DT)
    a = basis @ torch.diag(eigs) @ torch.linalg.inv(basis)
    scale = torch.tensor([1.0, 0.5], dtype=DT)
    z0 = torch.randn(2, dim, generator=gen, dtype=DT).requires_grad_(True)
    f0 = scale[:, None] * (z0 @ a.T)
    radius, vec = power_method(f0, z0, n_iters=200, generator=torch.Generator().manual_seed(7))
    assert radius.shape == (2,)
    assert torch.allclose(radius, torch.tensor([0.9, 0.45], dtype=DT), atol=1e-8, rtol=0)
    assert vec.shape == z0.shape and not vec.requires_grad
    # vec is a left eigenvector of J (an eigenvector of J^T), not a right one.
    for b in range(2):
        lam = -0.9 * float(scale[b])
        assert torch.allclose(scale[b] * (vec[b] @ a), lam * vec[b], atol=1e-8)
        assert not torch.allclose(scale[b] * (a @ vec[b]), lam * vec[b], atol=1e-3)


def test_power_method_argument_checks() -> None:
    z0 = torch.randn(2, 3, dtype=DT).requires_grad_(True)
    f0 = 2.0 * z0
    with pytest.raises(ValueError):
        power_method(f0, z0, n_iters=0)
    with pytest.raises(ValueError):
        power_method(f0.sum(dim=1), z0)
    radius, _ = power_method(f0, z0, n_iters=3)
    assert torch.allclose(radius, torch.full((2,), 2.0, dtype=DT))
