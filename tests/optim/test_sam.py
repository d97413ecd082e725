"""SAM, ASAM and USAM: the perturbation against reference formulas and the two-pass protocol."""

import copy
import math

import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import samkit


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).to(dtype)


def batch(dtype=torch.float64, n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def observed_eps(opt, model, x, y):
    """Run the first pass and return (w, grads, eps = w_perturbed - w)."""
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.first_step()
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0, strict=True)]
    return w0, grads, eps


def assert_close_lists(a, b, atol=1e-12):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=atol, rtol=1e-10)


def test_sam_eps_matches_reference():
    model = tiny_model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.07)
    _, grads, eps = observed_eps(opt, model, *batch())
    assert_close_lists(eps, reference.sam_eps(grads, 0.07))
    norm = math.sqrt(sum(float((e**2).sum()) for e in eps))
    assert norm == pytest.approx(0.07, rel=1e-10)


def test_usam_eps_matches_reference():
    model = tiny_model()
    opt = samkit.USAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    _, grads, eps = observed_eps(opt, model, *batch())
    assert_close_lists(eps, reference.usam_eps(grads, 0.3))


@pytest.mark.parametrize("p", [2, math.inf])
@pytest.mark.parametrize("normalization", ["elementwise", "filterwise"])
@pytest.mark.parametrize("paper_groups", [True, False])
def test_asam_eps_matches_reference(p, normalization, paper_groups):
    model = tiny_model()
    params = samkit.param_groups(model) if paper_groups else model.parameters()
    opt = samkit.ASAM(
        torch.optim.SGD(params, lr=0.1), rho=0.5, eta=0.01, p=p, normalization=normalization
    )
    # the optimizer's parameter order: weights first, then biases, with paper groups
    names = [
        n
        for g in opt.param_groups
        for n, q in model.named_parameters()
        for p_ in g["params"]
        if q is p_
    ]
    w0, grads, eps = observed_eps(opt, model, *batch())
    by_name = dict(model.named_parameters())
    order = [list(by_name).index(n) for n in names]
    normalize = [not (paper_groups and n.endswith("bias")) for n in names]
    expected = reference.asam_eps(
        [w0[i] for i in order], [grads[i] for i in order], 0.5, 0.01, p, normalization, normalize
    )
    assert_close_lists([eps[i] for i in order], expected)


def test_param_groups_follow_the_paper():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    groups = samkit.param_groups(model, weight_decay=5e-4)
    normalized = {id(p) for g in groups if g["normalize"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in normalized) == (not name.endswith("bias")), name
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    with pytest.raises(ValueError, match="no trainable parameters"):
        samkit.param_groups(nn.ReLU())


def test_quadratic_closed_form():
    """L(w) = w^T A w / 2: SAM+GD gives w' = w - lr A (w + rho A w / ||A w||)."""
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    lr, rho = 0.1, 0.2
    opt = samkit.SAM(torch.optim.SGD([w], lr=lr), rho=rho)
    for _ in range(5):
        w_ref = w.detach().clone()
        g = a @ w_ref
        w_ref = w_ref - lr * a @ (w_ref + rho * g / g.norm())

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ a @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), w_ref, atol=1e-14, rtol=0)


def test_usam_quadratic_closed_form():
    """USAM + GD on a quadratic: w' = w - lr A (I + rho A) w."""
    a = torch.diag(torch.tensor([4.0, 0.5], dtype=torch.float64))
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = samkit.USAM(torch.optim.SGD([w], lr=0.1), rho=0.3)
    w_ref = w.detach().clone()
    for _ in range(3):
        loss = 0.5 * w @ a @ w
        loss.backward()
        opt.first_step()
        (0.5 * w @ a @ w).backward()
        opt.second_step(zero_grad=True)
        w_ref = w_ref - 0.1 * a @ (w_ref + 0.3 * a @ w_ref)
    torch.testing.assert_close(w.detach(), w_ref, atol=1e-14, rtol=0)


@pytest.mark.parametrize("name", ["sam", "asam", "usam"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rho_zero_is_exactly_the_base_optimizer(name, base):
    x, y = batch(torch.float32)
    kw = dict(lr=0.05, momentum=0.9) if base == "sgd" else dict(lr=1e-2)
    m1, m2 = tiny_model(torch.float32), tiny_model(torch.float32)
    plain = samkit.create_optimizer(base, m1.parameters(), **kw)
    sharp = samkit.create_optimizer(name, m2.parameters(), base=base, rho=0.0, **kw)
    for _ in range(4):
        plain.zero_grad()
        loss_of(m1, x, y).backward()
        plain.step()
        sharp.step(lambda: (sharp.zero_grad(), loss_of(m2, x, y).backward(), 1.0)[-1])
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["sam", "asam", "usam"])
def test_second_step_restores_w_bit_for_bit(name):
    model = tiny_model(torch.float32)
    x, y = batch(torch.float32)
    opt = samkit.create_optimizer(name, model, lr=0.0, rho=0.9)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.first_step()
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))
    loss_of(model, x, y).backward()
    opt.second_step()
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p, w)


