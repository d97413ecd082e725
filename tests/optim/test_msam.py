"""MSAM against float64 references: the paper's update and the official code's loop (which keeps
the model at the perturbed point, as samkit's MSAM now does), one pass per step, rho = 0 is SGD
bit for bit; the held point: at_weights(), restore(), state_dict and resume, LR and rho changes,
weight decay, parameters without a gradient."""

import copy
import warnings

import pytest
import torch
from optim.test_variants import Problem, close
from torch import nn

import samkit
from samkit.optim import MSAM

F = nn.functional


def unit(v):
    n = float(v.norm())
    return torch.zeros_like(v) if n == 0 else v / n


def msam_reference(x, grad, lr, mu, rho, steps, wd=0.0):
    """w~ = w - rho v/||v||; v <- mu v + g(w~) + wd w; w <- w - lr v. Returns (w, w~_next)."""
    v = torch.zeros_like(x)
    out = []
    for _ in range(steps):
        g = grad(x - rho * unit(v)) + wd * x
        v = mu * v + g
        x = x - lr * v
        out.append((x.clone(), x - rho * unit(v)))
    return out


def official_loop(x, grad, lr, mu, rho, steps, evaluate_at=()):
    """MarlonBecker/MSAM optimizer/msam.py (weight decay 0), written out: the parameters live
    at w~; each step adds rho v/||v|| back, steps, and subtracts rho v_new/||v_new||. At the
    steps in ``evaluate_at`` it moves back (move_back_from_momentumAscent) and up again
    (move_up_to_momentumAscent), as its main.py does around an evaluation. Returns, per step,
    (the unperturbed w, the held point w~)."""
    p, v, inv = x.clone(), torch.zeros_like(x), 0.0
    out = []
    for t in range(steps):
        d = grad(p)
        p = p + rho * inv * v
        v = mu * v + d
        p = p - lr * v
        inv = 1 / (float(v.norm()) + 1e-12)
        p = p - rho * inv * v
        if t in evaluate_at:
            p = p + rho * inv * v
            p = p - rho * inv * v
        out.append((p + rho * inv * v, p.clone()))
    return out


def at_w(pb, opt):
    with opt.at_weights():
        return pb.flat()


@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_msam_matches_the_reference_with_one_pass_per_step(mu):
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=mu), rho=0.3)
    ref = msam_reference(pb.x0.clone(), pb.grad, 0.05, mu, 0.3, 12)
    for t in range(12):
        before = pb.passes
        opt.step(pb.closure(opt))
        assert pb.passes - before == 1
        close(at_w(pb, opt), ref[t][0])  # at_weights: w
        close(pb.flat(), ref[t][1])  # between steps the model holds w~
    assert opt.passes == 12


def test_msam_equals_the_official_loop_over_many_steps_with_evaluations_between():
    """60 steps against the official loop (float64, 1e-9): the unperturbed w inside
    at_weights() and the held point outside, with an evaluation every 7 steps; the evaluations
    leave samkit's trajectory bit for bit as it is without them."""
    pb, quiet = Problem(), Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9), rho=0.5)
    quiet_opt = MSAM(quiet.base(lr=0.05, momentum=0.9), rho=0.5)
    evals = set(range(3, 60, 7))
    ref = official_loop(pb.x0.clone(), pb.grad, 0.05, 0.9, 0.5, 60, evaluate_at=evals)
    for t in range(60):
        opt.step(pb.closure(opt))
        quiet_opt.step(quiet.closure(quiet_opt))
        if t in evals:
            w = at_w(pb, opt)
            torch.testing.assert_close(w, ref[t][0], rtol=1e-9, atol=1e-10)
            assert float(pb.loss_of(w)) < float(pb.loss_of(pb.x0))
        torch.testing.assert_close(pb.flat(), ref[t][1], rtol=1e-9, atol=1e-10)
        assert torch.equal(pb.flat(), quiet.flat())
    torch.testing.assert_close(at_w(pb, opt), ref[-1][0], rtol=1e-9, atol=1e-10)


def test_at_weights_moves_to_w_and_back_bit_for_bit_and_refuses_steps_inside():
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9), rho=0.4)
    with opt.at_weights():  # before the first step: the model is at w, nothing to do
        assert not opt.weights_perturbed
    for _ in range(4):
        opt.step(pb.closure(opt))
    held = pb.flat()
    assert opt.weights_perturbed
    with samkit.at_weights(opt):
        w = pb.flat()
        assert not opt.weights_perturbed
        with opt.at_weights():  # nested: already at w
            assert torch.equal(pb.flat(), w)
        with pytest.raises(RuntimeError, match="inside at_weights"):
            opt.step(pb.closure(opt))
    assert torch.equal(pb.flat(), held)
    assert not torch.allclose(w, held)
    with pytest.raises(KeyError), opt.at_weights():  # left on an exception too
        raise KeyError("x")
    assert torch.equal(pb.flat(), held)
    opt.restore()  # at w for good; the next step moves to w~ again
    assert torch.equal(pb.flat(), w) and not opt.weights_perturbed
    opt.restore()  # a no-op at w
    opt.step(pb.closure(opt))
    assert opt.weights_perturbed
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with samkit.at_weights(sgd):  # any optimizer: a no-op
        pass


