"""Over a plain ``torch.optim.SGD`` every samkit optimizer takes the base step itself with
foreach kernels (WrappingOptimizer._plain_sgd_buckets): the same steps as torch's SGD, bit for
bit, in every SGD setting it takes; torch's own step where it does not."""

import pytest
import torch
import torch.optim.sgd as sgd_module
from optim.test_protocol import PLAIN, data, make_closure, mlp
from torch import nn

import samkit

F = nn.functional

# bSAM steps with its own base optimizer; "sgd", "adam", "adamw" are torch's optimizers themselves
OVER_SGD = [n for n in PLAIN if n not in ("bsam", "sgd", "adam", "adamw")] + ["saf", "mesa"]
SETTINGS = {
    "momentum, weight decay": dict(momentum=0.9, weight_decay=1e-2),
    "no momentum, no decay": dict(momentum=0.0, weight_decay=0.0),
    "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=1e-3),
}


def run(name, sgd_kwargs, torch_step, steps=5):
    """Weights after each step; ``torch_step``: a no-op step hook makes the base take torch's own
    step. Returns (weights per step, calls of torch's SGD per step)."""
    model = mlp()
    x, y = data()
    extra = {"lam": 0.0} if name in ("saf", "mesa") else {}
    if name == "msam":
        extra = {"rho": 0.0}  # the general path of MSAM with rho > 0 rounds differently
    opt = samkit.create_optimizer(name, model, lr=0.1, base_options=sgd_kwargs, **extra)
    if torch_step:
        opt.base_optimizer.register_step_post_hook(lambda *args: None)
    calls, weights = [], []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            if name == "saf":
                loss = loss + opt.trajectory_loss(out, torch.arange(len(y)), epoch=9,
                                                  num_examples=len(y))
            elif name == "mesa":
                loss = loss + opt.trajectory_loss(out, x, model, epoch=9)
            loss.backward()
            return loss

        before = len(sgd_calls)
        opt.step(closure)
        calls.append(len(sgd_calls) - before)
        weights.append([p.detach().clone() for p in model.parameters()])
    return weights, calls


sgd_calls: list[int] = []


@pytest.fixture(autouse=True)
def _count_torch_sgd(monkeypatch):
    functional = sgd_module.sgd
    sgd_calls.clear()
    monkeypatch.setattr(sgd_module, "sgd", lambda *a, **k: (sgd_calls.append(1),
                                                            functional(*a, **k))[1])


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", OVER_SGD)
def test_samkit_takes_torchs_sgd_step_bit_for_bit(name, setting):
    mine, my_calls = run(name, SETTINGS[setting], torch_step=False)
    theirs, their_calls = run(name, SETTINGS[setting], torch_step=True)
    for a, b in zip(mine, theirs, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert all(c > 0 for c in their_calls)
    # torch's step only while it makes the momentum buffers (the first step)
    first = 1 if SETTINGS[setting]["momentum"] else 0
    assert my_calls[first:] == [0] * (len(my_calls) - first)


@pytest.mark.parametrize("kwargs", [dict(nesterov=True, momentum=0.9), dict(maximize=True),
                                    dict(foreach=False, fused=True)])
def test_settings_it_does_not_take_go_to_torchs_step(kwargs):
    model = mlp()
    x, y = data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, **kwargs), rho=0.05)
    for _ in range(3):
        opt.step(make_closure(opt, model, x, y))
    assert len(sgd_calls) == 3


def test_an_lr_scheduler_on_the_base_sees_its_steps():
    """torch's scheduler wraps the base's ``step`` to record the call: samkit's own step
    records it too (no "lr_scheduler.step() before optimizer.step()" warning), and the
    scheduler's learning rates are used."""
    import warnings

    model = mlp()
    x, y = data()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = samkit.SAM(base, rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(make_closure(opt, model, x, y))
            sched.step()
    assert len(sgd_calls) == 1 and base.param_groups[0]["lr"] == 0.1 * 0.5**3
