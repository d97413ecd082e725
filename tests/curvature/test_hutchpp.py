"""Hutch++ against the exact trace: exactness on low rank, fewer products than Hutchinson."""

from __future__ import annotations

import statistics

import pytest
import torch
from curvature_helpers import dense_hessian, mlp_data, spectrum_matrix, tiny_mlp
from torch import nn

from samkit.curvature import HessianOperator, MatrixOperator, hessian_trace, hutchpp_trace

CE = nn.CrossEntropyLoss()


def test_exact_when_the_rank_fits_in_the_sketch():
    # rank 5 <= s = 18 // 3 = 6: Q spans the range of A and the Hutchinson part is zero
    ev = torch.cat([torch.tensor([5.0, 3.0, -2.0, 1.0, 0.5]), torch.zeros(55)]).double()
    A = spectrum_matrix(ev, seed=1)
    exact = float(torch.trace(A))
    for seed in range(5):
        r = hutchpp_trace(MatrixOperator(A), matvecs=18, seed=seed)
        assert r.mean == pytest.approx(exact, abs=1e-10)
        assert r.stderr == pytest.approx(0.0, abs=1e-10)
        assert r.matvecs == 18 and r.samples.shape == (6,) and r.samples.dtype == torch.float64
    # one sketch column short of the rank: no longer exact
    r = hutchpp_trace(MatrixOperator(A), matvecs=12, seed=0)
    assert abs(r.mean - exact) > 1e-6


def test_products_are_counted_and_split_in_three():
    A = MatrixOperator(spectrum_matrix(torch.linspace(0, 1, 40).double(), seed=0))
    r = hutchpp_trace(A, matvecs=20)  # s = 6 sketch, 6 exact, r = 8 Hutchinson
    assert A.matvecs == 20 == r.matvecs and r.samples.shape == (8,)
    assert r.mean == pytest.approx(float(r.samples.mean()))
    again = hutchpp_trace(A, matvecs=20)
    assert again.mean == r.mean  # seeded: the same vectors


def test_fewer_products_than_hutchinson_at_the_same_error():
    # decaying spectrum 1/i^2: the few large eigenvalues carry Hutchinson's variance, Hutch++
    # takes them exactly. Mean relative error over 20 seeds at m products each.
    d = 300
    ev = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 2
    A = spectrum_matrix(ev, seed=4)
    exact = float(ev.sum())

    def error(fn, m):
        return statistics.mean(abs(fn(A, m, seed) - exact) / exact for seed in range(20))

    def hutchinson(A, m, seed):
        return hessian_trace(A, samples=m, seed=seed).mean

    def hutchpp(A, m, seed):
        return hutchpp_trace(A, matvecs=m, seed=seed).mean

    for m in (30, 60):
        assert error(hutchpp, m) < error(hutchinson, m) / 5
    # Hutch++ with 30 products beats Hutchinson with 4x as many
    assert error(hutchpp, 30) < error(hutchinson, 120)


def test_hutchpp_on_a_network_hessian_is_unbiased_and_seeded():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    exact = float(torch.trace(dense_hessian(model, CE, x, y)))
    # d = 43: a sketch of 15 columns, 15 exact, and 15 Hutchinson vectors
    results = [hutchpp_trace(H, matvecs=45, seed=s) for s in range(10)]
    for r in results:
        assert abs(r.mean - exact) <= 5 * r.stderr + 1e-12
    # a sketch as wide as the space (3 * 43 products) makes it exact
    assert hutchpp_trace(H, matvecs=129).mean == pytest.approx(exact, rel=1e-10)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"Invalid matvecs: 3 \(allowed: an integer >= 4"):
        hutchpp_trace(torch.eye(3, dtype=torch.float64), matvecs=3)
