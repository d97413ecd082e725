"""m-sharpness with the error increase and average-case sharpness: closed forms on quadratics,
a many-sample reference on a 9-parameter net, the agreement with ``sharpness(m=...)``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_sharpness import (
    Quadratic,
    _brute_force,
    _mse,
    _nine_parameter_net,
    trust_region_max,
)
from torch import nn

from samkit import sharpness
from samkit._sharpness import average_sharpness, m_sharpness


class PerExampleQuadratic(nn.Module):
    """Example i's loss: 1/2 (w - a_i)' D (w - a_i), D diagonal; ``forward`` returns the
    per-example losses (x holds the a_i)."""

    def __init__(self, d, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())
        self.register_buffer("d", d)

    def forward(self, x):
        return 0.5 * ((self.w - x) ** 2 * self.d).sum(dim=1)


def mean_loss(out, y):
    return out.mean()


def _problem(n=12, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)[:dim]
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w0 = torch.randn(dim, generator=g, dtype=torch.float64)
    return d, a, w0


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("p", [2, math.inf])
def test_m_sharpness_closed_form_on_per_example_quadratics(adaptive, p):
    d, a, w0 = _problem()
    model = PerExampleQuadratic(d, w0)
    data = (a, torch.zeros(len(a)))
    rho, m, eta = 0.4, 4, 0.1
    t = (w0.abs() + eta) if adaptive else torch.ones_like(w0)
    expected = []
    for start in range(0, len(a), m):  # micro-batch B: g_B = D (w - mean a_B), Hessian D
        g = (d * (w0 - a[start:start + m].mean(0))).numpy()
        c, h = t.numpy() * g, (t * d * t).numpy()
        if p == 2:
            expected.append(trust_region_max(c, np.diag(h), rho))
        else:  # separable: every coordinate to the end of its interval
            expected.append(float(np.sum(rho * np.abs(c) + 0.5 * h * rho**2)))
    r = m_sharpness(model, mean_loss, data, rho=rho, m=m, p=p, adaptive=adaptive, eta=eta,
                    steps=40, starts=1)
    assert r.batches == 3 and r.m == m
    np.testing.assert_allclose(r.batch_values, expected, rtol=1e-7)
    assert r.value == pytest.approx(np.mean(expected), rel=1e-7)
    # the maximum over all 12 examples at once is below the mean of the micro-batch maxima
    whole = sharpness(model, mean_loss, data, rho=rho, p=p, adaptive=adaptive, eta=eta, steps=40,
                      starts=1)
    assert whole.value < r.value
    assert math.isnan(r.error_increase)  # not asked for


def test_m_sharpness_equals_sharpness_with_m_and_reports_the_error_increase():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    ce = nn.CrossEntropyLoss()
    before = [w.detach().clone() for w in model.parameters()]
    for adaptive in (False, True):
        ref = sharpness(model, ce, (x, y), rho=0.5, adaptive=adaptive, eta=0.0, m=16, steps=5)
        r = m_sharpness(model, ce, (x, y), rho=0.5, m=16, adaptive=adaptive, eta=0.0, steps=5,
                        error=True)
        assert r.value == pytest.approx(ref.value, rel=1e-12)
        assert r.base_loss == pytest.approx(ref.base_loss, rel=1e-12)
        assert r.batches == 3 and r.evaluations == ref.evaluations
        # the error at w, by hand; the error at the maximizers rises
        with torch.no_grad():
            wrong = (model(x).argmax(1) != y).double()
        sizes = torch.tensor([16.0, 16.0, 8.0], dtype=torch.float64)
        by_batch = torch.stack([wrong[:16].mean(), wrong[16:32].mean(), wrong[32:].mean()])
        assert r.base_error == pytest.approx(float((sizes * by_batch).sum() / 40))
        assert r.error_increase == pytest.approx(r.perturbed_error - r.base_error)
        assert r.error_increase > 0
    for w, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(w, b)
    with pytest.raises(ValueError, match="error=True"):
        m_sharpness(model, _mse, (x, torch.zeros(40, 4, dtype=torch.float64)), rho=0.1, m=8,
                    error=True)
    with pytest.raises(ValueError, match="Invalid m"):
        m_sharpness(model, ce, (x, y), rho=0.1, m=0)


def test_m_sharpness_on_the_nine_parameter_net_reaches_the_brute_force_maximum():
    model, x, y = _nine_parameter_net(trained=False)
    rho, m = 0.5, 15
    brute = [_brute_force(model, x[s:s + m], y[s:s + m], rho, 2, True, 0.0, starts=64)
             for s in range(0, len(x), m)]
    r = m_sharpness(model, _mse, (x, y), rho=rho, m=m, adaptive=True, eta=0.0)
    for got, best in zip(r.batch_values, brute, strict=True):
        assert 0.95 * best <= got <= best * (1 + 1e-9) + 1e-12
    assert r.value == pytest.approx(np.mean(r.batch_values), rel=1e-12)


@pytest.mark.parametrize("distribution, factor", [("gaussian", 1 / 2), ("uniform", 1 / 6)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_average_sharpness_closed_form_on_a_quadratic(distribution, factor, adaptive):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    A = (q * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)) @ q.T
    w0 = torch.randn(6, generator=g, dtype=torch.float64)
    # a small gradient at w0 (the linear term has mean 0 but would dominate the variance)
    b = -A @ w0 + 0.05 * torch.randn(6, generator=g, dtype=torch.float64)
    model = Quadratic(A, b, w0)
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    sigma, eta = 0.3, 0.05
    t = (w0.abs() + eta) if adaptive else torch.ones_like(w0)
    # E[L(w + σTz)] - L(w) = σ² E[z'TATz]/2 = σ² Var(z_i) tr(TAT)/2, Var = 1 or 1/3
    expected = float(factor * sigma**2 * (t * torch.diag(A) * t).sum())
    r = average_sharpness(model, lambda out, y: out, data, sigma=sigma, samples=2000,
                          distribution=distribution, adaptive=adaptive, eta=eta, seed=1)
    assert r.samples == 2000 and r.stderr < 0.05 * expected
    assert abs(r.value - expected) < 4 * r.stderr
    assert r.base_loss == pytest.approx(float(0.5 * w0 @ A @ w0 + b @ w0))
    assert r.perturbed_loss == pytest.approx(r.base_loss + r.value)
    # seeded: the same seed draws the same perturbations (checked on 200 samples: the 2,000
    # above are for the closed form)
    first, again = (average_sharpness(model, lambda out, y: out, data, sigma=sigma, samples=200,
                                      distribution=distribution, adaptive=adaptive, eta=eta,
                                      seed=1) for _ in range(2))
    assert again.value == first.value
    assert torch.equal(model.w.detach(), w0)


def test_average_sharpness_against_a_many_sample_reference_on_the_nine_parameter_net():
    model, x, y = _nine_parameter_net(trained=False)
    names = [n for n, _ in model.named_parameters()]
    ws = [w.detach() for w in model.parameters()]
    flat = torch.cat([w.reshape(-1) for w in ws])
    sizes = [w.numel() for w in ws]

    def loss(v):
        views = (t.view_as(w) for t, w in zip(v.split(sizes), ws, strict=True))
        return _mse(torch.func.functional_call(model, dict(zip(names, views, strict=True)),
                                               (x,)), y)

    batched = torch.func.vmap(loss)
    g = torch.Generator().manual_seed(99)
    for distribution in ("gaussian", "uniform"):
        for adaptive in (False, True):
            scale = flat.abs() if adaptive else torch.ones_like(flat)
            z = torch.randn(50_000, 9, generator=g, dtype=torch.float64)
            if distribution == "uniform":
                z = torch.rand(50_000, 9, generator=g, dtype=torch.float64) * 2 - 1
            sigma = 0.3
            inc = batched(flat + sigma * scale * z) - loss(flat)
            ref, ref_se = float(inc.mean()), float(inc.std() / math.sqrt(inc.numel()))
            r = average_sharpness(model, _mse, (x, y), sigma=sigma, samples=400,
                                  distribution=distribution, adaptive=adaptive, eta=0.0)
            assert abs(r.value - ref) < 4 * math.hypot(r.stderr, ref_se), (
                distribution, adaptive, r.value, ref)
            assert r.value > 0


def test_average_sharpness_error_increase_and_bad_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 6)
    with torch.no_grad():
        y = model(x).argmax(1)  # error 0 at w: a perturbation can only raise it
    ce = nn.CrossEntropyLoss()
    small = average_sharpness(model, ce, (x, y), sigma=0.01, error=True)
    large = average_sharpness(model, ce, (x, y), sigma=1.0, error=True)
    with torch.no_grad():
        assert float((model(x).argmax(1) != y).float().mean()) == 0.0
    assert small.base_error == 0.0
    assert 0.0 <= small.error_increase < large.error_increase
    # data split into batches: the size-weighted mean of the same draws
    chunks = [(x[:40], y[:40]), (x[40:], y[40:])]
    split = average_sharpness(model, ce, chunks, sigma=1.0, error=True)
    assert split.value == pytest.approx(large.value, rel=1e-5)
    assert split.error_increase == pytest.approx(large.error_increase, abs=1e-6)
    for bad, match in (({"sigma": -1.0}, "Invalid sigma"), ({"samples": 1}, "Invalid samples"),
                       ({"distribution": "laplace"}, "Invalid distribution")):
        with pytest.raises(ValueError, match=match):
            average_sharpness(model, ce, (x, y), **{"sigma": 0.1, **bad})
