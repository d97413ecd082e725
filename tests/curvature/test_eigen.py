"""top_eigenvalues (Lanczos and power iteration) against torch.linalg.eigvalsh."""

from __future__ import annotations

import pytest
import torch
from curvature_helpers import cnn_data, dense_hessian, mlp_data, spectrum_matrix, tiny_cnn, tiny_mlp
from torch import nn

from samkit.curvature import EigenResult, HessianOperator, MatrixOperator, top_eigenvalues
from samkit.curvature import eigen as eigen_module

CE = nn.CrossEntropyLoss()


def _spectrum(seed=0, d=120):
    """Outliers 10, 9, 8.5 and -12 above a bulk in [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(d - 4, generator=g, dtype=torch.float64) * 4 - 2
    return torch.cat([torch.tensor([10.0, 9.0, 8.5, -12.0], dtype=torch.float64), bulk])


def _true_residuals(A, result):
    vals = result.values.to(A)
    return torch.linalg.vector_norm(A @ result.vectors - result.vectors * vals, dim=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("k", [1, 3])
def test_top_k_of_a_network_hessian_match_eigvalsh(kind, method, k):
    model, (x, y) = (tiny_mlp(), mlp_data()) if kind == "mlp" else (tiny_cnn(), cnn_data())
    ref = dense_hessian(model, CE, x, y)
    expected = torch.linalg.eigvalsh(ref).flip(0)[:k]
    H = HessianOperator(model, CE, (x, y))
    tol = 1e-6
    r = top_eigenvalues(H, k=k, tol=tol, method=method, max_iter=5000)
    assert r.converged and r.method == method
    torch.testing.assert_close(r.values, expected, rtol=2 * tol, atol=1e-12)
    assert r.vectors.shape == (H.dim, k) and r.vectors.dtype == torch.float64
    # the reported residuals are the true ones, and the bounds that stopped the run hold
    torch.testing.assert_close(_true_residuals(ref, r), r.residuals, rtol=1e-3, atol=1e-10)
    assert torch.all(r.error_bounds <= tol * r.values.abs())
    assert torch.all((r.values - expected).abs() <= r.error_bounds + 1e-12)
    assert r.matvecs == H.matvecs  # every product counted


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_largest_algebraic_and_largest_magnitude_on_an_indefinite_matrix(method):
    A = spectrum_matrix(_spectrum())
    la = top_eigenvalues(A, k=3, tol=1e-8, which="LA", method=method)
    lm = top_eigenvalues(A, k=3, tol=1e-8, which="LM", method=method)
    torch.testing.assert_close(la.values, torch.tensor([10.0, 9.0, 8.5], dtype=torch.float64))
    torch.testing.assert_close(lm.values, torch.tensor([-12.0, 10.0, 9.0], dtype=torch.float64))
    for r in (la, lm):
        assert r.converged
        torch.testing.assert_close(_true_residuals(A, r), r.residuals, rtol=1e-3, atol=1e-10)
        assert torch.all(r.error_bounds <= 1e-8 * r.values.abs())
        gram = r.vectors.T @ r.vectors
        torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_power_iteration_la_when_the_dominant_eigenvalue_is_negative():
    A = spectrum_matrix(torch.tensor([-20.0, 5.0, 4.0, 1.0, 0.5, -1.0]))
    r = top_eigenvalues(A, k=2, tol=1e-8, method="power", which="LA")
    torch.testing.assert_close(r.values, torch.tensor([5.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_lanczos_needs_fewer_products_than_power_iteration(tol):
    # a top gap of 5%: power iteration converges like 0.95^t, Lanczos like its Chebyshev rate
    ev = torch.cat([torch.tensor([1.0, 0.95]), torch.linspace(-0.5, 0.9, 298)])
    A = spectrum_matrix(ev.double(), seed=1)
    lz = top_eigenvalues(A, tol=tol, method="lanczos")
    pw = top_eigenvalues(A, tol=tol, method="power", max_iter=10_000)
    assert lz.converged and pw.converged
    assert abs(float(lz.values[0]) - 1.0) <= tol and abs(float(pw.values[0]) - 1.0) <= tol
    assert 3 * lz.matvecs < pw.matvecs, (lz.matvecs, pw.matvecs)


def test_lanczos_fewer_products_on_a_network_hessian():
    model, (x, y) = tiny_cnn(), cnn_data()
    H = HessianOperator(model, CE, (x, y))
    lz = top_eigenvalues(H, tol=1e-6, method="lanczos")
    pw = top_eigenvalues(H, tol=1e-6, method="power", max_iter=10_000)
    torch.testing.assert_close(lz.values, pw.values, rtol=1e-5, atol=0)
    assert lz.matvecs < pw.matvecs


def test_warm_start_converges_in_fewer_products():
    A = spectrum_matrix(_spectrum(d=200))
    cold = top_eigenvalues(A, tol=1e-8)
    # a slightly different matrix, as between two training steps
    B = A + 1e-3 * spectrum_matrix(torch.linspace(-1, 1, 200).double(), seed=5)
    warm = top_eigenvalues(B, tol=1e-8, init=cold)
    again = top_eigenvalues(B, tol=1e-8)
    torch.testing.assert_close(warm.values, again.values, rtol=1e-7, atol=0)
    # both stop at the minimum Krylov dimension (20); the warm start is further converged
    assert warm.matvecs <= again.matvecs and warm.error_bounds[0] < again.error_bounds[0]
    # without the minimum dimension (min_dim=1) the warm start saves products
    fast = top_eigenvalues(B, tol=1e-8, init=cold, min_dim=1)
    slow = top_eigenvalues(B, tol=1e-8, min_dim=1)
    assert fast.converged and slow.converged and fast.matvecs < slow.matvecs
    # the other forms of init: a flat vector, a list of parameter-shaped tensors, a matrix
    top_eigenvalues(B, tol=1e-8, init=cold.vectors[:, 0])
    op = MatrixOperator(B)
    assert top_eigenvalues(op, tol=1e-8, init=[cold.vectors[:, 0]]).converged
    assert top_eigenvalues(B, k=2, tol=1e-8, init=torch.randn(200, 2).double()).converged
    assert top_eigenvalues(B, k=2, tol=1e-8, method="power", init=cold).converged


def test_repeated_eigenvalues_and_low_rank_restart_after_breakdown():
    r = top_eigenvalues(torch.eye(30, dtype=torch.float64) * 2, k=3, tol=1e-8)
    torch.testing.assert_close(r.values, torch.full((3,), 2.0, dtype=torch.float64))
    # blocks of k = 3 until the minimum Krylov dimension max(2k + 1, 20) is passed
    assert r.converged and r.matvecs == 21
    r = top_eigenvalues(torch.eye(30, dtype=torch.float64) * 2, k=3, tol=1e-8, min_dim=3)
    assert r.converged and r.matvecs == 3
    low = spectrum_matrix(torch.cat([torch.tensor([3.0, 1.0]), torch.zeros(38)]).double())
    r = top_eigenvalues(low, k=4, tol=1e-8)
    torch.testing.assert_close(r.values, torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert r.converged
    zero = top_eigenvalues(torch.zeros(5, 5, dtype=torch.float64), k=2)
    assert zero.converged and torch.all(zero.values == 0)


def test_lagged_host_checks_give_the_same_pairs():
    """The CUDA path reads the coefficients one product late; it must reach the same answer."""
    A = spectrum_matrix(_spectrum())
    op = MatrixOperator(A)
    gen = torch.Generator().manual_seed(0)
    now = eigen_module._lanczos_top(op, 3, 1e-8, "LA", 120, gen, None, lag=0)
    gen = torch.Generator().manual_seed(0)
    late = eigen_module._lanczos_top(op, 3, 1e-8, "LA", 120, gen, None, lag=1)
    torch.testing.assert_close(now.values, late.values)
    assert late.matvecs == now.matvecs + 3  # one block of k = 3 later
    ident = MatrixOperator(torch.eye(20, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    r = eigen_module._lanczos_top(ident, 3, 1e-8, "LA", 20, gen, None, lag=1)
    torch.testing.assert_close(r.values, torch.ones(3, dtype=torch.float64))


def test_not_converged_is_reported():
    ev = torch.cat([torch.tensor([1.0, 0.99]), torch.linspace(-1, 0.98, 198)])
    A = spectrum_matrix(ev.double())
    with pytest.warns(UserWarning, match="did not converge"):
        r = top_eigenvalues(A, tol=1e-10, max_iter=5)
    assert not r.converged and r.matvecs == 5 and r.values.shape == (1,)
    with pytest.warns(UserWarning, match="did not converge"):
        r = top_eigenvalues(A, tol=1e-10, method="power", max_iter=5)
    assert not r.converged and r.matvecs == 5


def test_float32_operator_and_seed_reproducibility():
    A = spectrum_matrix(_spectrum()).float()
    a = top_eigenvalues(A, k=2, tol=1e-4, seed=3)
    b = top_eigenvalues(A, k=2, tol=1e-4, seed=3)
    assert a.vectors.dtype == torch.float32
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    torch.testing.assert_close(
        a.values, torch.tensor([10.0, 9.0], dtype=torch.float64), rtol=1e-4, atol=0
    )
    assert isinstance(a, EigenResult)


def test_bad_inputs_raise_clear_errors():
    A = spectrum_matrix(_spectrum())
    with pytest.raises(ValueError, match=r"Invalid k: 0 \(allowed: an integer >= 1"):
        top_eigenvalues(A, k=0)
    with pytest.raises(ValueError, match="Invalid k: 121"):
        top_eigenvalues(A, k=121)
    with pytest.raises(ValueError, match="Invalid k"):
        top_eigenvalues(A, k=1.5)
    for tol in (0, -1e-3, float("nan"), 1.0):
        with pytest.raises(ValueError, match="Invalid tol"):
            top_eigenvalues(A, tol=tol)
    with pytest.raises(ValueError, match="Invalid method: 'arnoldi'"):
        top_eigenvalues(A, method="arnoldi")
    with pytest.raises(ValueError, match="Invalid which: 'SA'"):
        top_eigenvalues(A, which="SA")
    with pytest.raises(ValueError, match="Invalid max_iter"):
        top_eigenvalues(A, k=3, max_iter=2)
    with pytest.raises(ValueError, match="Invalid init"):
        top_eigenvalues(A, init=torch.ones(7))
    with pytest.raises(ValueError, match="Invalid init"):
        top_eigenvalues(A, init=torch.zeros(120, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid operator"):
        top_eigenvalues("H")
