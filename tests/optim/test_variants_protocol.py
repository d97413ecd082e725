"""The SAM-family variants under the foundation's guarantees: state-dict round trips, AMP,
gradient accumulation, BatchNorm, the registry and argument checks."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

import samkit
from samkit.optim import (
    ESAM,
    GSAM,
    AESchedule,
    ExampleLosses,
    FisherSAM,
    FriendlySAM,
    LookSAM,
    RandomSchedule,
    ae_sam,
    rst_sam,
    with_schedule,
)

F = nn.functional
VARIANTS = ["gsam", "looksam", "esam", "aesam", "rst", "friendlysam", "fishersam", "wsam",
            "gcsam", "bsam", "periodicsam"]
# settings that exercise every branch within a few steps (one-pass steps included)
SETTINGS = {
    "gsam": dict(rho_max=0.2, rho_min=0.02, alpha=0.3),
    "looksam": dict(k=3, rho=0.2),
    "esam": dict(beta=0.5, rho=0.2, seed=1),
    "aesam": dict(c=0.0, delta=0.7, rho=0.2),
    "rst": dict(p=0.5, seed=2, rho=0.2),
    "friendlysam": dict(rho=0.2, lmbda=0.5),
    "fishersam": dict(rho=0.2, eta=3.0),
    "wsam": dict(rho=0.2, gamma=0.8),
    "gcsam": dict(rho=0.2),
    "bsam": dict(rho=0.05, num_data=100, seed=3),  # momentum = its beta1
    "periodicsam": dict(rho=0.2, interval=3),
}


def mlp(dtype=torch.float64, bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(n=24, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def make_closure(opt, model, x, y, scaler=None, counter=None):
    """zero_grad, forward, backward; the perturbed pass leaves BatchNorm statistics alone."""

    def closure():
        if counter is not None:
            counter.append(opt.is_perturbed)
        opt.zero_grad()
        ctx = samkit.disable_running_stats(model) if opt.is_perturbed else _null()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    return closure


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def build(name, model, **extra):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, **SETTINGS[name], **extra)
    return samkit.create_optimizer(name, model, **kw)


def run(name, model, opt, steps, sds=False):
    x, y = data()
    losses = []
    for _ in range(steps):
        if sds:
            closure = ExampleLosses(model, partial(F.cross_entropy, reduction="none"), x, y)
        else:
            closure = make_closure(opt, model, x, y)
        losses.append(float(opt.step(closure)))
    return losses


# ------------------------------------------------------------------------------ state dict


@pytest.mark.parametrize("name, sds", [(name, False) for name in VARIANTS] + [("esam", True)])
def test_state_dict_round_trip_mid_schedule_matches_an_uninterrupted_run(name, sds):
    model = mlp()
    opt = build(name, model)
    straight = run(name, model, opt, 14, sds)
    straight_w = [p.detach().clone() for p in model.parameters()]

    model = mlp()
    opt = build(name, model)
    first = run(name, model, opt, 7, sds)  # 7: between LookSAM's full steps (k = 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    assert "grad_first" not in str(saved[1]["sharpness_aware"]["state"])
    fresh = mlp()
    fresh.load_state_dict(saved[0])
    opt2 = build(name, fresh)
    opt2.load_state_dict(saved[1])
    second = run(name, fresh, opt2, 7, sds)
    assert first + second == straight
    for p, q in zip(fresh.parameters(), straight_w, strict=True):
        assert torch.equal(p.detach(), q)


def test_gsam_keeps_its_lr_range_through_a_checkpoint():
    model = mlp()
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=0.4), rho_max=0.1)
    sd = opt.state_dict()
    opt2 = GSAM(torch.optim.SGD(mlp().parameters(), lr=0.1), rho_max=0.1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr_max"] == 0.4


# -------------------------------------------------------------------------------------- AMP


@pytest.mark.parametrize("name", VARIANTS)
def test_gradscaler_steps_equal_the_unscaled_steps(name):
    x, y = data(dtype=torch.float32)
    model, ref_model = mlp(torch.float32), mlp(torch.float32)
    opt, ref_opt = build(name, model), build(name, ref_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    passes, ref_passes = [], []
    for _ in range(5):
        opt.step(make_closure(opt, model, x, y, scaler, passes), scaler=scaler)
        scaler.update()
        ref_opt.step(make_closure(ref_opt, ref_model, x, y, None, ref_passes))
    assert passes == ref_passes  # the same one-pass / two-pass steps
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradscaler_esam_data_selection_equals_the_unscaled_step():
    x, y = data(dtype=torch.float32)
    model, ref_model = mlp(torch.float32), mlp(torch.float32)
    opt, ref_opt = build("esam", model), build("esam", ref_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss_fn = partial(F.cross_entropy, reduction="none")
    for _ in range(3):
        opt.step(ExampleLosses(model, loss_fn, x, y), scaler=scaler)
        scaler.update()
        ref_opt.step(ExampleLosses(ref_model, loss_fn, x, y))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def amp_step(opt, model, x, y, scaler, bad_first=False, bad_second=False):
    """One explicit AMP step with an optional inf in either pass; returns the decision."""
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if bad_first:
        model[0].weight.grad[0, 0] = float("inf")
    two = opt.first_step(scaler=scaler)
    if two:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if bad_second:
            model[2].bias.grad[0] = float("nan")
        opt.second_step(scaler=scaler, zero_grad=True)
    scaler.update()
    return two


@pytest.mark.parametrize("bad", ["full_first", "full_second", "one_pass"])
def test_looksam_skips_non_finite_steps_and_keeps_its_direction(bad):
    x, y = data(dtype=torch.float32)
    model = mlp(torch.float32)
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2, k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    if bad != "one_pass":
        assert amp_step(opt, model, x, y, scaler) and not amp_step(opt, model, x, y, scaler)
    else:
        assert amp_step(opt, model, x, y, scaler)
    gv = [opt.state[p]["looksam_gv"].clone() for p in model.parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    two = amp_step(
        opt, model, x, y, scaler, bad_first=bad != "full_second", bad_second=bad == "full_second"
    )
    assert two == (bad != "one_pass")
    assert scaler.get_scale() == scale / 2
    for p, w, v in zip(model.parameters(), w0, gv, strict=True):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["looksam_gv"], v)
        assert torch.isfinite(p).all()


def test_ae_sam_and_friendlysam_statistics_ignore_an_overflowed_step():
    x, y = data(dtype=torch.float32)
    for make in (
        lambda m: ae_sam(torch.optim.SGD(m.parameters(), lr=0.1)),
        lambda m: FriendlySAM(torch.optim.SGD(m.parameters(), lr=0.1)),
    ):
        model = mlp(torch.float32)
        opt = make(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        amp_step(opt, model, x, y, scaler)
        stats = copy.deepcopy(opt.state_dict()["sharpness_aware"])
        w0 = [p.detach().clone() for p in model.parameters()]
        amp_step(opt, model, x, y, scaler, bad_first=True)
        after = opt.state_dict()["sharpness_aware"]
        if isinstance(opt, FriendlySAM):
            for i, s in stats["state"].items():
                assert torch.equal(after["state"][i]["fsam_mean"], s["fsam_mean"])
        else:
            sched = after["global"]["schedule"]
            assert sched["mean"] == stats["global"]["schedule"]["mean"]
            assert sched["sam_steps"] == stats["global"]["schedule"]["sam_steps"]
        for p, w in zip(model.parameters(), w0, strict=True):
            assert torch.equal(p.detach(), w)


# ----------------------------------------------------------------------- accumulation and BN


@pytest.mark.parametrize("name", ["gsam", "looksam", "aesam", "fishersam", "friendlysam"])
def test_exact_accumulation_equals_the_full_batch_step(name):
    x, y = data(n=30)
    full_model, acc_model = mlp(), mlp()
    full, acc = build(name, full_model), build(name, acc_model)
    micro = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]
    closure = samkit.accumulation_closure(acc, acc_model, F.cross_entropy, micro)
    for _ in range(5):
        l_full = full.step(make_closure(full, full_model, x, y))
        l_acc = acc.step(closure)
        assert float(l_acc) == pytest.approx(float(l_full), rel=1e-12)
    for p, q in zip(full_model.parameters(), acc_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_accumulation_closure_keeps_batchnorm_statistics_right_across_one_pass_steps():
    x, y = data(n=20)
    micro = [(x[:10], y[:10]), (x[10:], y[10:])]
    model, ref_model = mlp(bn=True), mlp(bn=True)
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3, k=2)
    ref_opt = LookSAM(torch.optim.SGD(ref_model.parameters(), lr=0.1), rho=0.3, k=2)
    closure = samkit.accumulation_closure(opt, model, F.cross_entropy, micro)

    def ref_closure():
        ref_opt.zero_grad()
        ctx = samkit.disable_running_stats(ref_model) if ref_opt.is_perturbed else _null()
        total = 0.0
        with ctx:
            for xs, ys in micro:
                loss = F.cross_entropy(ref_model(xs), ys) * 0.5
                loss.backward()
                total += loss.detach()
        return total

    for _ in range(4):
        opt.step(closure)
        ref_opt.step(ref_closure)
    torch.testing.assert_close(model[1].running_mean, ref_model[1].running_mean)


@pytest.mark.parametrize("name", VARIANTS)
def test_batchnorm_statistics_are_updated_once_per_step(name):
    model = mlp(bn=True)
    x, y = data()
    opt = build(name, model)
    passes = []
    for step in range(1, 7):
        opt.step(make_closure(opt, model, x, y, counter=passes))
        assert int(model[1].num_batches_tracked) == step
    assert passes.count(False) == 6  # one unperturbed pass per step, however many in all


def test_esam_example_losses_update_batchnorm_once_per_step():
    model = mlp(bn=True)
    x, y = data()
    opt = ESAM(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5)
    for step in range(1, 4):
        opt.step(ExampleLosses(model, partial(F.cross_entropy, reduction="none"), x, y))
        assert int(model[1].num_batches_tracked) == step


# -------------------------------------------------------------------- registry and arguments


def test_every_variant_is_registered_and_builds_on_any_base():
    names = samkit.list_optimizers()
    for name in VARIANTS:
        assert name in names
        own = samkit.optim.registry.optimizer_info(name).base
        for base in ("sgd", "adamw") if own == "sgd" else (own,):  # bSAM: its own base only
            opt = samkit.create_optimizer(name, mlp(), base=base, lr=1e-3)
            assert isinstance(opt, samkit.optim.WrappingOptimizer) and opt.kind.form.wraps
            assert opt.param_groups is opt.base_optimizer.param_groups
    assert set(VARIANTS) <= set(samkit.optim.registry.describe_optimizers())


def sgd():
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)


@pytest.mark.parametrize(
    "build_bad, message",
    [
        (lambda: GSAM(sgd(), rho_max=0.1, rho_min=0.2), "Invalid rho_min: 0.2"),
        (lambda: GSAM(sgd(), alpha=-1), "Invalid alpha: -1"),
        (lambda: GSAM(sgd(), lr_max=0.1, lr_min=0.2), "Invalid lr_max: 0.1"),
        (lambda: LookSAM(sgd(), k=0), "Invalid k: 0"),
        (lambda: LookSAM(sgd(), k=2.5), "Invalid k: 2.5"),
        (lambda: ESAM(sgd(), beta=0.0), "Invalid beta: 0.0"),
        (lambda: ESAM(sgd(), gamma=1.5), "Invalid gamma: 1.5"),
        (lambda: FriendlySAM(sgd(), lmbda=1.0), "Invalid lmbda: 1.0"),
        (lambda: FriendlySAM(sgd(), sigma=-0.1), "Invalid sigma: -0.1"),
        (lambda: FisherSAM(sgd(), eta=float("nan")), "Invalid eta"),
        (lambda: AESchedule(delta=1.0), "Invalid delta: 1.0"),
        (lambda: AESchedule(c=float("inf")), "Invalid c: inf"),
        (lambda: AESchedule(c_final=1.0), "Invalid total_steps: None"),
        (lambda: RandomSchedule(p=1.5), "Invalid p: 1.5"),
        (lambda: rst_sam(sgd(), ascent="nope"), "Invalid ascent: 'nope'"),
        (lambda: with_schedule(samkit.SAM(sgd()), object()), "Invalid schedule"),
    ],
)
def test_bad_arguments_raise_clear_errors(build_bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_bad()


def test_second_step_after_a_one_pass_step_is_a_clear_error():
    pb = nn.Parameter(torch.ones(3))
    opt = LookSAM(torch.optim.SGD([pb], lr=0.1), k=5)
    for expected in (True, False):
        (pb**2).sum().backward()
        assert opt.first_step() is expected
        if expected:
            (pb**2).sum().backward()
            opt.second_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="needs a first_step"):
        opt.second_step()
