"""The effective Hessian H + (rho/c) H M H against dense float64 references on a tiny model."""

import math

import pytest
import torch
from curvature_helpers import dense_hessian, mlp_data, tiny_mlp
from torch import nn

import samkit
from samkit.curvature import HessianOperator, effective_hessian, top_eigenvalues
from samkit.stability import base_edge_for, sam_edge

LOSS = nn.CrossEntropyLoss()


def dense_grad(model, x, y):
    params = list(model.parameters())
    gs = torch.autograd.grad(LOSS(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in gs])


def flat_params(model):
    return [p.detach() for p in model.parameters()]


def reference(model, x, y, diag_of):
    """H + H D H with D from ``diag_of(params, g)`` (the test's own formula), dense."""
    H = dense_hessian(model, LOSS, x, y)
    g = dense_grad(model, x, y)
    D = diag_of(flat_params(model), g)
    return H + H @ torch.diag(D) @ H


def operator(model, opt, x, y):
    H = HessianOperator(model, LOSS, (x, y))
    Heff = effective_hessian(H, opt)
    dense = Heff @ torch.eye(Heff.shape[0], dtype=torch.float64)
    return Heff, dense, H


def groups(model):
    return samkit.param_groups(model)  # biases: normalize=False


def test_sam_is_h_plus_rho_over_norm_h_squared():
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.07)
    ref = reference(model, x, y, lambda ps, g: torch.full_like(g, 0.07 / float(g.norm())))
    Heff, dense, H = operator(model, opt, x, y)
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)
    # two products of H per product, all counted
    assert Heff.matvecs == Heff.shape[0] and H.matvecs == 2 * Heff.shape[0]
    assert Heff.hessian_products == H.matvecs
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(Heff.shape[0], 3, dtype=torch.float64, generator=gen)
    cols = torch.stack([Heff @ V[:, j] for j in range(3)], dim=1)
    torch.testing.assert_close(Heff @ V, cols, rtol=1e-12, atol=1e-13)  # matmat == matvecs


def test_usam_is_h_plus_rho_h_squared():
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.USAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    ref = reference(model, x, y, lambda ps, g: torch.full_like(g, 0.3))
    torch.testing.assert_close(operator(model, opt, x, y)[1], ref, rtol=1e-10, atol=1e-12)


def _asam_diag(rho, eta, filterwise):
    def diag_of(ps, g):
        ts = []
        for i, p in enumerate(ps):
            if i % 2 == 1:  # biases (Linear weight, bias, weight, bias): T = I
                ts.append(torch.ones_like(p).reshape(-1))
            elif filterwise:
                rows = p.reshape(p.shape[0], -1).norm(dim=1) + eta
                ts.append(rows[:, None].expand_as(p).reshape(-1))
            else:
                ts.append((p.abs() + eta).reshape(-1))
        t = torch.cat(ts)
        return rho * t * t / float((t * g).norm())

    return diag_of


@pytest.mark.parametrize("normalization", ["elementwise", "filterwise"])
def test_asam_is_h_plus_rho_over_norm_tg_h_t2_h_with_biases_unnormalized(normalization):
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.ASAM(
        torch.optim.SGD(groups(model), lr=0.1), rho=0.5, eta=0.02, normalization=normalization
    )
    ref = reference(model, x, y, _asam_diag(0.5, 0.02, normalization == "filterwise"))
    torch.testing.assert_close(operator(model, opt, x, y)[1], ref, rtol=1e-10, atol=1e-12)


def test_asam_reads_per_group_rho():
    model, (x, y) = tiny_mlp(), mlp_data()
    gs = groups(model)
    gs[1]["rho"] = 0.1  # the biases' own rho
    opt = samkit.ASAM(torch.optim.SGD(gs, lr=0.1), rho=0.5, eta=0.02)
    base = _asam_diag(1.0, 0.02, False)

    def diag_of(ps, g):
        d = base(ps, g)
        sizes = [p.numel() for p in ps]
        rhos = torch.cat([torch.full((n,), 0.5 if i % 2 == 0 else 0.1, dtype=torch.float64)
                          for i, n in enumerate(sizes)])
        return d * rhos

    ref = reference(model, x, y, diag_of)
    torch.testing.assert_close(operator(model, opt, x, y)[1], ref, rtol=1e-10, atol=1e-12)