def test_msam_with_weight_decay_lr_and_rho_changes_and_a_parameter_without_gradient():
    """torch's weight decay at w (the paper's update); an LR schedule and a rho change between
    steps (the move back uses the rho of the move out); a parameter that gets no gradient from
    step 5 keeps its momentum and is still perturbed along it."""
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9, weight_decay=1e-2), rho=0.3)
    x, v, lr, rho, eps = pb.x0.clone(), torch.zeros(7, dtype=torch.float64), 0.05, 0.3, 0.0
    for t in range(12):
        frozen = t >= 5

        def closure(frozen=frozen):
            opt.zero_grad()
            w1 = pb.w1.detach() if frozen else pb.w1  # from step 5: w1.grad is None
            loss = pb.loss_of(torch.cat([w1.reshape(-1), pb.w2.reshape(-1)]))
            loss.backward()
            return loss

        opt.step(closure)
        g = pb.grad(x + eps) + 1e-2 * x  # at w~ = w + eps; weight decay at w
        if frozen:
            g[:3] = 0.0
            v[3:] = 0.9 * v[3:] + g[3:]
            x[3:] = x[3:] - lr * v[3:]
        else:
            v = 0.9 * v + g
            x = x - lr * v
        eps = -rho * unit(v)
        close(at_w(pb, opt), x)
        close(pb.flat(), x + eps)
        lr *= 0.8
        for group in opt.param_groups:
            group["lr"] = lr
        if t == 6:
            rho = 0.6
            for group in opt.param_groups:
                group["rho"] = rho
            close(at_w(pb, opt), x)  # still w: the held point was moved out with rho 0.3


def checkpoint_run(save_at_w):
    """10 steps, a checkpoint (model saved inside at_weights or at the held point), a fresh
    model and optimizer loaded from it, 10 more steps; against 20 uninterrupted steps."""
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        return model, samkit.create_optimizer("msam", model, lr=0.1, momentum=0.9,
                                              weight_decay=1e-3, rho=0.5)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (16,), generator=g)) for _ in range(20)]

    def train(model, opt, batches):
        for x, y in batches:
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)

    straight = make()
    train(*straight, data)
    model, opt = make()
    train(model, opt, data[:10])
    if save_at_w:
        with opt.at_weights():
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    else:
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, data[10:])  # the saving run goes on
    fresh, fresh_opt = make()
    fresh.load_state_dict(saved[0])
    fresh_opt.load_state_dict(saved[1])
    train(fresh, fresh_opt, data[10:])
    return straight, (model, opt), (fresh, fresh_opt)


