"""SAF and MESA (samkit.optim.trajectory): float64 references of the official algorithms, one
forward-backward per step, the base optimizer bit for bit when the term is off, state dicts,
AMP, clipping, the step engine's hook and the trainer."""

import copy
import math

import pytest
import torch
from torch import nn

import samkit
from samkit.data import iterate_batches
from samkit.data.split import DataSplit
from samkit.optim.trajectory import trajectory_kl
from samkit.step import StepEngine, take_step

F = nn.functional


def mlp(dtype=torch.float64, bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def split(n=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return DataSplit(torch.randn(n, 5, generator=g, dtype=dtype),
                     torch.randint(0, 3, (n,), generator=g), 3, (5,), "toy")


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def engine_run(opt, model, data, epochs, batch=4, drop_last=False, grad_accum=1, scaler=None):
    """Train through the step engine as the trainer does: indices, epoch, num_examples."""
    engine = StepEngine(opt, model, F.cross_entropy, grad_accum=grad_accum, scaler=scaler)
    gen = torch.Generator()
    losses = []
    for epoch in range(epochs):
        gen.manual_seed(100 + epoch)
        for x, y, idx in iterate_batches(data, batch, True, gen, drop_last, indices=True):
            losses.append(float(engine.step(x, y, indices=idx, epoch=epoch,
                                            num_examples=len(data.y))))
    return losses


def kl_reference(z, zhat, tau):
    """KL(softmax(zhat/tau) || softmax(z/tau)) per row, written out with softmax (not log)."""
    q = torch.softmax(zhat / tau, -1)
    p = torch.softmax(z / tau, -1)
    return (q * (q.log() - p.log())).sum(-1)


# ---------------------------------------------------------------------- the KL term


@pytest.mark.parametrize("shape", [(6, 4), (6, 40), (2, 3, 5)])  # classes-first, last-dim, 3-d
def test_trajectory_kl_value_and_gradient_are_the_closed_forms(shape):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    zhat = torch.randn(*shape, dtype=torch.float64, generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.4
    n = mask.numel()
    tau = 3.0
    value = trajectory_kl(z, zhat, tau, mask, scale=0.7)
    expected = 0.7 * (kl_reference(z, zhat, tau) * mask).sum() / n * tau**2
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(value, z)
    closed = 0.7 * tau / n * (torch.softmax(z / tau, -1) - torch.softmax(zhat / tau, -1))
    torch.testing.assert_close(grad, closed * mask[..., None], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(trajectory_kl(z, zhat, tau), kl_reference(z, zhat, tau).mean()
                               * tau**2, rtol=1e-12, atol=1e-14)


def test_trajectory_kl_refuses_a_double_backward_and_keeps_low_precision_logits():
    z = torch.randn(8, 10, requires_grad=True)
    (grad,) = torch.autograd.grad(trajectory_kl(z, torch.randn(8, 10), 5.0), z,
                                  create_graph=True)
    with pytest.raises(RuntimeError):  # not a silently wrong second derivative
        grad.sum().backward()
    zb = torch.randn(8, 10, dtype=torch.bfloat16, requires_grad=True)
    value = trajectory_kl(zb, torch.randn(8, 10), 5.0)
    assert value.dtype == torch.float32
    (gb,) = torch.autograd.grad(value, zb)
    assert gb.dtype == torch.bfloat16


@pytest.mark.parametrize("classes", [10, 40])  # classes-first on the CPU, last-dim
def test_low_precision_logits_are_scaled_in_float32_and_dropped_rows_add_exactly_zero(classes):
    g = torch.Generator().manual_seed(0)
    zb = (3 * torch.randn(16, classes, generator=g)).bfloat16().requires_grad_()
    zhat = 3 * torch.randn(16, classes, generator=g)
    # the term of bfloat16 logits is the float32 term of the same (widened) logits
    z32 = zb.detach().float().requires_grad_()
    value, value32 = trajectory_kl(zb, zhat, 5.0, scale=6.0), trajectory_kl(z32, zhat, 5.0,
                                                                             scale=6.0)
    torch.testing.assert_close(value, value32, rtol=1e-6, atol=1e-7)
    (gb,), (g32,) = torch.autograd.grad(value, zb), torch.autograd.grad(value32, z32)
    torch.testing.assert_close(gb, g32.bfloat16(), rtol=0, atol=0)
    # rows without a record add nothing, exactly, whatever the logits' dtype
    for z in (zb, z32):
        value = trajectory_kl(z, zhat, 5.0, torch.zeros(16, dtype=torch.bool), 6.0)
        (grad,) = torch.autograd.grad(value, z)
        assert value.item() == 0.0 and not grad.any()


# ---------------------------------------------------------------------- float64 references


def saf_reference(data, epochs, lam, tau, lag, start, batch=4, drop_last=False):
    """The official SAF loop, written out: a dict of each example's logits per epoch; the term
    uses the latest record of an epoch e' < e with e' = e (mod lag), as the official slots."""
    model = mlp()
    opt = sgd(model)
    records = {}  # (example, epoch) -> logits
    gen = torch.Generator()
    for epoch in range(epochs):
        gen.manual_seed(100 + epoch)
        order = torch.randperm(len(data.y), generator=gen)
        stop = len(order) - len(order) % batch if drop_last else len(order)
        for s in range(0, stop, batch):
            idx = order[s : s + batch]
            x, y = data.x[idx], data.y[idx]
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            if epoch > start and lam > 0:
                terms = []
                for row, i in enumerate(idx.tolist()):
                    past = [e for e in range(epoch - lag, -1, -lag) if (i, e) in records]
                    if past:
                        terms.append(kl_reference(out[row], records[(i, past[0])], tau))
                if terms:
                    loss = loss + lam * tau**2 * torch.stack(terms).sum() / len(idx)
            loss.backward()
            opt.step()
            for row, i in enumerate(idx.tolist()):
                records[(i, epoch)] = out[row].detach().clone()
    return model


@pytest.mark.parametrize("drop_last", [False, True])
def test_saf_equals_the_official_loop_in_float64(drop_last):
    data = split(n=10)
    kw = dict(lam=0.5, temperature=2.0, lag=2, start_epoch=1)
    model = mlp()
    opt = samkit.SAF(sgd(model), **kw)
    engine_run(opt, model, data, epochs=6, drop_last=drop_last)
    ref = saf_reference(data, 6, 0.5, 2.0, 2, 1, drop_last=drop_last)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(model[0].weight, _sgd_weights(data, 6, drop_last)[0])


def _sgd_weights(data, epochs, drop_last=False):
    model = mlp()
    opt = sgd(model)
    gen = torch.Generator()
    for epoch in range(epochs):
        gen.manual_seed(100 + epoch)
        for x, y in iterate_batches(data, 4, True, gen, drop_last):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return [p.detach() for p in model.parameters()]


def mesa_reference(data, epochs, lam, tau, beta, start, batch=4):
    """The official MESA loop: timm's ModelEmaV2 (a deepcopy in eval mode, every state entry
    averaged after each step), the KL to its outputs from epoch start + 1 on. The copy is made
    after the first forward pass (samkit's departure: BatchNorm buffers include that batch)."""
    model = mlp(bn=True)
    opt = sgd(model)
    ema = None
    gen = torch.Generator()
    for epoch in range(epochs):
        gen.manual_seed(100 + epoch)
        order = torch.randperm(len(data.y), generator=gen)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            x, y = data.x[idx], data.y[idx]
            opt.zero_grad()
            out = model(x)
            if ema is None:
                ema = copy.deepcopy(model).eval()
            loss = F.cross_entropy(out, y)
            if epoch > start:
                with torch.no_grad():
                    ref = ema(x)
                loss = loss + lam * tau**2 * kl_reference(out, ref, tau).mean()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, m in zip(ema.state_dict().values(), model.state_dict().values(),
                                strict=True):
                    e.copy_(beta * e + (1 - beta) * m if e.is_floating_point() else m)
    return model, ema


def test_mesa_equals_the_official_loop_in_float64():
    data = split(n=12)
    model = mlp(bn=True)
    opt = samkit.MESA(sgd(model), lam=0.8, temperature=5.0, ema_decay=0.9, start_epoch=1)
    engine_run(opt, model, data, epochs=5)
    ref, ema = mesa_reference(data, 5, 0.8, 5.0, 0.9, 1)
    for p, q in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for p, q in zip(opt.ema_model.state_dict().values(), ema.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not opt.ema_model.training  # the references come from eval mode


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_micro_batches_give_the_full_batch_step(name):
    data = split(n=12)
    kw = dict(start_epoch=0, lag=1) if name == "saf" else dict(start_epoch=0, ema_decay=0.5)
    results = []
    for accum in (1, 2):
        model = mlp()
        opt = samkit.create_optimizer(name, model, lr=0.1, momentum=0.9, **kw)
        engine_run(opt, model, data, epochs=3, grad_accum=accum)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- cost and equivalences


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_one_forward_backward_of_the_model_per_step(name):
    data = split(n=12)
    model = mlp()
    forwards, backwards = [], []
    model.register_forward_pre_hook(lambda m, a: forwards.append(m) if m is model else None)
    model[0].weight.register_hook(lambda g: backwards.append(1))
    opt = samkit.create_optimizer(name, model, lr=0.1, start_epoch=-1)  # the term always on
    engine_run(opt, model, data, epochs=3)
    steps = 3 * 3
    assert len(forwards) == steps and len(backwards) == steps
    if name == "mesa":  # plus one forward of the EMA model (no backward) once the term is on
        ema_forwards = []
        opt.ema_model.register_forward_pre_hook(lambda m, a: ema_forwards.append(1))
        engine_run(opt, model, data, epochs=2)
        assert len(ema_forwards) == 2 * 3


@pytest.mark.parametrize("kw", [dict(lam=0.0, start_epoch=0), dict(lam=0.5, start_epoch=10)])
@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_without_the_term_the_step_is_the_base_optimizer_bit_for_bit(name, kw):
    data = split(n=12)
    model = mlp()
    opt = samkit.create_optimizer(name, model, lr=0.1, momentum=0.9, **kw)
    engine_run(opt, model, data, epochs=4)
    plain = mlp()
    engine_run(samkit.create_optimizer("sgd", plain, lr=0.1, momentum=0.9), plain, data, 4)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_saf_memory_is_n_lag_classes_and_mesa_one_model_copy():
    data = split(n=12)
    model = mlp()
    saf = samkit.SAF(sgd(model), lag=3)
    assert saf.memory_bytes() == 0
    engine_run(saf, model, data, epochs=1)
    assert saf.memory_bytes() == 12 * 3 * (8 * 3 + 1)  # float64 logits of 3 classes, a flag
    model = mlp()
    mesa = samkit.MESA(sgd(model))
    engine_run(mesa, model, data, epochs=1)
    assert mesa.memory_bytes() == sum(
        t.nelement() * t.element_size() for t in model.state_dict().values())
    # nothing to clip or rewrite: the step's tail keeps no copy of the weights
    for opt in (saf, mesa):
        assert all(not opt.state[p] for g in opt.param_groups for p in g["params"])


# ---------------------------------------------------------------------- optimizer properties


def closure_for(opt, model, x, y, idx, epoch):
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        if isinstance(opt, samkit.SAF):
            term = opt.trajectory_loss(out, indices=idx, epoch=epoch, num_examples=12)
        else:
            term = opt.trajectory_loss(out, x=x, model=model, epoch=epoch)
        (loss + term).backward()
        return loss

    return closure


def own_loop(opt, model, data, epochs, first_epoch=0):
    gen = torch.Generator()
    for epoch in range(first_epoch, first_epoch + epochs):
        gen.manual_seed(100 + epoch)
        for x, y, idx in iterate_batches(data, 4, True, gen, indices=True):
            opt.step(closure_for(opt, model, x, y, idx, epoch))


SETTINGS = {"saf": dict(lag=1, start_epoch=0), "mesa": dict(ema_decay=0.5, start_epoch=0)}


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_the_closure_api_equals_the_step_engine(name):
    data = split(n=12)
    a, b = mlp(), mlp()
    opt_a = samkit.create_optimizer(name, a, lr=0.1, **SETTINGS[name])
    opt_b = samkit.create_optimizer(name, b, lr=0.1, **SETTINGS[name])
    own_loop(opt_a, a, data, 3)
    engine_run(opt_b, b, data, 3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_state_dict_round_trip_matches_an_uninterrupted_run(name):
    data = split(n=12)
    straight = mlp()
    opt = samkit.create_optimizer(name, straight, lr=0.1, momentum=0.9, **SETTINGS[name])
    own_loop(opt, straight, data, 4)
    half = mlp()
    opt = samkit.create_optimizer(name, half, lr=0.1, momentum=0.9, **SETTINGS[name])
    own_loop(opt, half, data, 2)
    saved = copy.deepcopy((half.state_dict(), opt.state_dict()))
    fresh = mlp()
    fresh.load_state_dict(saved[0])
    opt2 = samkit.create_optimizer(name, fresh, lr=0.1, momentum=0.9, **SETTINGS[name])
    opt2.load_state_dict(saved[1])
    own_loop(opt2, fresh, data, 2, first_epoch=2)
    for p, q in zip(straight.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_a_deepcopy_steps_like_the_original(name):
    data = split(n=12)
    model = mlp()
    opt = samkit.create_optimizer(name, model, lr=0.1, momentum=0.9, **SETTINGS[name])
    own_loop(opt, model, data, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    own_loop(opt, model, data, 2, first_epoch=2)
    own_loop(opt2, model2, data, 2, first_epoch=2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loading_another_safs_state_copies_its_memory():
    """``opt2.load_state_dict(opt.state_dict())`` without a deep copy: the two memories are
    separate (state_dict() hands out views of the live memory)."""
    data = split(n=12)
    model = mlp()
    opt = samkit.create_optimizer("saf", model, lr=0.1, **SETTINGS["saf"])
    own_loop(opt, model, data, 2)
    before = opt.logits.clone()
    model2 = copy.deepcopy(model)
    opt2 = samkit.create_optimizer("saf", model2, lr=0.1, **SETTINGS["saf"])
    opt2.load_state_dict(opt.state_dict())
    own_loop(opt2, model2, data, 1, first_epoch=2)
    assert torch.equal(opt.logits, before) and not torch.equal(opt2.logits, before)


def test_an_saf_pickled_with_its_memory_example_major_steps_like_the_original():
    """An older samkit kept SAF's memory as the attributes ``logits`` (N x lag x C) and
    ``recorded`` (N x lag); such a pickle loads into today's slot-major memory."""
    data = split(n=12)
    model = mlp()
    opt = samkit.create_optimizer("saf", model, lr=0.1, momentum=0.9, **SETTINGS["saf"])
    own_loop(opt, model, data, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    old = opt2.__getstate__()
    old["logits"] = old.pop("_slots").permute(1, 0, 2).contiguous()
    old["recorded"] = old.pop("_flags").t().contiguous()
    for key in ("_complete", "_checked_epoch"):
        del old[key]
    opt2 = samkit.SAF.__new__(samkit.SAF)
    opt2.__setstate__(old)
    assert torch.equal(opt2.logits, opt.logits) and torch.equal(opt2.recorded, opt.recorded)
    own_loop(opt, model, data, 2, first_epoch=2)
    own_loop(opt2, model2, data, 2, first_epoch=2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_the_davda54_constructor_equals_the_wrapper(name):
    entry = samkit.optim.registry.optimizer_info(name)
    m1, m2 = mlp(), mlp()
    a = entry.wrapper(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **SETTINGS[name])
    b = entry.wrapper(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), **SETTINGS[name])
    assert type(a) is type(b)
    data = split(n=12)
    own_loop(a, m1, data, 2)
    own_loop(b, m2, data, 2)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_max_grad_norm_bounds_the_step_of_lr_1_sgd(name):
    data = split(n=12)
    model = mlp()
    opt = samkit.create_optimizer(name, model, lr=1.0, max_grad_norm=0.01, **SETTINGS[name])
    engine = StepEngine(opt, model, F.cross_entropy)
    for epoch in range(2):
        for x, y, idx in iterate_batches(data, 4, False, indices=True):
            w = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
            engine.step(x, y, indices=idx, epoch=epoch, num_examples=12)
            dw = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - w
            assert 0 < dw.norm() <= 0.01 * (1 + 1e-9)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_gradscaler_steps_equal_the_unscaled_steps_and_skip_an_overflow(name):
    data = split(n=12, dtype=torch.float32)
    results = []
    for use_scaler in (False, True):
        model = mlp(torch.float32)
        opt = samkit.create_optimizer(name, model, lr=0.1, momentum=0.9, **SETTINGS[name])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_scaler else None
        engine_run(opt, model, data, epochs=3, scaler=scaler)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # an overflow: the step is skipped, the scale halves
    x, y = data.x[:4], data.y[:4]
    x = x.clone()
    x[0, 0] = float("inf")
    w = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    closure = StepEngine(opt, model, F.cross_entropy, scaler=scaler).closure(
        x, y, indices=torch.arange(4), epoch=3, num_examples=12)
    take_step(opt, closure, scaler)
    assert scaler.get_scale() == 2.0**7
    for p, q in zip(model.parameters(), w, strict=True):
        assert torch.equal(p.detach(), q)


def test_skip_non_finite_keeps_w_and_counts():
    data = split(n=12)
    model = mlp()
    opt = samkit.SAF(sgd(model), skip_non_finite=True, **SETTINGS["saf"])
    x = data.x[:4].clone()
    x[0, 0] = float("nan")
    w = [p.detach().clone() for p in model.parameters()]
    StepEngine(opt, model, F.cross_entropy).step(
        x, data.y[:4], indices=torch.arange(4), epoch=0, num_examples=12)
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), w, strict=True):
        assert torch.equal(p.detach(), q)


def test_lr_scheduler_and_add_param_group_go_through_the_wrapper():
    model = mlp()
    opt = samkit.SAF(sgd(model))
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    assert opt.base_optimizer.param_groups[-1]["momentum"] == 0.9
    assert opt.param_groups[-1]["max_grad_norm"] is None
    data = split(n=12)
    engine_run(opt, model, data, epochs=1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# ---------------------------------------------------------------------- errors


def test_a_plain_closure_is_refused_with_a_message_that_says_what_is_missing():
    model = mlp()
    opt = samkit.SAF(sgd(model))
    data = split()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x), data.y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="did not compute the trajectory loss"):
        opt.step(closure)


def test_the_step_engine_without_indices_is_a_clear_error():
    model = mlp()
    opt = samkit.SAF(sgd(model))
    data = split()
    engine = StepEngine(opt, model, F.cross_entropy)
    assert engine.batch_needs == {"indices", "epoch", "num_examples"}
    with pytest.raises(ValueError, match="SAF needs indices"):
        engine.step(data.x, data.y, epoch=0)
    with pytest.raises(ValueError, match="SAF needs epoch"):
        engine.step(data.x, data.y, indices=torch.arange(12))
    with pytest.raises(ValueError, match="size of the training set"):
        engine.step(data.x, data.y, indices=torch.arange(12), epoch=0)
    with pytest.raises(ValueError, match="Invalid indices"):
        engine.step(data.x, data.y, indices=torch.arange(5), epoch=0, num_examples=12)
    assert StepEngine(sgd(model), model, F.cross_entropy).batch_needs == frozenset()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: samkit.SAF(sgd(m), lam=-1.0), "Invalid lam"),
        (lambda m: samkit.SAF(sgd(m), temperature=0.0), "Invalid temperature"),
        (lambda m: samkit.SAF(sgd(m), lag=0), "Invalid lag"),
        (lambda m: samkit.SAF(sgd(m), start_epoch=1.5), "Invalid start_epoch"),
        (lambda m: samkit.SAF(sgd(m), num_examples=0), "Invalid num_examples"),
        (lambda m: samkit.MESA(sgd(m), ema_decay=1.0), "Invalid ema_decay"),
        (lambda m: samkit.MESA(sgd(m), max_grad_norm=0.0), "Invalid max_grad_norm"),
        (lambda m: samkit.MESA(samkit.SAM(sgd(m))), "Invalid base_optimizer"),
        (lambda m: samkit.SAF(m), "Invalid base_optimizer"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build(mlp())


def test_saf_refuses_sequence_outputs_and_mesa_another_model():
    opt = samkit.SAF(sgd(mlp()), num_examples=4)
    with pytest.raises(ValueError, match="N x C logits"):
        opt.trajectory_loss(torch.zeros(4, 2, 3), torch.arange(4), 0)
    model = mlp()
    mesa = samkit.MESA(sgd(model))
    with pytest.raises(ValueError, match="not the ones"):
        mesa.trajectory_loss(torch.zeros(4, 3), torch.zeros(4, 5), mlp(), 0)


# ---------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("name, kw", [
    ("saf", dict(lag=1, start_epoch=0)),
    ("mesa", dict(ema_decay=0.9, start_epoch=0)),
])
def test_the_trainer_trains_and_resumes_exactly(tmp_path, name, kw):
    from samkit.train import Callback, TrainConfig, Trainer, load_checkpoint

    def cfg(run):
        return TrainConfig(dataset="digits", model="mlp", model_kwargs={"width": 32},
                           optimizer=name, optimizer_kwargs=kw, epochs=3, batch_size=100,
                           lr=0.2, out_dir=str(tmp_path), name=run, threads=1)

    class StopAfterEpoch(Callback):
        def on_epoch_end(self, state, epoch, metrics):
            if epoch == 1:
                state.request_stop()

    straight = Trainer(cfg("straight"), verbose=0)
    record = straight.fit()
    assert math.isfinite(record["test_acc"]) and record["test_acc"] > 0.5
    assert straight.optimizer.last_trajectory_loss is not None  # the term was on
    Trainer(cfg("cut"), callbacks=[StopAfterEpoch()], verbose=0).fit()
    Trainer(cfg("cut"), resume=True, verbose=0).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    own = a["optimizer"]["trajectory"]
    for k, v in own.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["optimizer"]["trajectory"][k])
        elif isinstance(v, dict):
            for key in v:
                assert torch.equal(v[key], b["optimizer"]["trajectory"][k][key])


# ---------------------------------------------------------------------- the generic hook


class _Penalty(torch.optim.SGD):
    """A toy optimizer with a loss term (not a samkit class): the engine names no variant."""

    batch_needs = frozenset({"indices"})

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.seen = []

    def loss_term(self, output, batch):
        self.seen.append((batch.indices.clone(), batch.epoch, batch.num_examples))
        return 0.5 * (output**2).mean()


def test_the_step_engine_adds_any_optimizers_loss_term_and_returns_the_data_loss():
    data = split(n=8)
    model, ref = mlp(), mlp()
    opt = _Penalty(model.parameters())
    engine = StepEngine(opt, model, F.cross_entropy, grad_accum=2)
    assert engine.batch_needs == {"indices"}
    loss = engine.step(data.x, data.y, indices=torch.arange(8), epoch=3, num_examples=8)
    assert [s[0].tolist() for s in opt.seen] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert opt.seen[0][1:] == (3, 8)
    out = ref(data.x)
    data_loss = F.cross_entropy(out, data.y)
    torch.testing.assert_close(loss, data_loss.detach(), rtol=1e-12, atol=1e-14)
    (data_loss + 0.5 * (out**2).mean()).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