def test_fishersam_is_h_plus_rho_h_finv_h_over_sqrt_g_finv_g():
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.FisherSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2, eta=5.0)

    def diag_of(ps, g):
        f_inv = 1.0 / (1.0 + 5.0 * g * g)
        return 0.2 * f_inv / float(torch.sqrt((g * f_inv * g).sum()))

    ref = reference(model, x, y, diag_of)
    torch.testing.assert_close(operator(model, opt, x, y)[1], ref, rtol=1e-10, atol=1e-12)


def test_gsam_over_asam_uses_its_current_rho_and_to_scipy_works():
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.create_optimizer("gsam", model, lr=0.1, ascent="asam", eta=0.02, rho_max=0.5)
    ref = reference(model, x, y, _asam_diag(0.5, 0.02, False))
    Heff, dense, _ = operator(model, opt, x, y)
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)
    import numpy as np

    v = np.random.default_rng(0).standard_normal(Heff.shape[0])
    out = Heff.to_scipy() @ v
    np.testing.assert_allclose(out, (ref @ torch.from_numpy(v)).numpy(), rtol=1e-9, atol=1e-12)


def test_on_sam_the_effective_condition_is_exactly_the_sam_edge():
    """λ_max(H + (ρ/‖g‖)H²) = λ₁ + (ρ/‖g‖)λ₁², and it reaches 2/η exactly when λ₁ reaches the
    SAM-edge: φ(sam_edge) = 2/η for φ(λ) = λ + (ρ/‖g‖)λ². The two ratios λ_eff/(2/η) and
    λ₁/sam_edge cross 1 together (they are not the same number away from 1)."""
    model, (x, y) = tiny_mlp(), mlp_data()
    lr, rho = 0.05, 0.1
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    H = HessianOperator(model, LOSS, (x, y))
    dense = dense_hessian(model, LOSS, x, y)
    lam1 = float(torch.linalg.eigvalsh(dense)[-1])
    gnorm = float(dense_grad(model, x, y).norm())
    lam_eff = float(top_eigenvalues(effective_hessian(H, opt), k=1, tol=1e-10).values[0])
    a = rho / gnorm
    assert lam_eff == pytest.approx(lam1 + a * lam1**2, rel=1e-8)
    edge = sam_edge(lr, rho, gnorm)
    base = base_edge_for(opt)
    assert base == pytest.approx(2 / lr)
    assert edge + a * edge**2 == pytest.approx(base, rel=1e-12)
    # the step size at which this λ₁ sits exactly at the SAM-edge: both ratios are 1 there
    lr_at_edge = 2 / (lam1 + a * lam1**2)
    assert sam_edge(lr_at_edge, rho, gnorm) == pytest.approx(lam1, rel=1e-10)
    assert (lam_eff / base > 1) == (lam1 / edge > 1)


def test_optimizers_without_a_form_say_why():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, LOSS, (x, y))
    asam_inf = samkit.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), p=math.inf)
    with pytest.raises(ValueError, match="p = inf"):
        effective_hessian(H, asam_inf)
    friendly = samkit.FriendlySAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="running mean"):
        effective_hessian(H, friendly)
    with pytest.raises(ValueError, match="sharpness-aware"):
        effective_hessian(H, torch.optim.SGD(model.parameters(), lr=0.1))
    first = [p for p in model.parameters()][:2]
    H_part = HessianOperator(model, LOSS, (x, y), params=first)
    with pytest.raises(ValueError, match="does not differentiate"):
        effective_hessian(H_part, samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1)))


# --------------------------------------------------------------------------- on λ₁'s Krylov space


