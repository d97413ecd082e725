"""``m_sharpness_step`` (issue 20, finding 3): one clip of the step's averaged direction, a
GradScaler through the optimizer's own AMP path; against a float64 reference written here."""

import math

import pytest
import torch
from torch import nn

import samkit

F = nn.functional
RHO, LR, MOMENTUM, LIMIT = 0.2, 0.1, 0.9, 0.01


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def micro_batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]  # uneven: weights 7/12 and 5/12


def reference_steps(model, micro, steps, max_grad_norm=None):
    """The m-sharpness step by hand, one tensor at a time: per micro-batch k, the SAM
    perturbation eps_k = rho g_k / ||g_k|| from its own gradient and the gradient at w + eps_k;
    the gradients averaged (weights |B_k| / |B|); one clip of the average to max_grad_norm
    (as clip_grad_norm_: d * min(1, c / (||d|| + 1e-6))); one SGD step with heavy-ball
    momentum."""
    params = list(model.parameters())
    buffers = [None] * len(params)
    total = sum(len(y) for _, y in micro)
    for _ in range(steps):
        w0 = [p.detach().clone() for p in params]
        direction = [torch.zeros_like(p) for p in params]
        for x, y in micro:
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            norm = math.sqrt(sum(float((t * t).sum()) for t in g))
            with torch.no_grad():
                for p, w, t in zip(params, w0, g, strict=True):
                    p.copy_(w + RHO * t / norm)
            gp = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, w, d, t in zip(params, w0, direction, gp, strict=True):
                    p.copy_(w)
                    d.add_(t * (len(y) / total))
        if max_grad_norm is not None:
            norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
            direction = [d * min(1.0, max_grad_norm / (norm + 1e-6)) for d in direction]
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(params, direction, strict=True)):
                buffers[i] = d.clone() if buffers[i] is None else buffers[i] * MOMENTUM + d
                p.sub_(LR * buffers[i])
    return [p.detach() for p in params]


def sam(model, **kw):
    return samkit.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO, **kw)


@pytest.mark.parametrize("max_grad_norm", [None, LIMIT])
def test_m_sharpness_step_matches_the_float64_reference(max_grad_norm):
    model, ref = mlp(), mlp()
    micro = micro_batches()
    opt = sam(model, max_grad_norm=max_grad_norm)
    for _ in range(3):
        samkit.m_sharpness_step(opt, model, F.cross_entropy, micro)
    want = reference_steps(ref, micro, 3, max_grad_norm)
    for p, q in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-13)


def test_the_clip_is_of_the_step_not_of_each_micro_batch():
    """One step from momentum 0: lr times the step's direction has norm lr * limit exactly."""
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=1.0), rho=RHO, max_grad_norm=LIMIT)
    samkit.m_sharpness_step(opt, model, F.cross_entropy, micro_batches())
    moved = math.sqrt(sum(float(((p.detach() - w) ** 2).sum())
                          for p, w in zip(model.parameters(), w0, strict=True)))
    assert moved == pytest.approx(LIMIT, rel=1e-4)  # per micro-batch clips gave less


def test_a_grad_scaler_gives_the_unscaled_step():
    """Power-of-two loss scales are exact in float64: the scaled step equals the reference."""
    model, ref = mlp(), mlp()
    micro = micro_batches()
    opt = sam(model, max_grad_norm=LIMIT)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        samkit.m_sharpness_step(opt, model, F.cross_entropy, micro, scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 2.0**10
    want = reference_steps(ref, micro, 2, LIMIT)
    for p, q in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bad", [0, 1])  # which micro-batch's loss is inf
def test_a_non_finite_micro_batch_skips_the_step_and_lowers_the_scale(bad):
    model = mlp()
    micro = micro_batches()
    opt = sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        return loss * math.inf if len(y) == len(micro[bad][1]) else loss

    samkit.m_sharpness_step(opt, model, loss_fn, micro, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [0, 1])
def test_skip_non_finite_skips_the_whole_step_without_a_scaler(bad):
    model = mlp()
    micro = micro_batches()
    opt = sam(model, skip_non_finite=True)
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        return loss * math.inf if len(y) == len(micro[bad][1]) else loss

    samkit.m_sharpness_step(opt, model, loss_fn, micro)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
