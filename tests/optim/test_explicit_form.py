"""The explicit two-pass form in a loop (issue 20, finding 2): ``backward(); first_step();
backward(); second_step()`` with no ``zero_grad()`` of its own equals the closure form step for
step, and a kept gradient that would leak into the next step's first pass is refused."""

import pytest
import torch
from torch import nn

import samkit

F = nn.functional


def _two_pass_names():
    """Every registry optimizer that takes the two-pass protocol (declared by its step form: MSAM
    takes one pass, SAF and MESA add a loss term)."""
    names = []
    model = nn.Linear(2, 2)
    for name in samkit.list_optimizers():
        opt = samkit.create_optimizer(name, model, lr=0.1)
        if samkit.optim.kind_of(opt).form.has_extra_pass:
            names.append(name)
    return names


TWO_PASS = _two_pass_names()


def test_the_registry_has_the_expected_two_pass_optimizers():
    assert {"sam", "asam", "usam", "gsam", "looksam", "fishersam", "friendlysam"} <= set(TWO_PASS)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(steps=10, n=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def make(name, model):
    return samkit.create_optimizer(name, model, lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("name", TWO_PASS)
def test_the_explicit_loop_equals_the_closure_loop_bit_for_bit(name):
    """10 steps of the README's explicit form, copied into a loop as it stands (no zero_grad
    of its own), against 10 steps of ``opt.step(closure)``: the same weights, bit for bit."""
    data = batches()
    closure_model, explicit_model = mlp(), mlp()
    closure_opt, explicit_opt = make(name, closure_model), make(name, explicit_model)
    for x, y in data:
        def closure(x=x, y=y):
            closure_opt.zero_grad()
            loss = F.cross_entropy(closure_model(x), y)
            loss.backward()
            return loss

        closure_opt.step(closure)

        explicit_opt.before_first_pass()  # a no-op but for bSAM (w -> a posterior sample)
        F.cross_entropy(explicit_model(x), y).backward()
        if explicit_opt.first_step():  # False: a one-pass step (LookSAM, AE-SAM, RST)
            F.cross_entropy(explicit_model(x), y).backward()
            explicit_opt.second_step()
        for p, q in zip(closure_model.parameters(), explicit_model.parameters(), strict=True):
            assert torch.equal(p, q), name
    assert all(p.grad is None for p in explicit_model.parameters())


def test_second_step_clears_the_gradients_unless_asked_to_keep_them():
    model = mlp()
    opt = make("sam", model)
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=False)
    kept = [p.grad.clone() for p in model.parameters()]
    assert all(bool(g.abs().sum() > 0) for g in kept)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()  # cleared by zero_grad(): accepted
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_a_first_pass_on_top_of_kept_gradients_is_refused(name):
    model = mlp()
    opt = make(name, model)
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=False)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()  # adds to the kept gradient at w + eps
    with pytest.raises(RuntimeError, match=r"not cleared.*zero_grad\(\)"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # new gradient tensors (model.zero_grad() sets them to None) are a cleared gradient
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.second_step()


def test_gradient_accumulation_within_a_pass_is_untouched():
    """Two half-batch backward calls per pass (weights 1/2) equal the full batch, in a loop."""
    data = batches(4)
    full_model, acc_model = mlp(), mlp()
    full, acc = make("sam", full_model), make("sam", acc_model)
    for x, y in data:
        F.cross_entropy(full_model(x), y).backward()
        full.first_step()
        F.cross_entropy(full_model(x), y).backward()
        full.second_step()
        for _ in range(2):  # the two passes
            for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])):
                (F.cross_entropy(acc_model(xs), ys) / 2).backward()
            if acc.is_perturbed:
                acc.second_step()
            else:
                acc.first_step()
    for p, q in zip(full_model.parameters(), acc_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
