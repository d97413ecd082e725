"""The step engine (samkit.step), in float64: weighted micro-batches equal the whole batch,
m-sharpness is the mean of per-micro-batch SAM gradients, BatchNorm's running statistics are
left alone on the perturbed pass, the scaler path, DDP's no_sync pattern, per-example losses on
request, and the first-pass hook."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samkit
from samkit.step import (
    ExampleLossStepClosure,
    StepClosure,
    StepEngine,
    split_batch,
    step_closure,
    take_step,
)


def data(n=12, d=5, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, k, (n,),
                                                                             generator=g)


def mlp(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)] + ([nn.BatchNorm1d(7)] if bn else []) + [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


def make(kind, model):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "sgd":
        return base
    if kind == "sam":
        return samkit.SAM(base, rho=0.2)
    if kind == "asam":
        return samkit.ASAM(base, rho=1.0, eta=0.01)
    return samkit.create_optimizer(kind, model, lr=0.1)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("kind", ["sgd", "sam", "asam", "looksam", "gsam"])
def test_uneven_weighted_micro_batches_equal_the_whole_batch_step(kind):
    x, y = data()
    whole, parts = mlp(), mlp()
    opt_w, opt_p = make(kind, whole), make(kind, parts)
    micro = [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])]  # 5, 4, 3 examples
    for _ in range(3):
        loss_w = take_step(opt_w, step_closure(opt_w, whole, F.cross_entropy, [(x, y)]))
        loss_p = take_step(opt_p, step_closure(opt_p, parts, F.cross_entropy, micro))
        torch.testing.assert_close(loss_p, loss_w, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(flat(parts), flat(whole), rtol=1e-12, atol=1e-12)
    assert not torch.equal(flat(whole), flat(mlp()))  # it moved


def test_whole_batch_step_equals_the_hand_written_sam_step():
    x, y = data()
    model, ref = mlp(), mlp()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2)
    take_step(opt, step_closure(opt, model, F.cross_entropy, split_batch(x, y, 3)))
    # reference: eps = rho g/|g|; w <- w - lr grad L(w + eps)
    params = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.add_(t, alpha=0.2 / float(norm))
    gp = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    with torch.no_grad():
        for p, t, d in zip(params, g, gp, strict=True):
            p.sub_(t, alpha=0.2 / float(norm)).sub_(d, alpha=0.1)
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-12, atol=1e-12)


def test_m_sharpness_is_the_weighted_mean_of_per_micro_batch_sam_gradients():
    x, y = data()
    micro = [(x[:7], y[:7]), (x[7:], y[7:])]  # uneven: weights 7/12 and 5/12
    model, ref = mlp(), mlp()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2)
    base = opt.base_optimizer
    loss = samkit.m_sharpness_step(opt, model, F.cross_entropy, micro)
    params = list(ref.parameters())
    w0 = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    losses = []
    for xb, yb in micro:
        g = torch.autograd.grad(F.cross_entropy(ref(xb), yb), params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p.add_(t, alpha=0.2 / float(norm))
        gp = torch.autograd.grad(F.cross_entropy(ref(xb), yb), params)
        with torch.no_grad():
            for p, w, acc, d in zip(params, w0, total, gp, strict=True):
                p.copy_(w)
                acc.add_(d, alpha=len(yb) / len(y))
        with torch.no_grad():
            losses.append(F.cross_entropy(ref(xb), yb) * len(yb) / len(y))
    with torch.no_grad():
        for p, acc in zip(params, total, strict=True):
            p.sub_(acc, alpha=0.1)
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, sum(losses), rtol=1e-12, atol=1e-12)
    # and it is not the whole-batch SAM step
    whole = mlp()
    opt_w = samkit.SAM(torch.optim.SGD(whole.parameters(), lr=0.1), rho=0.2)
    take_step(opt_w, step_closure(opt_w, whole, F.cross_entropy, micro))
    assert not torch.allclose(flat(whole), flat(model))
    assert opt.base_optimizer is base  # the real base optimizer is back in place


@pytest.mark.parametrize("accum", [1, 3])
def test_batchnorm_running_stats_are_left_alone_on_the_perturbed_pass(accum):
    x, y = data()
    model = mlp(bn=True)
    opt = make("sam", model)
    perturbed_calls = []
    model.register_forward_pre_hook(lambda m, a: perturbed_calls.append(opt.is_perturbed))
    StepEngine(opt, model, F.cross_entropy, grad_accum=accum).step(x, y)
    bn = model[1]
    assert perturbed_calls == [False] * accum + [True] * accum  # both passes ran
    assert int(bn.num_batches_tracked) == accum  # the first pass only
    # the statistics are those of the first pass at w: replay it on a copy
    ref = mlp(bn=True)
    with torch.no_grad():
        for xb, _ in split_batch(x, y, accum):
            ref(xb)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(bn.running_var, ref[1].running_var, rtol=1e-13, atol=1e-13)
    assert bn.track_running_stats  # restored


@pytest.mark.parametrize("kind", ["sgd", "sam", "asam"])
def test_scaler_path_equals_the_unscaled_step_and_updates_the_scale(kind):
    x, y = data()
    plain, scaled = mlp(), mlp()
    opt_a, opt_b = make(kind, plain), make(kind, scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    seen = []
    for _ in range(2):
        take_step(opt_a, step_closure(opt_a, plain, F.cross_entropy, split_batch(x, y, 2)))
        engine = StepEngine(opt_b, scaled, F.cross_entropy, grad_accum=2, scaler=scaler)
        closure = engine.closure(x, y, after_first_pass=lambda loss: seen.append(
            float(scaled[0].weight.grad.abs().max())))
        take_step(opt_b, closure, scaler)
    torch.testing.assert_close(flat(scaled), flat(plain), rtol=1e-12, atol=1e-12)
    assert scaler.get_scale() == 2.0**12  # two finite steps, growth_interval=1
    # the backward was scaled: the first-pass gradients are 2^10 (then 2^11) times larger
    ref = mlp()
    F.cross_entropy(ref(x), y).backward()
    assert seen[0] == pytest.approx(2.0**10 * float(ref[0].weight.grad.abs().max()), rel=1e-12)


def test_scaler_skips_a_non_finite_step():
    x, y = data()
    model = mlp()
    opt = make("sam", model)
    before = flat(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    bad = x.clone()
    bad[0, 0] = float("nan")
    take_step(opt, step_closure(opt, model, F.cross_entropy, [(bad, y)], scaler=scaler), scaler)
    assert torch.equal(flat(model), before)
    assert scaler.get_scale() == 2.0**9  # backed off


class FakeDDP(nn.Module):
    """Counts which forward passes run inside no_sync() (what DDP's all-reduce skips)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.synced: list[bool] = []
        self._inside = False

    @contextmanager
    def no_sync(self):
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def forward(self, x):
        self.synced.append(not self._inside)
        return self.module(x)


@pytest.mark.parametrize(
    ("kind", "mode", "want"),
    [
        ("sam", "synced", [False, False, True] * 2),  # one all-reduce per pass, at its end
        ("sam", "local", [False, False, False] + [False, False, True]),  # first pass local
        ("sgd", "local", [False, False, True]),  # a plain optimizer's one pass always syncs
    ],
)
def test_no_sync_on_all_but_the_last_micro_batch_and_on_the_local_first_pass(kind, mode, want):
    x, y = data()
    model = FakeDDP(mlp())
    opt = make(kind, model)
    StepEngine(opt, model, F.cross_entropy, grad_accum=3, perturbation=mode).step(x, y)
    assert model.synced == want


def test_local_perturbation_refuses_optimizers_that_use_the_first_pass_gradient():
    model = mlp()
    with pytest.raises(ValueError, match="perturbation='local'"):
        StepEngine(make("looksam", model), model, F.cross_entropy, perturbation="local")


def test_example_losses_are_offered_only_to_an_optimizer_that_asks():
    x, y = data()
    per_example = partial(F.cross_entropy, reduction="none")
    model = mlp()
    esam = samkit.ESAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, gamma=0.25)
    sam = make("sam", mlp())
    kw = dict(example_loss_fn=per_example)
    assert type(step_closure(esam, model, F.cross_entropy, [(x, y)], **kw)) is (
        ExampleLossStepClosure)
    assert type(step_closure(sam, model, F.cross_entropy, [(x, y)], **kw)) is StepClosure
    assert type(step_closure(esam, model, F.cross_entropy, split_batch(x, y, 2), **kw)) is (
        StepClosure)  # one micro-batch only
    assert type(step_closure(esam, FakeDDP(model), F.cross_entropy, [(x, y)], **kw)) is (
        StepClosure)  # one process only
    engine = StepEngine(esam, model, F.cross_entropy, grad_accum=2, example_loss_fn=per_example)
    assert "grad_accum=1" in engine.example_losses_unavailable(len(y))
    assert StepEngine(esam, model, F.cross_entropy).example_losses_unavailable(len(y)) == (
        "no per-example loss function was given")