@pytest.mark.parametrize(
    "make",
    [
        lambda b: samkit.SAM(b),
        lambda b: samkit.USAM(b),
        lambda b: samkit.ASAM(b),
        lambda b: samkit.ASAM(b, p=math.inf),
        lambda b: samkit.ASAM(b, normalization="filterwise"),
    ],
)
def test_zero_gradient_gives_zero_eps(make):
    w = nn.Parameter(torch.randn(3, 4))
    opt = make(torch.optim.SGD([w], lr=0.1))
    w0 = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.first_step()
    assert torch.equal(w.detach(), w0)


def test_parameters_without_gradient_are_left_alone():
    used, unused = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = samkit.ASAM(torch.optim.SGD([used, unused], lr=0.1, momentum=0.9), rho=1.0)
    before = unused.detach().clone()
    for _ in range(2):
        opt.step(lambda: (opt.zero_grad(), (used**2).sum().backward(), 0.0)[-1])
    assert unused.grad is None and torch.equal(unused.detach(), before)
    assert "momentum_buffer" not in opt.base_optimizer.state[unused]


def test_mixed_devices_and_dtypes_share_one_norm():
    a = nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, dtype=torch.float32))
    opt = samkit.SAM(torch.optim.SGD([a, b], lr=0.1), rho=0.5)
    a.grad, b.grad = torch.ones(5, dtype=torch.float64), 2 * torch.ones(4)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.first_step()
    norm = math.sqrt(5 + 16)
    torch.testing.assert_close(a.detach() - a0, 0.5 * torch.ones(5, dtype=torch.float64) / norm)
    torch.testing.assert_close(b.detach() - b0, 0.5 * 2 * torch.ones(4) / norm)


def test_per_group_rho_can_change_between_steps():
    model = tiny_model()
    opt = samkit.ASAM(torch.optim.SGD(samkit.param_groups(model), lr=0.1), rho=0.5)
    x, y = batch()
    for group in opt.param_groups:
        group["rho"] = 0.0
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.first_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))
    opt.restore()
    opt.param_groups[0]["rho"] = 1.0  # weights only
    loss_of(model, x, y).backward()
    opt.first_step()
    moved = [not torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True)]
    assert moved == [True, False, True, False]  # conv.weight, conv.bias, linear.weight, linear.bias
    opt.restore()
    opt.param_groups[0]["rho"] = -1.0
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="Invalid rho: -1.0"):
        opt.first_step()


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=4),
    eta=st.floats(0.0, 1.0),
    rho=st.floats(0.01, 2.0),
    seed=st.integers(0, 2**16),
)
def test_asam_eps_is_on_the_boundary_and_maximizes_the_linear_model(shapes, eta, rho, seed):
    """For p = 2: ||T^-1 eps|| = rho and g.eps = rho ||T g|| (the dual norm), any shapes."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64) + 0.1) for s in shapes]
    grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    opt = samkit.ASAM(torch.optim.SGD(params, lr=0.1), rho=rho, eta=eta)
    w0 = [p.detach().clone() for p in params]
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    opt.first_step()
    eps = [p.detach() - w for p, w in zip(params, w0, strict=True)]
    ts = [w.abs() + eta for w in w0]
    ball = math.sqrt(sum(float(((e / t) ** 2).sum()) for e, t in zip(eps, ts, strict=True)))
    gain = sum(float((gr * e).sum()) for gr, e in zip(grads, eps, strict=True))
    dual = math.sqrt(sum(float(((t * gr) ** 2).sum()) for t, gr in zip(ts, grads, strict=True)))
    assert ball == pytest.approx(rho, rel=1e-6)
    assert gain == pytest.approx(rho * dual, rel=1e-6)


@pytest.mark.parametrize("p", [2, math.inf])
def test_asam_perturbation_is_invariant_to_rescaling_and_sam_is_not(p):
    """Scale a ReLU layer by alpha and the next by 1/alpha: the function is the same. With
    eta = 0, ASAM's perturbed loss is the same at both weights (its eps scales with the
    weights); SAM's is not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight.mul_(10.0)
        scaled[0].bias.mul_(10.0)
        scaled[2].weight.div_(10.0)
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    torch.testing.assert_close(net(x), scaled(x))

    def perturbed_loss(model, make):
        opt = make(torch.optim.SGD(model.parameters(), lr=0.1))
        loss_of(model, x, y).backward()
        opt.first_step()
        with torch.no_grad():
            return loss_of(model, x, y).item()

    asam = lambda b: samkit.ASAM(b, rho=0.5, eta=0.0, p=p)  # noqa: E731
    sam = lambda b: samkit.SAM(b, rho=0.5)  # noqa: E731
    a1, a2 = perturbed_loss(copy.deepcopy(net), asam), perturbed_loss(copy.deepcopy(scaled), asam)
    s1, s2 = perturbed_loss(copy.deepcopy(net), sam), perturbed_loss(copy.deepcopy(scaled), sam)
    assert a1 == pytest.approx(a2, rel=1e-10)
    assert abs(s1 - s2) > 1e-3 * abs(s1)
