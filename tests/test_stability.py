"""Edges: closed forms, limits, and bounded/diverging runs just below/above them."""

import math

import pytest
import torch
from torch import nn

import samkit
from samkit.stability import adam_edge, gd_edge, momentum_edge, sam_edge, usam_edge


def test_closed_forms():
    assert gd_edge(0.1) == pytest.approx(20.0)
    assert momentum_edge(0.1, 0.9) == pytest.approx(38.0)
    assert momentum_edge(0.1, 0.9, nesterov=True) == pytest.approx(38.0 / 2.8)
    assert adam_edge(1e-3, 0.9) == pytest.approx(3.8 / 1e-4)
    lr, rho, g = 0.05, 0.1, 0.3
    root = (g / (2 * rho)) * (math.sqrt(1 + 8 * rho / (lr * g)) - 1)  # the textbook form
    assert sam_edge(lr, rho, g) == pytest.approx(root, rel=1e-12)
    lam = sam_edge(lr, rho, g)
    assert lr * lam * (1 + rho * lam / g) == pytest.approx(2.0, rel=1e-12)
    assert usam_edge(lr, rho) == pytest.approx((math.sqrt(1 + 8 * rho / lr) - 1) / (2 * rho))


def test_limits():
    assert sam_edge(0.1, 0.0, 0.5) == gd_edge(0.1)
    assert usam_edge(0.1, 0.0) == gd_edge(0.1)
    assert momentum_edge(0.1, 0.0) == gd_edge(0.1)
    assert sam_edge(0.1, 1e-12, 1.0) == pytest.approx(20.0, rel=1e-9)
    assert sam_edge(0.1, 0.05, 0.0) == 0.0  # finite as ||g|| -> 0
    assert sam_edge(0.1, 0.0, 0.0) == 20.0
    small = [sam_edge(0.1, 0.05, g) for g in (1.0, 1e-2, 1e-4, 1e-8)]
    assert all(a > b for a, b in zip(small, small[1:], strict=False))  # falls as ||g|| falls
    assert all(math.isfinite(v) and v > 0 for v in small)


def test_tensor_inputs_broadcast():
    g = torch.tensor([1.0, 0.1, 0.0])
    edges = sam_edge(0.1, 0.05, g)
    assert isinstance(edges, torch.Tensor) and edges.dtype == torch.float64
    assert edges[2] == 0 and edges[0] > edges[1] > 0
    torch.testing.assert_close(
        gd_edge(torch.tensor([0.1, 0.2])), torch.tensor([20.0, 10.0], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gd_edge(0), "Invalid lr: 0"),
        (lambda: gd_edge(-1.0), "Invalid lr"),
        (lambda: sam_edge(0.1, -0.1, 1.0), "Invalid rho: -0.1"),
        (lambda: sam_edge(0.1, 0.1, -1.0), "Invalid grad_norm"),
        (lambda: usam_edge(0.1, -1), "Invalid rho"),
        (lambda: momentum_edge(0.1, 1.0), "Invalid beta: 1.0"),
        (lambda: adam_edge(0.1, -0.1), "Invalid beta1"),
        (lambda: gd_edge(float("nan")), "Invalid lr"),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def quadratic_run(make_opt, lam, steps, x0=1.0):
    """Minimize lam x^2 / 2 from x0; return |x| after each step."""
    x = nn.Parameter(torch.tensor([x0], dtype=torch.float64))
    opt = make_opt([x])
    out = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = 0.5 * lam * (x**2).sum()
            loss.backward()
            return loss

        if samkit.optim.kind_of(opt).form.wraps:
            opt.step(closure)
        else:
            closure()
            opt.step()
        out.append(abs(x.detach().item()))
    return out


@pytest.mark.parametrize(
    "make_opt, edge",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), gd_edge(0.1)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), momentum_edge(0.1, 0.9)),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
            momentum_edge(0.1, 0.5, nesterov=True),
        ),
        (lambda p: samkit.USAM(torch.optim.SGD(p, lr=0.1), rho=0.2), usam_edge(0.1, 0.2)),
    ],
)
def test_quadratic_below_the_edge_is_bounded_above_it_diverges(make_opt, edge):
    below = quadratic_run(make_opt, 0.97 * edge, 400)
    above = quadratic_run(make_opt, 1.03 * edge, 400)
    assert max(below[-50:]) < 1e-2
    assert above[-1] > 1e2


def test_sam_step_on_a_quadratic_crosses_minus_one_at_the_sam_edge():
    """For L = lam x^2/2, SAM multiplies x by 1 - eta lam (1 + rho lam/||g||): the step contracts
    below the SAM-edge of the current ||g|| and expands above it."""
    lr, rho, g = 0.1, 0.05, 0.2
    edge = sam_edge(lr, rho, g)
    assert edge < gd_edge(lr) / 2
    for factor, grows in ((0.97, False), (1.03, True)):
        lam = factor * edge
        x0 = g / lam  # so that ||g|| = lam |x0| = g
        (after,) = quadratic_run(
            lambda p: samkit.SAM(torch.optim.SGD(p, lr=lr), rho=rho), lam, 1, x0=x0
        )
        assert (after > x0) == grows


# ------------------------------------------------------------ edge_for from the declarations


def test_edge_for_reads_the_ascent_declaration_not_the_type():
    """A new ascent that declares a closed-form edge gets it from edge_for with no change to
    stability.py; GSAM over SAM's ascent does not (its descent rewrites the step)."""
    import dataclasses

    from samkit.optim import registry
    from samkit.optim.ascents import USAM_ASCENT
    from samkit.stability import edge_for, optimizer_kind

    twice = dataclasses.replace(
        USAM_ASCENT, name="usam2x", edge=lambda lr, rho, g: usam_edge(lr, 2 * rho)
    )
    registry.register_ascent(twice)
    try:
        w = torch.nn.Parameter(torch.ones(3))
        opt = samkit.create_optimizer("usam2x", [w], lr=0.1, rho=0.2)
        assert type(opt).__name__ == "SharpnessAware"
        assert edge_for(opt) == pytest.approx(usam_edge(0.1, 0.4))
        assert optimizer_kind(opt).ascent.name == "usam2x"
    finally:
        registry.unregister("usam2x")
    w = torch.nn.Parameter(torch.ones(3))
    sam = samkit.create_optimizer("sam", [w], lr=0.1, rho=0.2)
    assert edge_for(sam, 2.0) == pytest.approx(sam_edge(0.1, 0.2, 2.0))
    gsam = samkit.create_optimizer("gsam", [w], lr=0.1)
    assert edge_for(gsam, 2.0) is None and "rewrites" in optimizer_kind(gsam).note
    asam = samkit.create_optimizer("asam", [w], lr=0.1)
    assert edge_for(asam, 2.0) is None and "effective Hessian" in optimizer_kind(asam).note
