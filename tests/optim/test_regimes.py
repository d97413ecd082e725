"""Issue 12: the regimes where natural user code used to give a silently wrong step.

Mixed precision (CPU GradScaler, infs injected to emulate overflow), gradient clipping, buffers
of parameters without a first-pass gradient, GSAM's LR range under a warm-up, pickling, added
param groups, non-finite steps without a scaler, ESAM's official options and the migration
paths from davda54/sam and pytorch_optimizer. Each test names the finding it covers.
"""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import samkit
from samkit.optim import ESAM, GSAM, SAM, LookSAM

F = nn.functional


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=24, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def reference_steps(cls, steps=2, max_norm=None, **kw):
    """The same optimizer without a scaler (and with the user's own clip after the rewrite)."""
    model = mlp()
    x, y = data()
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kw)
    for _ in range(steps):
        loss_of(model, x, y).backward()
        opt.first_step()
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    return model


# ---------------------------------------------------------------- 1-3: AMP with unscale_


@pytest.mark.parametrize("target", ["wrapper", "base"])
def test_1_unscale_on_the_wrapper_or_the_base_then_clip_unscales_once(target):
    model, (x, y) = mlp(), data()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for _ in range(2):
        scaler.scale(loss_of(model, x, y)).backward()
        opt.first_step(scaler=scaler)
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt if target == "wrapper" else opt.base_optimizer)  # PyTorch's recipe
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # a no-op clip
        opt.second_step(scaler=scaler, zero_grad=True)
        scaler.update()
    ref = reference_steps(SAM, rho=0.1)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["wrapper", "base"])
def test_2_a_first_pass_overflow_reaches_scaler_step_after_unscale(target):
    model, (x, y) = mlp(), data()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w0 = weights(model)
    scaler.scale(loss_of(model, x, y)).backward()
    model[0].weight.grad[0, 0] = float("inf")  # the first pass overflowed
    opt.first_step(scaler=scaler)
    scaler.scale(loss_of(model, x, y)).backward()  # the second did not
    scaler.unscale_(opt if target == "wrapper" else opt.base_optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.second_step(scaler=scaler)
    scaler.update()
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)  # bit-identical, finite
    assert scaler.get_scale() == 2.0**9
    assert not opt.base_optimizer.state  # the base step never ran


@pytest.mark.parametrize("cls, kw", [(GSAM, dict(rho_max=0.1, alpha=0.4)), (LookSAM, dict(k=1))])
def test_3_first_pass_gradient_is_kept_in_the_units_of_g_p(cls, kw):
    model, (x, y) = mlp(), data()
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        scaler.scale(loss_of(model, x, y)).backward()
        opt.first_step(scaler=scaler)
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt)
        opt.second_step(scaler=scaler, zero_grad=True)
        scaler.update()
    ref = reference_steps(cls, **kw)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_3_unscale_before_first_step_is_allowed_and_counted_once():
    model, (x, y) = mlp(), data()
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho_max=0.1, alpha=0.4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt)  # e.g. to log the first-pass gradient norm
        opt.first_step(scaler=scaler)
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt)  # allowed again: the first record was taken by first_step
        opt.second_step(scaler=scaler, zero_grad=True)
        scaler.update()
    ref = reference_steps(GSAM, rho_max=0.1, alpha=0.4)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_3_unscale_before_a_one_pass_step_is_not_repeated():
    x, y = data()
    results = []
    for amp in (True, False):
        model = mlp()
        opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1, k=2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp)
        passes = []
        for _ in range(4):  # full, one-pass, full, one-pass
            scaler.scale(loss_of(model, x, y)).backward()
            scaler.unscale_(opt)
            if opt.first_step(scaler=scaler):
                scaler.scale(loss_of(model, x, y)).backward()
                scaler.unscale_(opt)
                opt.second_step(scaler=scaler, zero_grad=True)
                passes.append(2)
            else:
                passes.append(1)
            scaler.update()
        assert passes == [2, 1, 2, 1]
        results.append(weights(model))
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 4: clipping


