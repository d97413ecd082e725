"""``converged=True`` from Lanczos means what it says, on constructed spectra that broke the
old gap-based stopping test (issue 11): clusters, near-double pairs, many outliers and a
repeated top eigenvalue, over many random starts, k = 1 and 3, tol 1e-3 to 1e-8."""

from __future__ import annotations

import warnings

import pytest
import torch
from curvature_helpers import spectrum_matrix

from samkit.curvature import top_eigenvalues


def _with_bulk(top, d=400, seed=0, low=-1.0, high=5.0):
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(d - len(top), generator=g, dtype=torch.float64) * (high - low) + low
    return torch.cat([torch.tensor(top, dtype=torch.float64), bulk])


SPECTRA = {
    # 10, 9.99, ..., 9.96 above the bulk
    "cluster": _with_bulk([10.0, 9.99, 9.98, 9.97, 9.96]),
    # a near-double top pair
    "pair": _with_bulk([10.0, 9.999]),
    # ten outliers 10, 9.9, ..., 9.1
    "outliers": _with_bulk([10.0 - 0.1 * i for i in range(10)]),
    # a repeated top eigenvalue
    "repeated": _with_bulk([5.0, 5.0, 5.0, 4.0], high=3.0),
}
CASES = [
    ("cluster", 1, 1e-4), ("cluster", 3, 1e-6), ("cluster", 1, 1e-8),
    ("pair", 1, 1e-8), ("pair", 3, 1e-3),
    ("outliers", 1, 1e-3), ("outliers", 3, 1e-5),
    ("repeated", 3, 1e-8), ("repeated", 1, 1e-4), ("repeated", 3, 1e-3),
]


@pytest.mark.parametrize(("name", "k", "tol"), CASES)
def test_converged_is_never_claimed_with_an_error_above_tol(name, k, tol):
    ev = SPECTRA[name]
    A = spectrum_matrix(ev, seed=3)
    true = ev.sort(descending=True).values[:k]
    converged, failures = 0, []
    starts = 12
    for seed in range(starts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a non-converged run warns
            r = top_eigenvalues(A, k=k, tol=tol, seed=seed)
        err = (r.values - true).abs() / true.abs()
        if r.converged:
            converged += 1
            if bool((err > tol).any()):
                failures.append((seed, r.values.tolist(), err.max().item(), r.matvecs))
            # the reported bounds hold
            assert torch.all((r.values - true).abs() <= r.error_bounds + 1e-13)
    assert not failures, failures
    assert converged >= starts - 1, converged


def test_repeated_top_eigenvalue_is_found_with_all_its_copies():
    A = spectrum_matrix(SPECTRA["repeated"], seed=3)
    r = top_eigenvalues(A, k=3, tol=1e-8)
    assert r.converged
    torch.testing.assert_close(r.values, torch.full((3,), 5.0, dtype=torch.float64))
    # the three vectors span the eigenspace of 5: orthonormal, and each an eigenvector
    gram = r.vectors.T @ r.vectors
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(A @ r.vectors, 5 * r.vectors, atol=1e-6, rtol=0)


def test_a_warm_start_on_a_lower_eigenvector_still_finds_the_top_one():
    """The EdgeTracker case: the previous top vector is now an exact eigenvector of lambda_2."""
    ev = SPECTRA["outliers"]
    A = spectrum_matrix(ev, seed=3)
    lam, vec = torch.linalg.eigh(A)
    second = vec[:, -2]
    r = top_eigenvalues(A, tol=1e-6, init=second)
    assert r.converged
    torch.testing.assert_close(r.values, lam[-1:].flip(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("k", "max_basis"), [(1, 12), (3, 24)])
def test_the_basis_is_bounded_and_restarts_still_converge(k, max_basis):
    ev = _with_bulk([10.0, 9.999], high=9.5)  # a pair close to a dense bulk: many products
    A = spectrum_matrix(ev, seed=3)
    r = top_eigenvalues(A, k=k, tol=1e-9, max_basis=max_basis, max_iter=3000)
    assert r.converged and r.matvecs > 2 * max_basis  # it had to restart
    true = ev.sort(descending=True).values[:k]
    assert torch.all((r.values - true).abs() <= 1e-9 * true)


def test_float32_does_not_claim_more_than_its_rounding_allows():
    A = spectrum_matrix(SPECTRA["cluster"], seed=3).float()
    with pytest.warns(UserWarning, match="did not converge"):
        r = top_eigenvalues(A, tol=1e-8, max_iter=400)
    assert not r.converged
    ok = top_eigenvalues(A, tol=1e-4)
    assert ok.converged and abs(float(ok.values[0]) - 10.0) <= 1e-3


def test_non_finite_products_raise():
    A = spectrum_matrix(SPECTRA["pair"][:50].clone(), seed=3)
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        top_eigenvalues(A)
