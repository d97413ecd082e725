"""Issue 23's variants against float64 references of their papers' algorithms (per-tensor loops in
reference_variants.py) and against pytorch_optimizer where it implements the same algorithm:
WSAM, GCSAM, bSAM (with its posterior predictive) and the periodic schedule (``interval=k``)."""

import copy

import pytest
import torch
from torch import nn

import samkit
from samkit.optim import BSAM, GCSAM, WSAM, BSAMBase, PeriodicSchedule, with_schedule

from .reference_variants import (
    BSAMRef,
    HeavyBallRef,
    centralize,
    gcsam_step,
    global_norm,
    periodic_decisions,
    sam_step,
    wsam_step,
)

F = nn.functional
STEPS = 6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def grad_fn(x, y):
    """grads(ws): the gradient of the loss at weights ws (a separate model, no samkit code)."""
    model = mlp()
    params = list(model.parameters())

    def grads(ws):
        with torch.no_grad():
            for p, w in zip(params, ws, strict=True):
                p.copy_(w)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad.detach().clone() for p in params]

    return grads


def closure_of(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_close(ws, ref, tol=1e-12):
    for w, r in zip(ws, ref, strict=True):
        torch.testing.assert_close(w, r, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------- GCSAM


def test_gcsam_matches_the_papers_algorithm_over_several_steps():
    x, y = data()
    model = mlp()
    opt = GCSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                rho=0.2)
    ws, base, grads = weights(model), HeavyBallRef(0.1, 0.9, 1e-3), grad_fn(x, y)
    for _ in range(STEPS):
        opt.step(closure_of(opt, model, x, y))
        ws = gcsam_step(ws, grads, base, rho=0.2)
        assert_close(weights(model), ws)


def test_gcsam_perturbs_along_the_centralized_gradient_with_norm_rho():
    x, y = data()
    model = mlp()
    opt = GCSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    w0 = weights(model)
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0, strict=True)]
    assert abs(global_norm(eps) - 0.3) < 1e-12
    for e, t in zip(eps, g, strict=True):
        if e.dim() > 1:  # each output unit's row has mean zero: centralized
            assert float(e.mean(dim=1).abs().max()) < 1e-15
        assert torch.allclose(e, 0.3 * centralize(t) / global_norm([centralize(u) for u in g]),
                              rtol=1e-12, atol=1e-15)
    opt.restore()


def test_gcsam_against_pytorch_optimizer_differs_only_by_the_raw_norm():
    """pytorch_optimizer's SAM(use_gc=True) divides the centralized gradient by ||g|| (the raw
    gradient's norm): it equals the reference with raw_norm=True, and not samkit's GCSAM (the
    paper's eps_GC = rho GC(g)/||GC(g)||). pytorch_optimizer computes the norm in float32
    (get_global_gradient_norm casts it), hence the agreement to 1e-7, not 1e-12."""
    po = pytest.importorskip("pytorch_optimizer")
    x, y = data()
    model = mlp()
    peer = po.SAM(model.parameters(), torch.optim.SGD, rho=0.2, use_gc=True, perturb_eps=0.0,
                  lr=0.1)
    ws, base, grads = weights(model), HeavyBallRef(0.1), grad_fn(x, y)
    paper = weights(model)
    for _ in range(STEPS):
        closure = closure_of(peer, model, x, y)
        closure()  # pytorch_optimizer's SAM.step takes the gradient at w as given
        peer.step(closure)
        ws = gcsam_step(ws, grads, base, rho=0.2, raw_norm=True)
        assert_close(weights(model), ws, tol=1e-7)
    base2 = HeavyBallRef(0.1)
    for _ in range(STEPS):
        paper = gcsam_step(paper, grads, base2, rho=0.2)
    assert max(float((a - b).abs().max()) for a, b in zip(paper, ws, strict=True)) > 1e-6