def _grad_at(model, x, y):
    model.zero_grad()
    loss_of(model, x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


CLIP_SETTINGS = {"gsam": dict(rho_max=0.5, alpha=2.0), "looksam": dict(rho=0.5, k=3, alpha=3.0)}


@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_4_max_grad_norm_clips_the_direction_the_base_step_takes(name):
    model, (x, y) = mlp(torch.float64), data(dtype=torch.float64)
    opt = samkit.create_optimizer(
        name, list(model.parameters()), lr=1.0, max_grad_norm=0.05, **CLIP_SETTINGS[name]
    )
    closure_calls = []

    def closure():
        closure_calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    one_pass = 0
    for _ in range(5):
        w = weights(model)
        calls = len(closure_calls)
        opt.step(closure)
        one_pass += len(closure_calls) - calls == 1
        step = torch.cat(
            [(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), w, strict=True)]
        )
        assert step.norm() <= 0.05 * (1 + 1e-9)
        assert step.norm() >= 0.05 * (1 - 1e-3)  # this problem's steps are all clipped
    assert one_pass == (3 if name == "looksam" else 0)


def test_4_max_grad_norm_equals_a_clip_after_the_rewrite_in_float64():
    # GSAM's rewritten direction d, clipped to 0.05, is the step of lr = 1 SGD
    model, (x, y) = mlp(torch.float64), data(dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=1.0), rho_max=0.3, alpha=0.5,
               max_grad_norm=0.05)  # fmt: skip
    w0 = weights(ref_model)
    g = _grad_at(ref_model, x, y)
    gn = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(ref_model.parameters(), g, strict=True):
            p.add_(0.3 * t / gn)
    gp = _grad_at(ref_model, x, y)
    c = sum((a * b).sum() for a, b in zip(g, gp, strict=True)) / sum((b**2).sum() for b in gp)
    d = [(1 + 0.5 * c) * b - 0.5 * a for a, b in zip(g, gp, strict=True)]
    dn = torch.sqrt(sum((t**2).sum() for t in d))
    expected = [w - t * min(1.0, 0.05 / (float(dn) + 1e-6)) for w, t in zip(w0, d, strict=True)]
    assert float(dn) > 0.05  # the clip is active
    loss_of(model, x, y).backward()
    opt.first_step()
    loss_of(model, x, y).backward()
    opt.second_step()
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_4_max_grad_norm_is_a_per_group_key_and_validated():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([{"params": [a]}, {"params": [b], "max_grad_norm": 0.5}], lr=1.0)
    opt = SAM(base, rho=0.0)
    assert opt.param_groups[0]["max_grad_norm"] is None
    (10 * a.sum() + 10 * b.sum()).backward()
    opt.first_step()
    (10 * a.sum() + 10 * b.sum()).backward()
    opt.second_step()
    torch.testing.assert_close(a.detach(), torch.full((3,), -9.0))  # group 0 not clipped
    norm = math.sqrt(600)  # the norm spans both groups
    torch.testing.assert_close(b.detach(), torch.full((3,), 1 - 10 * 0.5 / (norm + 1e-6)))
    for bad in (0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="Invalid max_grad_norm"):
            SAM(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), max_grad_norm=bad)


# ---------------------------------------------------------------- 5: first-pass buffer


