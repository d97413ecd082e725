"""The SAM-family variants against hand-derived float64 references (tests/optim/reference_variants)
on a small non-quadratic objective split over two parameter tensors in two param groups."""

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim import reference_variants as ref
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
    with_schedule,
)
from samkit.optim.gsam import gsam_rho

F = nn.functional
D = torch.float64


class Problem:
    """L(x) = 1/2 x^T H x - b^T x + 1/4 sum x^4, x = (w1 (3,), w2 (2, 2)) flattened."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(7, 7, generator=gen, dtype=D)
        self.h = q @ q.T / 7 + 0.5 * torch.eye(7, dtype=D)
        self.b = torch.randn(7, generator=gen, dtype=D)
        x0 = torch.randn(7, generator=gen, dtype=D)
        self.w1 = nn.Parameter(x0[:3].clone())
        self.w2 = nn.Parameter(x0[3:].reshape(2, 2).clone())
        self.x0 = x0
        self.passes = 0

    def flat(self):
        return torch.cat([self.w1.detach().reshape(-1), self.w2.detach().reshape(-1)])

    def loss_of(self, x):
        return 0.5 * x @ self.h @ x - self.b @ x + 0.25 * (x**4).sum()

    def grad(self, x):
        return self.h @ x - self.b + x**3

    def base(self, lr=0.05, **kw):
        return torch.optim.SGD([{"params": [self.w1]}, {"params": [self.w2]}], lr=lr, **kw)

    def closure(self, opt):
        def closure():
            self.passes += 1
            opt.zero_grad()
            x = torch.cat([self.w1.reshape(-1), self.w2.reshape(-1)])
            loss = self.loss_of(x)
            loss.backward()
            return loss

        return closure


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------- GSAM


def test_gsam_rho_interpolates_between_rho_min_and_rho_max_with_the_lr():
    assert gsam_rho(0.1, 0.2, 0.02, 0.1, 0.0) == pytest.approx(0.2)
    assert gsam_rho(0.0, 0.2, 0.02, 0.1, 0.0) == pytest.approx(0.02)
    assert gsam_rho(0.05, 0.2, 0.02, 0.1, 0.0) == pytest.approx(0.11)
    assert gsam_rho(0.3, 0.2, 0.02, 0.1, 0.0) == pytest.approx(0.2)  # clipped, no extrapolation
    assert gsam_rho(0.1, 0.2, 0.02, 0.1, 0.1) == 0.2


def test_gsam_matches_the_reference_with_rho_following_a_cosine_lr_schedule():
    pb = Problem()
    opt = GSAM(pb.base(lr=0.1), rho_max=0.3, rho_min=0.05, alpha=0.4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=0.01)
    x = pb.x0.clone()
    for _ in range(8):
        lr = opt.param_groups[0]["lr"]
        rho = ref.gsam_rho(lr, 0.3, 0.05, 0.1, 0.0)
        x = ref.gsam_step(x, pb.grad, lr, rho, 0.4)
        opt.step(pb.closure(opt))
        sched.step()
        assert opt.param_groups[1]["rho"] == pytest.approx(rho, rel=1e-14)
        close(pb.flat(), x)
    assert pb.passes == 16
    assert opt.param_groups[0]["rho"] < 0.3


def test_gsam_with_alpha_zero_and_constant_rho_is_sam():
    pb, pb2 = Problem(), Problem()
    gsam = GSAM(pb.base(), rho_max=0.2, rho_min=0.2, alpha=0.0)
    sam = samkit.SAM(pb2.base(), rho=0.2)
    for _ in range(5):
        gsam.step(pb.closure(gsam))
        sam.step(pb2.closure(sam))
    close(pb.flat(), pb2.flat())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 2.0))
def test_gsam_correction_is_orthogonal_to_the_perturbed_gradient(seed, alpha):
    # the descent direction d satisfies <d, g_p> = ||g_p||^2: the surrogate-gap term does not
    # change the first-order decrease of the perturbed loss
    gen = torch.Generator().manual_seed(seed)
    g, gp = torch.randn(5, generator=gen, dtype=D), torch.randn(5, generator=gen, dtype=D)
    w = nn.Parameter(torch.zeros(5, dtype=D))
    opt = GSAM(torch.optim.SGD([w], lr=1.0), alpha=alpha)
    w.grad = g.clone()
    opt.first_step()
    w.grad = gp.clone()
    opt.second_step()
    d = -w.detach()
    torch.testing.assert_close(d @ gp, gp @ gp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d, gp - alpha * (g - (g @ gp) / (gp @ gp) * gp))


# ------------------------------------------------------------------------------------ LookSAM


@pytest.mark.parametrize("k", [1, 3])
def test_looksam_matches_the_reference_and_runs_one_pass_between_full_steps(k):
    pb = Problem()
    opt = LookSAM(pb.base(), rho=0.2, k=k, alpha=0.7)
    reference = ref.LookSAMRef(0.2, k, 0.7)
    x = pb.x0.clone()
    for t in range(10):
        before = pb.passes
        x = reference.step(x, pb.grad, 0.05)
        opt.step(pb.closure(opt))
        assert pb.passes - before == (2 if t % k == 0 else 1)
        close(pb.flat(), x)
    assert pb.passes == reference.passes == 10 + len(range(0, 10, k))


def test_looksam_with_k_one_is_sam():
    pb, pb2 = Problem(), Problem()
    look, sam = LookSAM(pb.base(), rho=0.2, k=1), samkit.SAM(pb2.base(), rho=0.2)
    for _ in range(4):
        look.step(pb.closure(look))
        sam.step(pb2.closure(sam))
    close(pb.flat(), pb2.flat())


def test_looksam_explicit_form_reports_the_one_pass_steps():
    pb = Problem()
    opt = LookSAM(pb.base(), rho=0.2, k=2)
    closure = pb.closure(opt)
    flags = []
    for _ in range(4):
        closure()
        flags.append(opt.first_step())
        if flags[-1]:
            closure()
            opt.second_step()
        assert not opt.is_perturbed
    assert flags == [True, False, True, False]
    assert pb.passes == 6


def test_looksam_one_pass_step_descends_with_g_plus_scaled_gv_not_an_accumulated_gradient():
    pb = Problem()
    opt = LookSAM(pb.base(lr=1.0), rho=0.2, k=5, alpha=0.5)
    opt.step(pb.closure(opt))
    gv = torch.cat([opt.state[p]["looksam_gv"].reshape(-1) for p in (pb.w1, pb.w2)])
    x = pb.flat()
    g = pb.grad(x)
    opt.step(pb.closure(opt))
    close(pb.flat(), x - (g + 0.5 * g.norm() / gv.norm() * gv))
    # g_v is orthogonal to the gradient of its full step
    assert abs(float(gv @ pb.grad(pb.x0))) < 1e-12


# -------------------------------------------------------------------------------- Fisher SAM


def test_fishersam_eps_matches_the_reference_and_lies_on_the_ellipsoid():
    pb = Problem()
    opt = FisherSAM(pb.base(), rho=0.3, eta=2.0)
    pb.closure(opt)()
    g = torch.cat([pb.w1.grad.reshape(-1), pb.w2.grad.reshape(-1)])
    opt.first_step()
    eps = pb.flat() - pb.x0
    close(eps, ref.fisher_eps(g, 0.3, 2.0))
    f = 1 + 2.0 * g * g
    assert float(eps @ (f * eps)) == pytest.approx(0.09, rel=1e-12)
    opt.restore()


def test_fishersam_with_eta_zero_is_sam():
    pb, pb2 = Problem(), Problem()
    fisher, sam = FisherSAM(pb.base(), rho=0.2, eta=0.0), samkit.SAM(pb2.base(), rho=0.2)
    for _ in range(3):
        fisher.step(pb.closure(fisher))
        sam.step(pb2.closure(sam))
    close(pb.flat(), pb2.flat())


# ------------------------------------------------------------------------------- FriendlySAM


def test_friendlysam_matches_the_reference_and_its_mean_is_fed_the_raw_gradient():
    pb = Problem()
    opt = FriendlySAM(pb.base(), rho=0.2, sigma=0.8, lmbda=0.6)
    reference = ref.FriendlySAMRef(0.2, 0.8, 0.6)
    x = pb.x0.clone()
    raw = []
    for _ in range(6):
        raw.append(pb.grad(x))
        x = reference.step(x, pb.grad, 0.05)
        opt.step(pb.closure(opt))
        close(pb.flat(), x)
    mean = raw[0]
    for g in raw[1:]:
        mean = 0.6 * mean + 0.4 * g
    state = torch.cat([opt.state[p]["fsam_mean"].reshape(-1) for p in (pb.w1, pb.w2)])
    close(state, mean)


def test_friendlysam_sigma_one_equals_the_mean_first_form():
    pb = Problem()
    opt = FriendlySAM(pb.base(), rho=0.2, sigma=1.0, lmbda=0.6)
    opt.step(pb.closure(opt))
    m_prev = torch.cat([opt.state[p]["fsam_mean"].reshape(-1) for p in (pb.w1, pb.w2)])
    x = pb.flat()
    pb.closure(opt)()
    opt.first_step()
    close(pb.flat() - x, ref.friendly_eps_mean_first(pb.grad(x), m_prev, 0.2, 0.6))
    opt.restore()


# -------------------------------------------------------------------------------------- ESAM


def test_esam_swp_eps_matches_the_reference_with_the_same_draws():
    pb = Problem()
    opt = ESAM(pb.base(), rho=0.2, beta=0.5, gamma=1.0, seed=3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        keep = (torch.rand(2, generator=gen) < 0.5).tolist()
        pb.closure(opt)()
        x, grads = pb.flat(), [pb.w1.grad.clone(), pb.w2.grad.clone()]
        opt.first_step()
        eps = ref.esam_swp_eps(grads, 0.2, 0.5, keep)
        close(pb.w1.detach() - x[:3], eps[0])
        close(pb.w2.detach() - x[3:].reshape(2, 2), eps[1])
        opt.restore()


def test_esam_with_beta_one_and_a_plain_closure_is_sam():
    pb, pb2 = Problem(), Problem()
    esam, sam = ESAM(pb.base(), rho=0.2, beta=1.0), samkit.SAM(pb2.base(), rho=0.2)
    for _ in range(3):
        esam.step(pb.closure(esam))
        sam.step(pb2.closure(sam))
    close(pb.flat(), pb2.flat())


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3).to(D)


def batch(n=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=D), torch.randint(0, 3, (n,), generator=gen)


class CountingLosses(ExampleLosses):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def losses(self, indices, perturbed):
        self.calls.append((None if indices is None else len(indices), perturbed))
        return super().losses(indices, perturbed)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 1.0])
def test_esam_sds_descends_with_the_gradient_of_the_sharpest_examples(gamma):
    model, refm = linear_model(), linear_model()
    x, y = batch()
    per_example = partial(F.cross_entropy, reduction="none")
    opt = ESAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.3, beta=1.0, gamma=gamma)
    closure = CountingLosses(model, per_example, x, y)
    loss = opt.step(closure)
    # reference: SAM eps from the mean loss, per-example loss rise, top ceil(gamma n)
    params = list(refm.parameters())
    l0 = per_example(refm(x), y)
    assert float(loss) == pytest.approx(float(l0.detach().mean()), rel=1e-14)
    grads = torch.autograd.grad(l0.mean(), params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(0.3 * g / norm)
        rise = per_example(refm(x), y) - l0.detach()
    keep = math.ceil(gamma * 10)
    chosen = torch.argsort(rise, descending=True)[:keep]
    g2 = torch.autograd.grad(per_example(refm(x[chosen]), y[chosen]).mean(), params)
    with torch.no_grad():
        for p, g, q in zip(params, g2, grads, strict=True):
            p.sub_(0.3 * q / norm).sub_(0.5 * g)
    for p, q in zip(model.parameters(), refm.parameters(), strict=True):
        close(p.detach(), q.detach())
    if keep < 10:
        expected = [(None, False), (None, True), (keep, True)]
    else:  # gamma = 1: no selection pass
        expected = [(None, False), (None, True)]
    assert closure.calls == expected  # passes: full fwd-bwd, [no-grad fwd], fwd-bwd on B+


def test_esam_sds_rejects_a_reduced_loss():
    model = linear_model()
    x, y = batch()
    opt = ESAM(torch.optim.SGD(model.parameters(), lr=0.5))
    with pytest.raises(ValueError, match="one loss per example"):
        opt.step(ExampleLosses(model, F.cross_entropy, x, y))


# --------------------------------------------------------------------------- AE-SAM and RST


def test_ae_schedule_decisions_match_the_reference_and_set_the_pass_count():
    pb = Problem()
    opt = with_schedule(samkit.SAM(pb.base(lr=0.2), rho=0.1), AESchedule(c=0.2, delta=0.8))
    sq_norms, decisions = [], []
    for _ in range(15):
        before = pb.passes
        sq_norms.append(float(pb.grad(pb.flat()).norm() ** 2))
        opt.step(pb.closure(opt))
        decisions.append(pb.passes - before == 2)
    assert decisions == ref.ae_decisions(sq_norms, 0.2, 0.8)
    assert True in decisions and False in decisions
    assert opt.schedule.sam_steps == sum(decisions)
    assert pb.passes == 15 + sum(decisions)


def test_ae_sam_one_pass_steps_are_plain_sgd_steps_and_two_pass_steps_are_sam():
    pb = Problem()
    opt = samkit.create_optimizer("aesam", [pb.w1, pb.w2], lr=0.2, rho=0.1, c=0.2, delta=0.8)
    x = pb.x0.clone()
    for _ in range(10):
        decision_before = opt.schedule.sam_steps
        ref_sgd = x - 0.2 * pb.grad(x)
        ref_sam = ref.sam_step(x, pb.grad, 0.2, 0.1)
        opt.step(pb.closure(opt))
        x = ref_sam if opt.schedule.sam_steps > decision_before else ref_sgd
        close(pb.flat(), x)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_rst_decisions_follow_the_seeded_generator(p):
    pb = Problem()
    opt = samkit.create_optimizer("rst", [pb.w1, pb.w2], lr=0.1, rho=0.1, p=p, seed=7)
    x = pb.x0.clone()
    for use in ref.rst_decisions(12, p, 7):
        before = pb.passes
        x = ref.sam_step(x, pb.grad, 0.1, 0.1) if use else x - 0.1 * pb.grad(x)
        opt.step(pb.closure(opt))
        assert pb.passes - before == (2 if use else 1)
        close(pb.flat(), x)


def test_rst_linear_probability_schedule():
    sched = RandomSchedule(p=0.0, p_final=1.0, total_steps=100, seed=0)
    uses = [sched.use_sam(None, [], None) for _ in range(200)]
    assert sum(uses[:50]) < sum(uses[50:100]) and all(uses[100:])


def test_a_schedule_composes_with_any_ascent_direction():
    pb, pb2 = Problem(), Problem()
    opt = samkit.create_optimizer(
        "rst", [pb.w1, pb.w2], lr=0.05, p=1.0, ascent="fishersam", rho=0.2
    )
    assert isinstance(opt, FisherSAM) and isinstance(opt.schedule, RandomSchedule)
    plain = FisherSAM(pb2.base(), rho=0.2)
    for _ in range(3):
        opt.step(pb.closure(opt))
        plain.step(pb2.closure(plain))
    close(pb.flat(), pb2.flat())
    assert isinstance(with_schedule(samkit.ASAM(Problem().base()), AESchedule()), samkit.ASAM)
    with pytest.raises(ValueError, match="schedules its own steps"):
        with_schedule(LookSAM(Problem().base()), AESchedule())
    with pytest.raises(ValueError, match="Invalid ascent"):
        samkit.create_optimizer("aesam", [Problem().w1], lr=0.1, ascent="looksam")