@pytest.mark.parametrize("save_at_w", [True, False])
def test_a_resumed_msam_run_equals_the_uninterrupted_one_bit_for_bit(save_at_w):
    (m0, o0), (m1, o1), (m2, o2) = checkpoint_run(save_at_w)
    for a, b, c in zip(m0.parameters(), m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    with o0.at_weights(), o2.at_weights():
        assert all(torch.equal(a, c) for a, c in zip(m0.parameters(), m2.parameters(),
                                                     strict=True))


def test_a_model_loaded_from_elsewhere_is_taken_as_w():
    (m0, o0), _, _ = checkpoint_run(True)
    with o0.at_weights():
        w = copy.deepcopy(m0.state_dict())
    state = o0.state_dict()
    other = copy.deepcopy(m0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)  # neither w nor w~
    opt = samkit.create_optimizer("msam", other, lr=0.1, momentum=0.9, weight_decay=1e-3,
                                  rho=0.5)
    opt.load_state_dict(state)
    moved = [p.detach().clone() for p in other.parameters()]
    opt.perturb()  # from these weights, taken as w (not the saved point)
    assert not any(torch.equal(p, q) for p, q in zip(other.parameters(), moved, strict=True))
    with opt.at_weights():
        for (k, p), q in zip(other.named_parameters(), moved, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)
            assert not torch.allclose(p, w[k])


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
        close(at_w(pb, opt), x)


def test_msam_loss_is_taken_at_the_perturbed_point_and_batchnorm_updates_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = samkit.create_optimizer("msam", model, lr=0.1, momentum=0.9, rho=0.5)
    engine_closure = samkit.step.step_closure(opt, model, nn.functional.cross_entropy, [(x, y)])
    tracked = model[1].num_batches_tracked.clone()
    for _ in range(3):
        loss = opt.step(engine_closure)
    assert int(model[1].num_batches_tracked - tracked) == 3
    assert opt.step_rewrites() is not None  # refused by per-micro-batch perturbation
    model.train()
    with torch.no_grad():  # the returned loss is the loss at the held point of the last step
        held_loss = F.cross_entropy(model(x), y)
    with opt.at_weights(), torch.no_grad():
        w_loss = F.cross_entropy(model(x), y)
    assert not torch.equal(held_loss, w_loss)
    assert float(loss) != float(w_loss)


def test_msam_explicit_form_and_misuse():
    pb = Problem()
    opt = MSAM(pb.base(lr=0.05, momentum=0.9), rho=0.3)
    for _ in range(3):
        opt.step(pb.closure(opt))
    pb2 = Problem()
    opt2 = MSAM(pb2.base(lr=0.05, momentum=0.9), rho=0.3)
    for _ in range(3):
        opt2.perturb()
        opt2.perturb()  # a no-op while the model holds w~
        pb2.closure(opt2)()
        opt2.descend()
    assert torch.equal(pb.flat(), pb2.flat())
    opt2.restore()
    with pytest.raises(RuntimeError, match="needs a perturb"):
        opt2.descend()
    with pytest.raises(RuntimeError, match="one pass per step"):
        opt.first_step()
    with pytest.raises(ValueError, match="Invalid rho"):
        MSAM(pb.base(), rho=-1.0)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="schedules its own steps"):
        samkit.create_optimizer("msam", [Problem().w1], lr=0.1, schedule="ae")


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_msam_step_allocates_no_parameter_sized_tensor(weight_decay):
    """Once the momentum exists, a step (move back, base step, move on) makes no new tensor of
    a parameter's size: only 0-d coefficients and the norms (no ε, no copy of the weights, no
    decayed gradient: the official code's step allocates none either)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    opt = samkit.MSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                      weight_decay=weight_decay), rho=1.0)
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    made = []

    class NewTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.overloadpacket.__name__.endswith("_"):  # not an in-place op
                for t in out if isinstance(out, (list, tuple)) else [out]:
                    if isinstance(t, torch.Tensor):
                        made.append((func.overloadpacket.__name__, t.numel()))
            return out

    closure()  # the pass, outside the mode
    with NewTensors():
        opt.descend()
    assert made, "the mode saw nothing"
    smallest = min(p.numel() for p in model.parameters())
    assert [(f, n) for f, n in made if n >= smallest] == []


def test_the_fused_sgd_step_equals_the_general_one(monkeypatch):
    """Over a plain torch SGD with momentum, MSAM fuses SGD's update with the move out (one
    update of the weights instead of two; torch's SGD is not called). It takes the same steps as
    the general path (forced here by a step hook on the base) in float64, with two param groups
    (one with rho 0, which stays SGD bit for bit), weight decay and an LR scheduler on the base;
    and the scheduler sees the base optimizer step (no warning)."""
    import torch.optim.sgd as sgd_module

    calls = []
    functional = sgd_module.sgd
    monkeypatch.setattr(sgd_module, "sgd", lambda *a, **k: (calls.append(1), functional(*a, **k)))

    def run(force_general):
        pb = Problem()
        base = torch.optim.SGD([{"params": [pb.w1], "rho": 0.0}, {"params": [pb.w2]}],
                               lr=0.05, momentum=0.9, weight_decay=1e-2)
        opt = MSAM(base, rho=0.4)
        if force_general:
            base.register_step_post_hook(lambda *args: None)
        sched = torch.optim.lr_scheduler.StepLR(base, step_size=3, gamma=0.5)
        points = []
        for _ in range(10):
            opt.step(pb.closure(opt))
            sched.step()
            points.append((pb.flat(), at_w(pb, opt)))
        return points

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        fused = run(False)
        assert len(calls) == 2  # the first step only (no momentum yet): once per group
        general = run(True)
    assert len(calls) == 2 + 10 * 2
    for (held_f, w_f), (held_g, w_g) in zip(fused, general, strict=True):
        torch.testing.assert_close(held_f, held_g, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(w_f, w_g, rtol=1e-13, atol=1e-14)
        assert torch.equal(w_f[:3], held_f[:3]) and torch.equal(w_f[:3], w_g[:3])  # rho 0: SGD
    assert not torch.equal(fused[-1][0][3:], fused[-1][1][3:])  # the other group is moved