@pytest.mark.parametrize("cls", [GSAM, LookSAM])
def test_5_a_parameter_with_a_gradient_only_at_w_plus_eps_sees_g_zero(cls):
    # routing: the expert w2 is used in the second pass only (in step 2); in step 1 it was used
    # in both, so a stale buffer would hold its old gradient
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(4, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(4, dtype=torch.float64))
    kw = dict(rho_max=0.2, alpha=0.5) if cls is GSAM else dict(rho=0.2, k=1)
    opt = cls(torch.optim.SGD([w1, w2], lr=0.1), **kw)

    def loss(use_w2):
        return (w1**2).sum() * 1.5 + ((w1 * w2).sum() ** 2 if use_w2 else 0.0)

    def step(first_uses_w2):
        loss(first_uses_w2).backward()
        opt.first_step()
        loss(True).backward()
        opt.second_step(zero_grad=True)

    step(True)
    w1_0, w2_0 = w1.detach().clone(), w2.detach().clone()
    # the expected step-2 update in float64, with g = (grad_w1, 0)
    v1, v2 = w1_0.clone().requires_grad_(), w2_0.clone().requires_grad_()
    g1 = torch.autograd.grad((v1**2).sum() * 1.5, v1)[0]
    g = torch.cat([g1, torch.zeros(4, dtype=torch.float64)])
    eps = 0.2 * g / g.norm()
    u1, u2 = (v1 + eps[:4]).detach().requires_grad_(), (v2 + eps[4:]).detach().requires_grad_()
    gp = torch.cat(torch.autograd.grad((u1**2).sum() * 1.5 + ((u1 * u2).sum()) ** 2, (u1, u2)))
    if cls is GSAM:
        c = (g @ gp) / (gp @ gp)
        d = (1 + 0.5 * c) * gp - 0.5 * g
    else:
        d = gp  # LookSAM's full step descends with g_s; g only enters g_v
    step(False)
    after = torch.cat([w1.detach(), w2.detach()])
    torch.testing.assert_close(after, torch.cat([w1_0, w2_0]) - 0.1 * d, rtol=1e-12, atol=1e-14)
    if cls is LookSAM:  # g_v = g_s - <g, g_s>/||g||^2 g, with g_w2 = 0
        gv = gp - (g @ gp) / (g @ g) * g
        torch.testing.assert_close(opt.state[w2]["looksam_gv"], gv[4:], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- 6: GSAM's lr_max


def test_6_gsam_lr_max_comes_from_a_warm_up_schedulers_initial_lr():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    base = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LinearLR(base, start_factor=0.1, total_iters=4)
    opt = GSAM(base, rho_max=0.1, rho_min=0.01)  # built after the warm-up, as in most scripts
    assert opt.param_groups[0]["lr_max"] == pytest.approx(0.1)
    rhos = []
    for _ in range(5):
        (w**2).sum().backward()
        opt.first_step()
        (w**2).sum().backward()
        opt.second_step(zero_grad=True)
        rhos.append(opt.param_groups[0]["rho"])
        sched.step()
    # rho_t follows lr_t = 0.01, 0.0325, 0.055, 0.0775, 0.1 from 0.019 up to rho_max
    expected = [0.01 + 0.09 * lr / 0.1 for lr in (0.01, 0.0325, 0.055, 0.0775, 0.1)]
    assert rhos == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- 7: pickling, param groups


def _train(model, opt, x, y, steps):
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_7_copies_of_the_optimizer_keep_the_base_optimizer(how):
    model, (x, y) = mlp(torch.float64), data(dtype=torch.float64)
    opt = samkit.create_optimizer("looksam", model, lr=0.1, momentum=0.9, k=2)
    _train(model, opt, x, y, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.steps == opt.steps
    _train(model, opt, x, y, 3)
    _train(model2, opt2, x, y, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("via", ["wrapper", "base"])
@pytest.mark.parametrize("name", ["sam", "gsam"])
def test_7_add_param_group_through_the_wrapper_or_the_base(name, via):
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = samkit.create_optimizer(name, [a], lr=0.1)
    (opt if via == "wrapper" else opt.base_optimizer).add_param_group({"params": [b], "lr": 0.2})
    for _ in range(2):

        def closure():
            opt.zero_grad()
            loss = (a**2).sum() + (b**3).sum()
            loss.backward()
            return loss

        opt.step(closure)
    group = opt.param_groups[1]
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert group["rho"] == opt.param_groups[0]["rho"] and group["max_grad_norm"] is None
    if name == "gsam":
        assert group["lr_max"] == 0.2
    assert (b.detach() < 1).all()


# ---------------------------------------------------------------- 8: torch.compile


def test_8_a_compiled_train_step_takes_the_eager_step():
    x, y = data(dtype=torch.float32)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = mlp()
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)

        def train_step(model=model, opt=opt):
            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            return opt.step(closure)

        fn = torch.compile(train_step, backend="eager") if compiled else train_step
        losses = [float(fn().detach()) for _ in range(3)]
        assert not opt.is_perturbed
        results.append((losses, weights(model)))
    (le, we), (lc, wc) = results
    assert lc == pytest.approx(le, rel=1e-6)
    for p, q in zip(we, wc, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- 9: fp16 norms


def test_9_fp16_gradient_norm_above_65504_still_gives_eps():
    w = nn.Parameter(torch.zeros(100, dtype=torch.float16))
    opt = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    w.grad = torch.linspace(5e3, 1.5e4, 100, dtype=torch.float16)  # ||g|| ~ 1.1e5 > 65504
    g = w.grad.double()
    opt.first_step()
    expected = 0.05 * g / g.norm()
    torch.testing.assert_close(w.detach().double(), expected, rtol=2e-3, atol=1e-7)


# ---------------------------------------------------------------- 10: skip_non_finite


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_10_skip_non_finite_keeps_w_and_counts(bad_pass):
    model, (x, y) = mlp(torch.float64), data(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), skip_non_finite=True)
    w0 = weights(model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        if len(calls) == bad_pass:
            model[0].weight.grad[0, 0] = float("nan")
        return loss

    opt.step(closure)
    assert len(calls) == (1 if bad_pass == 1 else 2)  # no second pass after a bad first one
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)
    assert opt.skipped_steps == 1 and not opt.is_perturbed
    assert not opt.base_optimizer.state
    assert opt.state_dict()["sharpness_aware"]["global"]["skipped_steps"] == 1
    calls.clear()
    bad_pass = 0
    opt.step(closure)  # a finite step goes through
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0, strict=True))