# ----------------------------------------------------------------------------------- WSAM


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_the_papers_algorithm_over_several_steps(decouple):
    x, y = data()
    model = mlp()
    opt = WSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
               rho=0.2, gamma=0.8, decouple=decouple)
    ws, base, grads = weights(model), HeavyBallRef(0.1, 0.9, 1e-3), grad_fn(x, y)
    for _ in range(STEPS):
        opt.step(closure_of(opt, model, x, y))
        ws = wsam_step(ws, grads, base, rho=0.2, gamma=0.8, decouple=decouple)
        assert_close(weights(model), ws)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(decouple):
    """pytorch_optimizer's WSAM (as atorch's official WeightedSAM) is the same algorithm; it
    computes ||g|| in float32 (get_global_gradient_norm casts it) and adds 1e-12 to it, hence
    the agreement to 1e-7, not 1e-12 (a wrong weighting would differ by ~1e-2)."""
    po = pytest.importorskip("pytorch_optimizer")
    x, y = data()
    model, peer_model = mlp(), mlp()
    opt = WSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.2, gamma=0.9,
               decouple=decouple)
    peer = po.WSAM(peer_model, peer_model.parameters(), torch.optim.SGD, rho=0.2, gamma=0.9,
                   decouple=decouple, lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.step(closure_of(opt, model, x, y))
        peer.step(closure_of(peer, peer_model, x, y))
    assert_close(weights(model), weights(peer_model), tol=1e-7)


def test_wsam_with_gamma_one_half_coupled_is_sam_and_gamma_zero_is_the_base():
    x, y = data()
    runs = {}
    for name, make in {
        "wsam_half": lambda b: WSAM(b, rho=0.2, gamma=0.5, decouple=False),
        "sam": lambda b: samkit.SAM(b, rho=0.2),
        "wsam_zero": lambda b: WSAM(b, rho=0.2, gamma=0.0),
    }.items():
        model = mlp()
        opt = make(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for _ in range(STEPS):
            opt.step(closure_of(opt, model, x, y))
        runs[name] = weights(model)
    assert_close(runs["wsam_half"], runs["sam"], tol=0)
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        closure_of(sgd, model, x, y)()
        sgd.step()
    assert_close(runs["wsam_zero"], weights(model), tol=1e-15)


def test_wsam_applies_no_sharpness_term_on_a_scheduled_one_pass_step():
    x, y = data()
    model, ref = mlp(), mlp()
    opt = with_schedule(WSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2),
                        PeriodicSchedule(interval=1000))  # every step one-pass: plain SGD
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.step(closure_of(opt, model, x, y))
        closure_of(sgd, ref, x, y)()
        sgd.step()
    assert_close(weights(model), weights(ref), tol=0)


# ----------------------------------------------------------------------------------- bSAM


def make_bsam(model, **kw):
    base = BSAMBase(model.parameters(), lr=0.05, momentum=0.9, beta2=0.99, weight_decay=1e-3,
                    damping=0.1, init_precision=2.0)
    return BSAM(base, rho=0.05, num_data=200, seed=7, **kw)


def test_bsam_matches_the_official_algorithm_over_several_steps():
    x, y = data()
    model = mlp()
    opt = make_bsam(model)
    ws = weights(model)
    ref = BSAMRef(ws, lr=0.05, rho=0.05, num_data=200, beta1=0.9, beta2=0.99, delta=1e-3,
                  damping=0.1, s0=2.0, seed=7)
    grads = grad_fn(x, y)
    for _ in range(STEPS):
        opt.step(closure_of(opt, model, x, y))
        ws = ref.step(ws, grads)
        assert_close(weights(model), ws)
    precision = [opt.base_optimizer.precision(p) for p in model.parameters()]
    assert_close(precision, ref.s)


def test_bsam_explicit_form_needs_the_noise_and_then_equals_the_closure_form():
    x, y = data()
    model, explicit = mlp(), mlp()
    opt, opt2 = make_bsam(model), make_bsam(explicit)
    F.cross_entropy(explicit(x), y).backward()
    with pytest.raises(RuntimeError, match="before_first_pass"):
        opt2.first_step()
    opt2.zero_grad()
    for _ in range(3):
        opt.step(closure_of(opt, model, x, y))
        opt2.before_first_pass()
        assert opt2.weights_perturbed
        F.cross_entropy(explicit(x), y).backward()
        assert opt2.first_step()
        F.cross_entropy(explicit(x), y).backward()
        opt2.second_step()
    assert_close(weights(model), weights(explicit), tol=0)


def test_bsam_puts_w_back_when_the_noisy_pass_raises():
    x, y = data()
    model = mlp()
    opt = make_bsam(model)
    w0 = weights(model)

    def bad():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(bad)
    assert not opt.weights_perturbed
    assert_close(weights(model), w0, tol=0)


def test_bsam_posterior_std_sampled_weights_and_predictive():
    x, y = data()
    model = mlp()
    opt = make_bsam(model)
    for _ in range(3):
        opt.step(closure_of(opt, model, x, y))
    w = weights(model)
    std = opt.posterior_std()
    s = [opt.base_optimizer.precision(p) for p in model.parameters()]
    assert_close(std, [1 / torch.sqrt(200 * t) for t in s])
    gen = torch.Generator().manual_seed(5)
    with opt.sampled_weights(gen):
        sample = weights(model)
    assert_close(weights(model), w, tol=0)  # w back, bit for bit
    gen = torch.Generator().manual_seed(5)
    xi = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in w]
    assert_close(sample, [a + e * b for a, e, b in zip(w, xi, std, strict=True)])

    # the predictive: the mean over posterior samples, drawn as sampled_weights draws them
    pred = opt.predictive(lambda: model(x).softmax(-1), samples=4, seed=11)
    gen = torch.Generator().manual_seed(11)
    outs = []
    for _ in range(4):
        with opt.sampled_weights(gen):
            outs.append(model(x).softmax(-1).detach())
    torch.testing.assert_close(pred, torch.stack(outs).mean(0), rtol=1e-12, atol=1e-14)
    assert_close(weights(model), w, tol=0)
    # its uncertainty: the samples spread, less so with more data (N -> oo: the point estimate)
    spread = torch.stack(outs).std(0).mean()
    assert spread > 0
    for group in opt.param_groups:
        group["num_data"] = 10**12
    sharp = opt.predictive(lambda: model(x).softmax(-1), samples=4, seed=11)
    torch.testing.assert_close(sharp, model(x).softmax(-1).detach(), rtol=1e-4, atol=1e-5)


