"""The two-pass protocol: closure, errors, state dict, schedulers, AMP, accumulation, BatchNorm."""

import copy
import warnings

import pytest
import torch
from torch import nn

import samkit

F = nn.functional

# Every registry entry that trains with a plain closure; SAF and MESA (a ``loss_term`` that the
# closure must add) have the same properties checked with their closures in test_trajectory.py.
PLAIN = [
    n for n in samkit.list_optimizers()
    if not hasattr(samkit.optim.registry.optimizer_info(n).wrapper, "loss_term")
]


def mlp(dtype=torch.float64, bn=False, bn_momentum=0.1):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8, momentum=bn_momentum))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(n=24, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def make_closure(opt, model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_step_runs_the_closure_twice_and_returns_the_first_loss():
    model = mlp()
    x, y = data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    calls = []
    loss = opt.step(make_closure(opt, model, x, y, calls))
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(calls[0], w0, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(calls[1], w0, strict=True))
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.cross_entropy(mlp()(x), y).item(), rel=1e-12)


def test_step_under_no_grad_still_computes_gradients():
    model = mlp()
    x, y = data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.no_grad():
        loss = opt.step(make_closure(opt, model, x, y))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda m: samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=-0.1),
            "Invalid rho: -0.1",
        ),
        (
            lambda m: samkit.USAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=float("nan")),
            "Invalid rho",
        ),
        (lambda m: samkit.ASAM(torch.optim.SGD(m.parameters(), lr=0.1), eta=-1), "Invalid eta: -1"),
        (lambda m: samkit.ASAM(torch.optim.SGD(m.parameters(), lr=0.1), p=3), "Invalid p: 3"),
        (
            lambda m: samkit.ASAM(torch.optim.SGD(m.parameters(), lr=0.1), normalization="layer"),
            "Invalid normalization: 'layer'",
        ),
        (lambda m: samkit.SAM(list(m.parameters())), "Invalid base_optimizer: list"),
        (lambda m: samkit.SAM(torch.optim.Adadelta(m.parameters())), "rho"),
        (
            lambda m: samkit.SAM(samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1))),
            "already sharpness-aware",
        ),
        (lambda m: samkit.SAM(torch.optim.SGD([{"params": []}], lr=0.1)), "no parameters"),
        (lambda m: samkit.create_optimizer("lion", m), "Invalid optimizer: 'lion'"),
        (lambda m: samkit.create_optimizer("sam", m, base="rmsprop"), "Invalid base: 'rmsprop'"),
        (lambda m: samkit.create_optimizer("sam", m, lr=0.1, betas=(0.9, 0.99)), "betas"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build(mlp())


def test_protocol_misuse_raises():
    model = mlp()
    x, y = data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="returned None"):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    opt.zero_grad()  # the refused step perturbed nothing
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    opt.second_step()
    with pytest.raises(RuntimeError, match="needs a first_step"):
        opt.second_step()


def run(opt_name, steps, model=None, opt=None, **kw):
    model = model or mlp()
    x, y = data()
    opt = opt or samkit.create_optimizer(opt_name, model, **kw)
    losses = [
        opt.step(make_closure(opt, model, x, y)).item()
        if samkit.optim.kind_of(opt).form.wraps
        else plain_step(opt, model, x, y)
        for _ in range(steps)
    ]
    return model, opt, losses