def test_10_without_skip_non_finite_a_nan_is_not_hidden():
    model, (x, y) = mlp(torch.float64), data(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    loss_of(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.first_step()
    loss_of(model, x, y).backward()
    opt.second_step()
    assert not all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- 11: ESAM's options


def test_11_esam_official_normalization_gives_norm_rho_over_beta():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(5, dtype=torch.float64)) for _ in range(6)]
    grads = [torch.randn(5, dtype=torch.float64) for _ in params]
    norms = {}
    for swp_norm in ("all", "perturbed"):
        opt = ESAM(torch.optim.SGD(params, lr=0.1), rho=0.05, beta=0.5, seed=0, swp_norm=swp_norm)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.first_step()
        norms[swp_norm] = float(torch.cat([p.detach() for p in params]).norm())
        opt.restore()
    assert norms["perturbed"] == pytest.approx(0.05 / 0.5, rel=1e-12)
    assert norms["all"] < norms["perturbed"]  # the samkit default: SAM's ε in expectation
    with pytest.raises(ValueError, match="Invalid swp_norm"):
        ESAM(torch.optim.SGD(params, lr=0.1), swp_norm="some")


@pytest.mark.parametrize(
    "n, gamma, ceil, official", [(10, 0.5, 5, 4), (7, 0.3, 3, 1), (8, 0.99, 8, 8)]
)
def test_11_esam_sds_count_choices(n, gamma, ceil, official):
    before = torch.zeros(n, dtype=torch.float64)
    after = torch.arange(n, dtype=torch.float64)
    for sds_count, kept in (("ceil", ceil), ("official", official)):
        opt = ESAM(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), gamma=gamma,
                   sds_count=sds_count)  # fmt: skip
        idx = opt.select_examples(before, after)
        assert len(idx) == kept
        assert sorted(idx.tolist()) == list(range(n - kept, n))  # the largest rises
        assert opt.selects_examples(n) == (kept < n)


# ---------------------------------------------------------------- 12: migration