def test_bsam_state_dict_carries_the_noise_generator_and_the_precision():
    x, y = data()
    model = mlp()
    opt = make_bsam(model)
    for _ in range(3):
        opt.step(closure_of(opt, model, x, y))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for _ in range(3):
        opt.step(closure_of(opt, model, x, y))
    straight = weights(model)
    fresh = mlp()
    fresh.load_state_dict(saved[0])
    opt2 = make_bsam(fresh)
    opt2.load_state_dict(saved[1])
    for _ in range(3):
        opt2.step(closure_of(opt2, fresh, x, y))
    assert_close(weights(fresh), straight, tol=0)


@pytest.mark.parametrize("build_bad, message", [
    (lambda: BSAM(torch.optim.SGD(mlp().parameters(), lr=0.1)), "Invalid base_optimizer: SGD"),
    (lambda: BSAM(BSAMBase(mlp().parameters()), num_data=0), "Invalid num_data: 0"),
    (lambda: BSAM(BSAMBase(mlp().parameters()), rho=-1.0), "Invalid rho: -1.0"),
    (lambda: BSAMBase(mlp().parameters(), momentum=1.0), "Invalid momentum: 1.0"),
    (lambda: BSAMBase(mlp().parameters(), init_precision=0.0), "Invalid init_precision: 0.0"),
    (lambda: WSAM(torch.optim.SGD(mlp().parameters(), lr=0.1), gamma=1.0), "Invalid gamma: 1.0"),
    (lambda: WSAM(torch.optim.SGD(mlp().parameters(), lr=0.1), decouple="yes"),
     "Invalid decouple: 'yes'"),
    (lambda: PeriodicSchedule(interval=0), "Invalid interval: 0"),
    (lambda: samkit.create_optimizer("sam", mlp(), lr=0.1, schedule="periodic", interval=2.5),
     "Invalid interval: 2.5"),
    (lambda: samkit.create_optimizer("bsam", mlp(), lr=0.1, schedule="ae"), "Invalid schedule"),
    (lambda: samkit.create_optimizer("bsam", mlp(), base="sgd", lr=0.1), "Invalid base for bsam"),
])
def test_bad_arguments_raise_clear_errors(build_bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_bad()


def test_bsam_refuses_m_sharpness_with_a_reason():
    x, y = data()
    model = mlp()
    with pytest.raises(ValueError, match="posterior sample"):
        make_bsam(model).m_sharpness_step(model, F.cross_entropy, [(x[:12], y[:12]),
                                                                   (x[12:], y[12:])])


# ------------------------------------------------------------------------ the periodic schedule


def test_periodic_schedule_follows_composers_phase_and_the_sam_sgd_reference():
    """interval=3: steps 3, 6, 9 (from 1) are SAM steps, the others SGD steps, as Composer's
    (global_step + 1) % interval == 0; the weights follow the flat reference step for step."""
    a = torch.diag(torch.linspace(0.5, 3.0, 5, dtype=torch.float64))

    def grad(w):
        return a @ w

    w = nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))
    opt = samkit.create_optimizer("periodicsam", [w], lr=0.1, rho=0.1, interval=3)
    ref = w.detach().clone()
    passes = []

    def closure():
        passes.append(1)
        opt.zero_grad()
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    decisions = periodic_decisions(9, 3)
    assert decisions == [False, False, True] * 3
    for sam in decisions:
        before = len(passes)
        opt.step(closure)
        assert len(passes) - before == (2 if sam else 1)
        ref = sam_step(ref, grad, 0.1, 0.1) if sam else ref - 0.1 * grad(ref)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-14, atol=1e-15)
    assert (opt.schedule.steps, opt.schedule.sam_steps) == (9, 3)


def test_periodic_interval_one_is_sam_bit_for_bit():
    x, y = data()
    model, ref = mlp(), mlp()
    opt = samkit.create_optimizer("sam", model, lr=0.1, momentum=0.9, schedule="periodic",
                                  interval=1)
    sam = samkit.create_optimizer("sam", ref, lr=0.1, momentum=0.9)
    for _ in range(4):
        opt.step(closure_of(opt, model, x, y))
        sam.step(closure_of(sam, ref, x, y))
    assert_close(weights(model), weights(ref), tol=0)


def test_periodic_schedule_keeps_its_phase_through_a_checkpoint():
    x, y = data()
    model = mlp()
    opt = samkit.create_optimizer("periodicsam", model, lr=0.1, interval=4)
    for _ in range(5):
        opt.step(closure_of(opt, model, x, y))
    opt2 = samkit.create_optimizer("periodicsam", mlp(), lr=0.1, interval=4)
    opt2.load_state_dict(opt.state_dict())
    assert (opt2.schedule.steps, opt2.schedule.sam_steps) == (5, 1)
