"""MSAM against float64 references: the paper's update and the official code's loop (which keeps
the model at the perturbed point), one pass per step, rho = 0 is SGD bit for bit."""

import pytest
import torch
from optim.test_variants import Problem, close
from torch import nn

import samkit
from samkit.optim import MSAM


def unit(v):
    n = float(v.norm())
    return torch.zeros_like(v) if n == 0 else v / n


def msam_reference(x, grad, lr, mu, rho, steps):
    """w~ = w - rho v/||v||; v <- mu v + g(w~); w <- w - lr v."""
    v = torch.zeros_like(x)
    out = []
    for _ in range(steps):
        g = grad(x - rho * unit(v))
        v = mu * v + g
        x = x - lr * v
        out.append(x.clone())
    return out


def official_loop(x, grad, lr, mu, rho, steps):
    """MarlonBecker/MSAM optimizer/msam.py (weight decay 0): the parameters live at w~; each step
    adds rho v/||v|| back, steps, and subtracts rho v_new/||v_new||. Returns the w trajectory."""
    p, v, inv = x.clone(), torch.zeros_like(x), 0.0
    out = []
    for _ in range(steps):
        d = grad(p)
        p = p + rho * inv * v
        v = mu * v + d
        p = p - lr * v
        inv = 1 / (float(v.norm()) + 1e-12)
        p = p - rho * inv * v
        out.append(p + rho * inv * v)  # move_back_from_momentumAscent: the unperturbed w
    return out


@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_msam_matches_the_reference_with_one_pass_per_step(mu):
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=mu), rho=0.3)
    ref = msam_reference(pb.x0.clone(), pb.grad, 0.05, mu, 0.3, 12)
    for t in range(12):
        before = pb.passes
        opt.step(pb.closure(opt))
        assert pb.passes - before == 1
        close(pb.flat(), ref[t])  # between steps the model holds w, not w~
    assert opt.passes == 12


def test_msam_equals_the_official_code_up_to_its_1e_12():
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9), rho=0.5)
    ref = official_loop(pb.x0.clone(), pb.grad, 0.05, 0.9, 0.5, 10)
    for t in range(10):
        opt.step(pb.closure(opt))
        torch.testing.assert_close(pb.flat(), ref[t], rtol=1e-9, atol=1e-10)


def test_msam_rho_zero_is_sgd_bit_for_bit():
    pb, pb2 = Problem(), Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9, weight_decay=1e-2), rho=0.0)
    sgd = pb2.base(lr=0.05, momentum=0.9, weight_decay=1e-2)
    for _ in range(8):
        opt.step(pb.closure(opt))
        pb2.closure(sgd)()
        sgd.step()
        assert torch.equal(pb.flat(), pb2.flat())


def test_msam_perturbs_along_the_adam_first_moment():
    pb = Problem()
    base = torch.optim.Adam([{"params": [pb.w1]}, {"params": [pb.w2]}], lr=0.01)
    opt = MSAM(base, rho=0.2)
    x = pb.x0.clone()
    m, v = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for t in range(1, 6):
        g = pb.grad(x - 0.2 * unit(m))
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        x = x - 0.01 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        opt.step(pb.closure(opt))
        close(pb.flat(), x)


def test_msam_loss_is_taken_at_the_perturbed_point_and_batchnorm_updates_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = samkit.create_optimizer("msam", model, lr=0.1, momentum=0.9, rho=0.5)
    engine_closure = samkit.step.step_closure(opt, model, nn.functional.cross_entropy, [(x, y)])
    tracked = model[1].num_batches_tracked.clone()
    for _ in range(3):
        opt.step(engine_closure)
    assert int(model[1].num_batches_tracked - tracked) == 3
    assert opt.step_rewrites() is not None  # refused by per-micro-batch perturbation


def test_msam_explicit_form_and_misuse():
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9), rho=0.3)
    for _ in range(3):
        opt.step(pb.closure(opt))
    pb2 = Problem()
    opt2 = MSAM(pb2.base(lr=0.05, momentum=0.9), rho=0.3)
    for _ in range(3):
        opt2.perturb()
        pb2.closure(opt2)()
        opt2.descend()
    assert torch.equal(pb.flat(), pb2.flat())
    with pytest.raises(RuntimeError, match="one pass per step"):
        opt.first_step()
    with pytest.raises(ValueError, match="Invalid rho"):
        MSAM(pb.base(), rho=-1.0)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="schedules its own steps"):
        samkit.create_optimizer("msam", [Problem().w1], lr=0.1, schedule="ae")