def test_12_davda54_constructor_equals_the_wrapper_form():
    x, y = data(dtype=torch.float64)
    m1, m2 = mlp(torch.float64), mlp(torch.float64)
    a = SAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    b = SAM(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    assert isinstance(a.base_optimizer, torch.optim.SGD) and a.defaults["momentum"] == 0.9
    _train(m1, a, x, y, 3)
    _train(m2, b, x, y, 3)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    c = samkit.ASAM(mlp().parameters(), base_optimizer_class=torch.optim.AdamW, rho=0.5, lr=1e-3)
    assert isinstance(c.base_optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match="samkit.ASAM"):
        SAM(mlp().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, adaptive=True)
    with pytest.raises(ValueError, match="Invalid base_optimizer_class"):
        SAM(mlp().parameters(), base_optimizer_class=int, lr=0.1)


def test_12_a_closure_that_adds_to_present_gradients_is_refused():
    model, (x, y) = mlp(torch.float64), data(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    w0 = weights(model)

    def davda54_closure():  # no zero_grad: the first backward is done outside
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="opt.zero_grad\\(\\) at the start of the closure"):
        opt.step(davda54_closure)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0, strict=True))
    # the same closure with no gradient present is a valid closure (zero_grad(set_to_none))
    opt.zero_grad()
    opt.step(davda54_closure)
    # and gradients present with a closure that zeroes them (Lightning's order) are fine
    loss_of(model, x, y).backward()
    opt.step(lambda: (opt.zero_grad(), davda54_closure())[1])


def test_12_ignoring_a_one_pass_step_gets_a_message_that_says_what_happened():
    p = nn.Parameter(torch.ones(3))
    opt = LookSAM(torch.optim.SGD([p], lr=0.1), k=5)
    for _ in range(2):  # the user's loop ignores first_step()'s answer
        (p**2).sum().backward()
        opt.first_step()
        (p**2).sum().backward()
        if not opt.is_perturbed:
            with pytest.raises(RuntimeError, match="returned False: it took a one-pass step"):
                opt.second_step()
        else:
            opt.second_step(zero_grad=True)


def test_12_create_optimizer_keeps_biases_and_norms_out_of_weight_decay():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    for name in ("sam", "sgd"):
        opt = samkit.create_optimizer(name, model, lr=0.1, weight_decay=5e-4)
        decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decay == {id(model[0].weight), id(model[2].weight)}
        n = sum(len(g["params"]) for g in opt.param_groups)
        assert n == len(list(model.parameters()))
        old = samkit.create_optimizer(name, model, lr=0.1, weight_decay=5e-4,
                                      decay_bias_and_norm=True)  # fmt: skip
        assert all(g["weight_decay"] == 5e-4 for g in old.param_groups)
    sam = samkit.create_optimizer("asam", model, lr=0.1, weight_decay=5e-4)
    biases = {id(p) for g in sam.param_groups if not g["normalize"] for p in g["params"]}
    assert biases == {id(model[0].bias), id(model[1].bias), id(model[2].bias)}
    with pytest.raises(ValueError, match="lr is required"):
        samkit.create_optimizer("sam", model, rho=0.05)


@pytest.mark.parametrize("bad", [False, True])
def test_1_a_fused_base_optimizer_is_unscaled_once_and_skipped_on_overflow(bad):
    # fused Adam unscales inside its own step (GradScaler's _step_supports_amp_scaling path)
    x, y = data()
    results = []
    for fused, scaler in ((True, torch.amp.GradScaler("cpu", init_scale=2.0**12)), (False, None)):
        model = mlp()
        opt = SAM(torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused), max_grad_norm=0.5)
        w0 = weights(model)

        def closure(model=model, opt=opt, scaler=scaler):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if bad and scaler is not None:
                model[2].weight.grad[0, 0] = float("inf")
            return loss

        for _ in range(3):
            opt.step(closure, scaler=scaler)
            if scaler is not None:
                scaler.update()
        results.append((w0, weights(model)))
    (w0, fused_w), (_, plain_w) = results
    for p, q, w in zip(fused_w, plain_w, w0, strict=True):
        if bad:
            assert torch.equal(p, w)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
