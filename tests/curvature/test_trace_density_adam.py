"""Hutchinson trace, stochastic Lanczos quadrature, and the Adam-preconditioned Hessian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from curvature_helpers import dense_hessian, mlp_data, spectrum_matrix, tiny_mlp
from torch import nn

from samkit.curvature import (
    HessianOperator,
    adam_preconditioned,
    hessian_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)

CE = nn.CrossEntropyLoss()

# -- Hutchinson -----------------------------------------------------------------------------------


def test_trace_converges_with_its_standard_error():
    A = spectrum_matrix(torch.linspace(-1, 3, 60).double(), seed=2)
    exact = float(torch.trace(A))
    off = A - torch.diag(torch.diag(A))
    sd = math.sqrt(2 * float((off**2).sum()))  # Var(v'Av) = 2 sum_{i != j} A_ij^2
    small = hessian_trace(A, samples=100, seed=0)
    large = hessian_trace(A, samples=1600, seed=1)
    for r, m in ((small, 100), (large, 1600)):
        assert r.matvecs == m and r.samples.shape == (m,)
        assert abs(r.mean - exact) <= 4 * r.stderr
        assert r.stderr == pytest.approx(sd / math.sqrt(m), rel=0.25)
    assert large.stderr < small.stderr / 2.5  # 1/sqrt(m): 4x fewer errors with 16x samples
    assert r.samples.dtype == torch.float64


def test_trace_of_a_network_hessian():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    exact = float(torch.trace(dense_hessian(model, CE, x, y)))
    r = hessian_trace(H, samples=400, seed=0)
    assert abs(r.mean - exact) <= 4 * r.stderr and r.stderr > 0
    again = hessian_trace(H, samples=400, seed=0)
    assert again.mean == r.mean  # seeded


def test_trace_of_a_diagonal_matrix_is_exact():
    # v'Dv = sum D_ii for every Rademacher v: zero variance
    r = hessian_trace(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)), samples=5)
    assert r.mean == pytest.approx(55.0) and r.stderr == pytest.approx(0.0, abs=1e-12)


def test_trace_bad_inputs():
    with pytest.raises(ValueError, match=r"Invalid samples: 1 \(allowed: an integer >= 2"):
        hessian_trace(torch.eye(3), samples=1)


# -- stochastic Lanczos quadrature ----------------------------------------------------------------


def test_slq_with_full_steps_recovers_the_spectrum():
    ev = torch.tensor([-1.0, 0.5, 2.0, 3.0, 7.0, 11.0], dtype=torch.float64)
    A = spectrum_matrix(ev, seed=3)
    r = spectral_density(A, num_probes=2, num_steps=6, seed=0)
    assert r.nodes.shape == (2, 6) and r.matvecs == 12
    np.testing.assert_allclose(np.sort(r.nodes, axis=1), np.tile(ev.numpy(), (2, 1)), atol=1e-9)
    np.testing.assert_allclose(r.weights.sum(axis=1), 1.0)


def test_slq_quadrature_is_exact_for_low_moments():
    # for a diagonal matrix every Rademacher probe has v'A^p v / d = tr(A^p) / d exactly, and
    # m Lanczos steps integrate polynomials of degree <= 2m - 1 exactly
    diag = torch.linspace(-2, 5, 200, dtype=torch.float64) ** 3 / 20
    r = spectral_density(torch.diag(diag), num_probes=1, num_steps=4, seed=1)
    for power in range(0, 8):
        exact = float((diag**power).mean())
        assert r.moment(power) == pytest.approx(exact, rel=1e-8, abs=1e-10)
    assert r.trace() == pytest.approx(float(diag.sum()), rel=1e-9)
    grid = np.linspace(-10, 10, 20001)
    assert np.trapezoid(r.density(grid, sigma=0.2), grid) == pytest.approx(1.0, abs=1e-6)


def test_slq_stops_at_an_invariant_subspace():
    A = spectrum_matrix(torch.cat([torch.tensor([4.0, 1.0]), torch.zeros(28)]).double())
    r = spectral_density(A, num_steps=10, seed=0)
    live = r.nodes[r.weights > 1e-12]
    assert r.matvecs <= 4 and np.all(np.min(np.abs(live[:, None] - [0.0, 1.0, 4.0]), 1) < 1e-8)


def test_plot_spectral_density_draws_a_curve():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = spectral_density(spectrum_matrix(torch.linspace(0, 1, 40).double()), num_steps=10)
    ax = plot_spectral_density(r, num_points=200)
    (line,) = ax.get_lines()
    assert len(line.get_xdata()) == 200 and np.all(line.get_ydata() >= 1e-8)
    plt.close(ax.figure)
    fig, ax2 = plt.subplots()
    assert plot_spectral_density(r, ax=ax2, log=False, sigma=0.05) is ax2
    plt.close(fig)


def test_slq_bad_inputs():
    with pytest.raises(ValueError, match="Invalid num_probes"):
        spectral_density(torch.eye(3), num_probes=0)
    with pytest.raises(ValueError, match="Invalid num_steps"):
        spectral_density(torch.eye(3), num_steps=0)
    r = spectral_density(torch.eye(3).double(), num_steps=2)
    with pytest.raises(ValueError, match="Invalid sigma"):
        r.density(np.zeros(3), sigma=0.0)


# -- Adam-preconditioned Hessian ------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt_cls, kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"amsgrad": True})]
)
def test_adam_preconditioned_matches_dense_p_inverse_h(opt_cls, kw):
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = opt_cls(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, **kw)
    for _ in range(3):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    H = HessianOperator(model, CE, (x, y))
    P = adam_preconditioned(H, opt)
    # P = diag(sqrt(v / (1 - beta2^t)) + eps), written from torch.optim's state by hand
    diag = []
    for p in model.parameters():
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if kw.get("amsgrad") else st["exp_avg_sq"]
        diag.append((v / (1 - 0.99 ** float(st["step"]))).sqrt().reshape(-1) + 1e-6)
    pdiag = torch.cat(diag)
    dense = dense_hessian(model, CE, x, y)
    sym = dense / pdiag.sqrt()[:, None] / pdiag.sqrt()[None, :]
    torch.testing.assert_close(P @ torch.eye(H.dim, dtype=torch.float64), sym)
    ref = np.linalg.eigvals((dense / pdiag[:, None]).numpy()).real.max()  # lambda_1(P^-1 H)
    top = top_eigenvalues(P, tol=1e-8)
    assert float(top.values[0]) == pytest.approx(ref, rel=1e-7)


def test_adam_preconditioned_bad_inputs():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    with pytest.raises(ValueError, match="take at least one optimizer step"):
        adam_preconditioned(H, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="no betas"):
        adam_preconditioned(H, torch.optim.SGD(model.parameters(), lr=0.1))
    partial = torch.optim.Adam(model[0].parameters())
    CE(model(x), y).backward()
    partial.step()
    with pytest.raises(ValueError, match="does not hold the parameter '2.weight'"):
        adam_preconditioned(H, partial)
    with pytest.raises(ValueError, match="Invalid H"):
        adam_preconditioned(torch.eye(3), torch.optim.Adam(model.parameters()))