def plain_step(opt, model, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach().item()


HYPER = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": dict(lr=1e-2),
    "adamw": dict(lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", PLAIN)
def test_state_dict_round_trip_matches_an_uninterrupted_run(name):
    kw = dict(HYPER.get(name, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)))
    _, _, straight = run(name, 20, **kw)
    model, opt, first = run(name, 10, **kw)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = mlp()
    fresh.load_state_dict(saved_model)
    opt2 = samkit.create_optimizer(name, fresh, **kw)
    opt2.load_state_dict(saved_opt)
    _, _, second = run(name, 10, model=fresh, opt=opt2)
    assert first + second == straight


def _quadratic_run(make, steps=100):
    """Final/first loss and weights of ``make([w])`` on 0.5 w^T A w, A = diag(0.5 .. 3)."""
    a = torch.diag(torch.linspace(0.5, 3.0, 6, dtype=torch.float64))
    w = nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = make([w])

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    first = closure().item()
    opt.zero_grad()
    for _ in range(steps):
        if samkit.optim.kind_of(opt).form.wraps:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return closure().item() / first, w.detach().clone()


def check_decreases_a_quadratic_and_uses_rho(make, sharpness_aware: bool) -> None:
    """The loss falls below 5% of its start; a sharpness-aware optimizer must also respond to
    its radius: ρ and 2ρ give different trajectories (an optimizer that ignores ρ fails)."""
    ratio, w = _quadratic_run(lambda ps: make(ps, 1.0))
    assert ratio < 0.05
    if sharpness_aware:
        ratio2, w2 = _quadratic_run(lambda ps: make(ps, 2.0))
        assert ratio2 < 0.05
        assert not torch.allclose(w, w2, rtol=1e-6, atol=1e-9), "the step ignores rho"


@pytest.mark.parametrize("name", PLAIN)
def test_every_optimizer_decreases_a_quadratic(name):
    torch.manual_seed(0)
    entry = samkit.optim.registry.optimizer_info(name)
    key = {"gsam": "rho_max"}.get(name, "rho")
    settings = {"looksam": dict(k=3), "rst": dict(seed=2)}.get(name, {})

    def make(params, rho_scale):
        if entry.wrapper is None:
            return samkit.create_optimizer(name, params, lr=0.05)
        return samkit.create_optimizer(name, params, lr=0.05, **{key: 0.05 * rho_scale}, **settings)

    check_decreases_a_quadratic_and_uses_rho(make, entry.wrapper is not None)


class _IgnoresRho(samkit.SAM):
    """A toy that always perturbs with ρ = 0.05, whatever the group says."""

    def _ascent_(self, buckets):
        for b in buckets:
            b.group["rho"] = 0.05
        super()._ascent_(buckets)


def test_the_quadratic_check_rejects_an_optimizer_that_ignores_rho():
    def make(params, rho_scale):
        return _IgnoresRho(torch.optim.SGD(params, lr=0.05), rho=0.05 * rho_scale)

    with pytest.raises(AssertionError, match="ignores rho"):
        check_decreases_a_quadratic_and_uses_rho(make, True)


@pytest.mark.parametrize("name", PLAIN)
def test_every_optimizer_skips_parameters_without_gradient(name):
    used, unused = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = samkit.create_optimizer(name, [used, unused], lr=0.1)
    before = unused.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert torch.equal(unused.detach(), before)


def test_state_dict_loads_a_plain_base_checkpoint_and_fills_our_keys():
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_sd = base.state_dict()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.2)
    opt.load_state_dict(plain_sd)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["rho"] == 0.2
    assert "w_backup" not in str(opt.state_dict()["sharpness_aware"])


def test_lr_scheduler_attaches_to_the_sam_object():
    model = mlp()
    x, y = data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            F.cross_entropy(model(x), y).backward()
            opt.first_step()
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    # and a scheduler can drive rho through the shared groups
    opt.param_groups[0]["rho"] = 0.3
    assert opt.base_optimizer.param_groups[0]["rho"] == 0.3


def amp_setup(name="sam"):
    model = mlp(torch.float32)
    x, y = data(dtype=torch.float32)
    opt = samkit.create_optimizer(name, model, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return model, x, y, opt, scaler


@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("name", ["sam", "asam", "usam"])
def test_gradscaler_skips_the_step_when_either_pass_is_not_finite(bad_pass, name):
    model, x, y, opt, scaler = amp_setup(name)
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if bad_pass == 1:
        model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(scaler=scaler)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # eps = 0, no NaN weights
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if bad_pass == 2:
        model[2].bias.grad[0] = float("nan")
    opt.second_step(scaler=scaler)
    scaler.update()
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p, w)
    assert scaler.get_scale() == 2.0**9
    assert not opt.base_optimizer.state  # no momentum buffer: the base step never ran