def test_keep_basis_returns_an_orthonormal_q_and_exactly_a_q():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, LOSS, (x, y))
    dense = dense_hessian(model, LOSS, x, y)
    for max_basis in (None, 12):  # 12: the run restarts, the relation must survive it
        top = top_eigenvalues(H, k=1, tol=1e-10, keep_basis=True, max_basis=max_basis,
                              block_size=2)
        q, g = top.basis, top.image
        assert q.shape == g.shape and q.shape[0] == dense.shape[0] and q.shape[1] >= 2
        eye = torch.eye(q.shape[1], dtype=q.dtype)
        assert torch.allclose(q.T @ q, eye, atol=1e-10)
        assert torch.allclose(g, dense @ q, atol=1e-9)
    assert top_eigenvalues(H, k=1, tol=1e-6).basis is None  # only on request


@pytest.mark.parametrize("ascent", ["sam", "usam"])
def test_sam_effective_top_from_lambda1s_krylov_space_costs_one_product(ascent):
    """For SAM/USAM, H_eff = H + cH² is a polynomial in H: Rayleigh-Ritz on the space of H's
    own Lanczos run gives λ_max(H_eff) (dense float64 reference) for one product of H."""
    from samkit.curvature.effective import effective_top_on_krylov, is_polynomial_in_h

    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.create_optimizer(ascent, model, lr=0.05, rho=0.1)
    H = HessianOperator(model, LOSS, (x, y))
    Heff = effective_hessian(H, opt)
    assert is_polynomial_in_h(Heff)
    dense_eff = Heff @ torch.eye(Heff.shape[0], dtype=torch.float64)
    exact = float(torch.linalg.eigvalsh(0.5 * (dense_eff + dense_eff.T))[-1])
    top = top_eigenvalues(H, k=1, tol=1e-8, keep_basis=True, block_size=2)
    before = H.matvecs
    pair = effective_top_on_krylov(Heff, top, tol=1e-6)
    assert H.matvecs - before == 1 and pair.matvecs == 1
    assert pair.converged and pair.method == "rayleigh-ritz"
    assert float(pair.values[0]) == pytest.approx(exact, rel=1e-6)
    # the bound is honest: the value is within it of an eigenvalue of H_eff
    eigs = torch.linalg.eigvalsh(0.5 * (dense_eff + dense_eff.T))
    assert float((eigs - pair.values[0]).abs().min()) <= float(pair.error_bounds[0]) + 1e-12
    u = pair.vectors[:, 0]
    assert float((dense_eff @ u - pair.values[0] * u).norm()) == pytest.approx(
        float(pair.residuals[0]), rel=1e-6, abs=1e-12)


def test_asam_pair_on_hs_krylov_space_is_not_taken_as_the_top_without_lanczos():
    """For ASAM (D not a multiple of I) the pair's residual is still exact, and the form is
    flagged as not a polynomial in H: the tracker only uses it as a warm start."""
    from samkit.curvature.effective import effective_top_on_krylov, is_polynomial_in_h

    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.ASAM(torch.optim.SGD(groups(model), lr=0.05), rho=0.5)
    H = HessianOperator(model, LOSS, (x, y))
    Heff = effective_hessian(H, opt)
    assert not is_polynomial_in_h(Heff)
    dense_eff = Heff @ torch.eye(Heff.shape[0], dtype=torch.float64)
    dense_eff = 0.5 * (dense_eff + dense_eff.T)
    top = top_eigenvalues(H, k=1, tol=1e-8, keep_basis=True, block_size=2, min_dim=6)
    pair = effective_top_on_krylov(Heff, top, tol=1e-6)
    u = pair.vectors[:, 0]
    assert float((dense_eff @ u - pair.values[0] * u).norm()) == pytest.approx(
        float(pair.residuals[0]), rel=1e-6, abs=1e-12)
    # a Rayleigh quotient: never above the true top
    assert float(pair.values[0]) <= float(torch.linalg.eigvalsh(dense_eff)[-1]) * (1 + 1e-12)


def test_effective_top_on_krylov_needs_the_basis():
    from samkit.curvature.effective import effective_top_on_krylov

    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.create_optimizer("sam", model, lr=0.05, rho=0.1)
    H = HessianOperator(model, LOSS, (x, y))
    with pytest.raises(ValueError, match="keep_basis=True"):
        effective_top_on_krylov(effective_hessian(H, opt), top_eigenvalues(H, tol=1e-6), 1e-6)