def test_esam_through_the_engine_equals_esam_step_with_example_losses():
    x, y = data(n=16)
    per_example = partial(F.cross_entropy, reduction="none")
    a, b = mlp(), mlp()
    opt_a = samkit.ESAM(torch.optim.SGD(a.parameters(), lr=0.1), rho=0.1, gamma=0.25)
    opt_b = samkit.ESAM(torch.optim.SGD(b.parameters(), lr=0.1), rho=0.1, gamma=0.25)
    seen = []
    a.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    engine = StepEngine(opt_a, a, F.cross_entropy, example_loss_fn=per_example)
    for _ in range(2):
        engine.step(x, y)
        opt_b.step(samkit.ExampleLosses(b, per_example, x, y))
    assert seen == [16, 16, 4] * 2  # first pass, selection forward, second pass on 4
    torch.testing.assert_close(flat(a), flat(b), rtol=0, atol=0)


def test_observe_sees_the_first_pass_and_after_first_pass_can_abandon_the_step():
    x, y = data()
    model = mlp()
    opt = make("sam", model)
    seen = []
    engine = StepEngine(opt, model, F.cross_entropy, grad_accum=2)
    engine.step(x, y, observe=lambda out, t: seen.append((out.requires_grad, len(t))))
    assert seen == [(False, 6), (False, 6)]  # detached, the first pass only

    class Stop(Exception):
        pass

    def stop(loss):
        raise Stop

    before, state = flat(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(Stop):
        engine.step(x, y, after_first_pass=stop)
    assert torch.equal(flat(model), before) and not opt.is_perturbed
    assert opt.state_dict()["state"].keys() == state["state"].keys()


def test_autocast_runs_the_forward_in_the_given_dtype():
    x, y = data()
    model = nn.Linear(5, 3)  # float32: autocast to bfloat16 on CPU
    dtypes = []
    engine = StepEngine(make("sam", model), model, F.cross_entropy, autocast=torch.bfloat16)
    engine.step(x.float(), y, observe=lambda out, t: dtypes.append(out.dtype))
    assert dtypes == [torch.bfloat16]


def test_bad_arguments_are_clear():
    x, y = data()
    model = mlp()
    opt = make("sam", model)
    with pytest.raises(ValueError, match="Invalid micro_batches: pass a list"):
        step_closure(opt, model, F.cross_entropy, iter([(x, y)]))
    with pytest.raises(ValueError, match="Invalid micro_batches: no examples"):
        step_closure(opt, model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="Invalid perturbation: 'both'"):
        step_closure(opt, model, F.cross_entropy, [(x, y)], perturbation="both")
    with pytest.raises(ValueError, match="Invalid grad_accum: 0"):
        StepEngine(opt, model, F.cross_entropy, grad_accum=0)
    with pytest.raises(ValueError, match="Invalid global_examples"):
        step_closure(opt, model, F.cross_entropy, [(x, y)], global_examples=0)