@pytest.mark.parametrize("name", ["sam", "asam", "usam"])
def test_gradscaler_step_equals_the_unscaled_step(name):
    model, x, y, opt, scaler = amp_setup(name)
    ref_model, _, _, ref_opt, _ = amp_setup(name)
    for _ in range(3):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step(scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.second_step(scaler=scaler, zero_grad=True)
        scaler.update()
        ref_opt.step(make_closure(ref_opt, ref_model, x, y))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_exact_accumulation_equals_the_full_batch_step():
    x, y = data(n=30)
    full_model, acc_model = mlp(), mlp()
    full = samkit.ASAM(torch.optim.SGD(full_model.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    acc = samkit.ASAM(torch.optim.SGD(acc_model.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    micro = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]
    closure = samkit.accumulation_closure(acc, acc_model, F.cross_entropy, micro)
    for _ in range(3):
        l_full = full.step(make_closure(full, full_model, x, y))
        l_acc = acc.step(closure)
        assert l_acc.item() == pytest.approx(l_full.item(), rel=1e-12)
    for p, q in zip(full_model.parameters(), acc_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_m_sharpness_step_descends_with_the_mean_of_per_shard_sam_gradients():
    x, y = data(n=20)
    model, ref = mlp(), mlp()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    shards = [(x[:5], y[:5]), (x[5:], y[5:])]
    samkit.m_sharpness_step(opt, model, F.cross_entropy, shards)
    # reference: for each shard, its own eps from its own gradient, gradient at w + eps
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for xs, ys in shards:
        grads = torch.autograd.grad(F.cross_entropy(ref(xs), ys), list(ref.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        shifted = copy.deepcopy(ref)
        with torch.no_grad():
            for p, g in zip(shifted.parameters(), grads, strict=True):
                p.add_(0.3 * g / norm)
        g2 = torch.autograd.grad(F.cross_entropy(shifted(xs), ys), list(shifted.parameters()))
        total = [t + len(ys) / 20 * g for t, g in zip(total, g2, strict=True)]
    with torch.no_grad():
        for p, g in zip(ref.parameters(), total, strict=True):
            p.sub_(0.1 * g)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_second_pass_leaves_batchnorm_running_stats_untouched(momentum):
    model = mlp(bn=True, bn_momentum=momentum)
    x, y = data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    bn = model[1]
    F.cross_entropy(model(x), y).backward()
    after_first = {k: v.clone() for k, v in bn.state_dict().items()}
    assert int(bn.num_batches_tracked) == 1
    opt.first_step()
    with samkit.disable_running_stats(model):
        out = model(x)
        F.cross_entropy(out, y).backward()
    opt.second_step()
    for k, v in bn.state_dict().items():
        if k in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(v, after_first[k]), k
    assert bn.track_running_stats
    # the perturbed pass used batch statistics: the output is normalized per batch
    with torch.no_grad(), samkit.disable_running_stats(model):
        h = model[1](model[0](x))
    torch.testing.assert_close(h.mean(0), bn.bias.detach(), atol=1e-10, rtol=0)


def test_disable_running_stats_keeps_eval_mode_on_running_stats():
    model = mlp(bn=True).eval()
    x, _ = data()
    expected = model(x)
    with samkit.disable_running_stats(model):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["looksam", "gsam", "aesam", "rst"])
def test_m_sharpness_step_refuses_optimizers_that_rewrite_their_steps(name):
    model = mlp()
    x, y = data()
    opt = samkit.create_optimizer(name, model, lr=0.1)
    with pytest.raises(ValueError, match="m_sharpness_step takes optimizers"):
        samkit.m_sharpness_step(opt, model, F.cross_entropy, [(x[:5], y[:5]), (x[5:], y[5:])])


# ---------------------------------------------------------------- properties over the registry
# (issue 12) every sharpness-aware entry of the registry, in settings that reach its one-pass
# steps within a few steps

SHARP = [n for n in PLAIN if samkit.optim.registry.optimizer_info(n).wrapper]
SHARP_SETTINGS = {
    "looksam": dict(k=3),
    "rst": dict(p=0.5, seed=2),
    "aesam": dict(c=0.0, delta=0.7),
    "esam": dict(beta=0.5, seed=1),
    "periodicsam": dict(interval=2),
}
RHO_KEY = {"gsam": "rho_max"}


def sharp(name, params, rho=0.1, **kw):
    kw = {**SHARP_SETTINGS.get(name, {}), RHO_KEY.get(name, "rho"): rho, **kw}
    return samkit.create_optimizer(name, params, **kw)


def _sq(model, x, y, opt, bad_call=None, calls=None):
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if len(calls) == bad_call:
            model[0].weight.grad[0, 0] = float("inf")
        return loss

    return closure


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("name", SHARP)
def test_amp_with_an_overflow_in_either_pass_leaves_w_bit_identical(name, which):
    model = mlp(torch.float32)
    x, y = data(dtype=torch.float32)
    opt = sharp(name, model, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def step(model, opt, scaler, bad_call=None):
        calls = []
        closure = _sq(model, x, y, opt, bad_call, calls)
        opt.step(lambda: scaler.scale(closure()), scaler)
        scaler.update()
        return len(calls)

    for _ in range(4):  # into the schedule: one-pass steps come up for LookSAM, AE-SAM, RST
        step(model, opt, scaler)
    passes = step(*copy.deepcopy((model, opt, scaler)))  # how many passes the next step takes
    w0 = [p.detach().clone() for p in model.parameters()]
    momentum = [b.clone() for b in opt.base_optimizer.state_dict()["state"][0].values()]
    scale = scaler.get_scale()
    assert step(model, opt, scaler, bad_call=1 if which == "first" else passes) in (1, passes)
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)
    after = opt.base_optimizer.state_dict()["state"][0].values()
    assert all(torch.equal(a, b) for a, b in zip(after, momentum, strict=True))
    assert scaler.get_scale() == scale / 2


@pytest.mark.parametrize("name", SHARP)
def test_max_grad_norm_bounds_the_step_of_lr_1_sgd(name):
    model = mlp()
    x, y = data()
    opt = sharp(name, model, lr=1.0, max_grad_norm=0.01)
    for _ in range(6):  # one-pass steps included
        with samkit.at_weights(opt):  # w (a one-pass optimizer holds w + eps between steps)
            w = [p.detach().clone() for p in model.parameters()]
        opt.step(make_closure(opt, model, x, y))
        with samkit.at_weights(opt):
            steps = zip(model.parameters(), w, strict=True)
            dw = torch.cat([(p.detach() - q).reshape(-1) for p, q in steps])
        assert 0 < dw.norm() <= 0.01 * (1 + 1e-9)


@pytest.mark.parametrize("name", PLAIN)
def test_a_deepcopy_steps_like_the_original(name):
    kw = dict(HYPER.get(name, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)))
    model, opt, _ = run(name, 4, **kw)
    model2, opt2 = copy.deepcopy((model, opt))
    _, _, a = run(name, 4, model=model, opt=opt)
    _, _, b = run(name, 4, model=model2, opt=opt2)
    assert a == b
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", SHARP)
def test_the_davda54_constructor_equals_the_wrapper(name):
    entry = samkit.optim.registry.optimizer_info(name)
    own = {**SHARP_SETTINGS.get(name, {}), RHO_KEY.get(name, "rho"): 0.1}
    m1, m2 = mlp(), mlp()
    base = samkit.optim.registry.base_optimizer_class(entry.base)  # bSAM: its own base
    a = entry.wrapper(m1.parameters(), base, lr=0.1, momentum=0.9, **own)
    b = entry.wrapper(base(m2.parameters(), lr=0.1, momentum=0.9), **own)
    assert type(a) is type(b)
    _, _, la = run(name, 5, model=m1, opt=a)
    _, _, lb = run(name, 5, model=m2, opt=b)
    assert la == lb
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
