"""The composable family: ascents x descents x schedules, each built in one expression through
the registry, against float64 references written from the formulas (no samkit code)."""

import math

import pytest
import torch
from optim import reference_variants as ref
from optim.test_variants import Problem, close
from optim.toy_ascent import TOY

import samkit
from samkit.optim import registry

ETA = 0.01


def asam_eps(w, g, rho, eta=ETA):
    """ASAM p = 2, element-wise, every entry normalized: rho T^2 g / ||T g||, T = |w| + eta."""
    t = w.abs() + eta
    return rho * t * t * g / float((t * g).norm())


def test_gsam_descent_over_asam_ascent_in_one_expression():
    pb = Problem()
    lrs = [0.05 * (1 + math.cos(math.pi * t / 12)) / 2 + 0.01 for t in range(12)]
    opt = samkit.create_optimizer(
        "gsam", [pb.w1, pb.w2], lr=lrs[0], ascent="asam", eta=ETA, rho_max=0.4, rho_min=0.1,
        alpha=0.3,
    )  # fmt: skip
    x = pb.x0.clone()
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        rho = ref.gsam_rho(lr, 0.4, 0.1, lrs[0], 0.0)
        g = pb.grad(x)
        gp = pb.grad(x + asam_eps(x, g, rho))
        g_perp = g - (g @ gp) / (gp @ gp) * gp
        x = x - lr * (gp - 0.3 * g_perp)
        opt.step(pb.closure(opt))
        close(pb.flat(), x)
    assert opt.param_groups[0]["rho"] == pytest.approx(ref.gsam_rho(lrs[-1], 0.4, 0.1, lrs[0], 0))


def test_gsam_with_rho_max_equal_to_rho_min_is_a_constant_rho():
    pb = Problem()
    opt = samkit.create_optimizer("gsam", [pb.w1, pb.w2], lr=0.05, rho_max=0.2, rho_min=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x = pb.x0.clone()
    for _ in range(8):
        lr = opt.param_groups[0]["lr"]
        x = ref.gsam_step(x, pb.grad, lr, 0.2, 0.1)
        opt.step(pb.closure(opt))
        sched.step()
        assert opt.param_groups[0]["rho"] == 0.2
        close(pb.flat(), x)


def test_looksam_over_asam_in_one_expression():
    pb = Problem()
    k, rho, alpha = 3, 0.3, 0.7
    opt = samkit.create_optimizer(
        "looksam", [pb.w1, pb.w2], lr=0.05, ascent="asam", eta=ETA, rho=rho, k=k, alpha=alpha
    )
    x, gv = pb.x0.clone(), None
    for t in range(9):
        before = pb.passes
        g = pb.grad(x)
        if t % k == 0:
            gs = pb.grad(x + asam_eps(x, g, rho))
            gv = gs - (g @ gs) / (g @ g) * g
        else:
            gs = g + alpha * g.norm() / gv.norm() * gv
        x = x - 0.05 * gs
        opt.step(pb.closure(opt))
        assert pb.passes - before == (2 if t % k == 0 else 1)
        close(pb.flat(), x)


def test_sam_with_the_ae_schedule_in_one_expression():
    pb = Problem()
    opt = samkit.create_optimizer("sam", [pb.w1, pb.w2], lr=0.2, rho=0.1, schedule="ae",
                                  c=0.2, delta=0.8)
    assert type(opt) is samkit.SAM and isinstance(opt.schedule, samkit.AESchedule)
    x, sq = pb.x0.clone(), []
    decisions = []
    for _ in range(12):
        g = pb.grad(x)
        sq.append(float(g @ g))
        use = ref.ae_decisions(sq, 0.2, 0.8)[-1]
        decisions.append(use)
        x = ref.sam_step(x, pb.grad, 0.2, 0.1) if use else x - 0.2 * g
        opt.step(pb.closure(opt))
        close(pb.flat(), x)
    assert True in decisions and False in decisions


def test_a_schedule_by_name_takes_its_options_and_refuses_a_plain_optimizer():
    pb = Problem()
    opt = samkit.create_optimizer("asam", [pb.w1, pb.w2], lr=0.1, schedule="random",
                                  schedule_options={"p": 0.3, "seed": 4})
    assert opt.schedule.p == 0.3 and opt.p == 2  # ASAM's own p is untouched
    with pytest.raises(ValueError, match="Invalid schedule: 'nope'"):
        samkit.create_optimizer("sam", [pb.w1], lr=0.1, schedule="nope")
    with pytest.raises(ValueError, match="needs a sharpness-aware optimizer"):
        samkit.create_optimizer("sgd", [pb.w1], lr=0.1, schedule="ae")
    with pytest.raises(ValueError, match="schedules its own steps"):
        samkit.create_optimizer("looksam", [pb.w1], lr=0.1, schedule="ae")


def test_the_registry_holds_all_four_kinds():
    assert {"sam", "asam", "usam", "fishersam", "friendlysam", "gcsam"} <= set(
        registry.list_ascents())
    assert registry.list_descents() == {"gsam": "gsam", "looksam": "looksam", "wsam": "wsam"}
    assert {"ae", "random", "periodic"} <= set(registry.list_schedules())
    assert {"sam", "gsam", "looksam", "aesam", "rst", "wsam", "bsam", "periodicsam"} <= set(
        samkit.list_optimizers())
    with pytest.raises(ValueError, match="Invalid ascent: 'nope'"):
        samkit.create_optimizer("gsam", [Problem().w1], lr=0.1, ascent="nope")
    with pytest.raises(ValueError, match="rho_t"):
        samkit.create_optimizer("gsam", [Problem().w1], lr=0.1, ascent="asam",
                                ascent_options={"rho": 0.1})


# ------------------------------------------------------------------- a new ascent: the toy


def toy_eps(x, g, rho):
    return rho * torch.sign(g) / math.sqrt(g.numel())


def test_a_new_ascent_is_one_function_and_one_registry_line():
    # tests/optim/conftest.py registered it; the shared property tests run over it too
    assert "toysign" in samkit.list_optimizers() and "toysign" in registry.list_ascents()
    pb = Problem()
    opt = samkit.create_optimizer("toysign", [pb.w1, pb.w2], lr=0.05, rho=0.2)
    x = pb.x0.clone()
    for _ in range(3):
        x = x - 0.05 * pb.grad(x + toy_eps(x, pb.grad(x), 0.2))
        opt.step(pb.closure(opt))
        close(pb.flat(), x)


def test_the_toy_ascent_composes_with_gsam_and_the_schedules():
    pb = Problem()
    opt = samkit.create_optimizer("gsam", [pb.w1, pb.w2], lr=0.05, ascent="toysign",
                                  rho_max=0.2, rho_min=0.2, alpha=0.5)
    x = pb.x0.clone()
    for _ in range(3):
        g = pb.grad(x)
        gp = pb.grad(x + toy_eps(x, g, 0.2))
        x = x - 0.05 * (gp - 0.5 * (g - (g @ gp) / (gp @ gp) * gp))
        opt.step(pb.closure(opt))
        close(pb.flat(), x)
    rst = samkit.create_optimizer("rst", [Problem().w1], lr=0.1, ascent="toysign", p=1.0)
    assert rst.ascent is TOY and rst.schedule is not None


def test_the_toy_declares_no_edge_and_no_effective_form():
    from samkit.stability import edge_for, optimizer_kind

    opt = samkit.create_optimizer("toysign", [Problem().w1], lr=0.1)
    assert edge_for(opt, 1.0) is None
    assert "toy sign ascent" in optimizer_kind(opt).note
