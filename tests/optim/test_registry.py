"""The registry: every entry declared (namespaces base / ascent / descent / schedule with their
defaults), keys routed by declaration, clear errors, one davda54 adapter, one way to AE-SAM."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from optim.test_protocol import data, make_closure, mlp

import samkit
from samkit.optim import davda54, registry
from samkit.optim.ascents import get_ascent
from samkit.optim.presets import COMMON_KEYS, AscentPreset, SharpnessAware
from samkit.optim.registry import REQUIRED

NAMES = samkit.list_optimizers()
LOSS_TERM = [n for n in NAMES if hasattr(registry.optimizer_info(n).wrapper, "loss_term")]


def groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def explicit_defaults(name):
    """create_optimizer's keyword arguments that give every declared default by name."""
    ns = registry.optimizer_options(name)
    base = {k: v for k, v in ns["base"].items() if v is not REQUIRED}
    out = {"base_options": base}
    for space in ("ascent", "descent", "schedule"):
        if ns[space]:
            out[f"{space}_options"] = ns[space]
    return out


# ------------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_builds_with_its_declared_defaults(name):
    # parameters, not a model: from a model, create_optimizer's weight_decay defaults to 0 for
    # every base (adamw's declared 0.01 is torch's default, used for parameters)
    implicit = samkit.create_optimizer(name, list(mlp().parameters()), lr=0.1)
    explicit = samkit.create_optimizer(name, list(mlp().parameters()), lr=0.1,
                                       **explicit_defaults(name))
    assert type(implicit) is type(explicit)
    assert groups_without_params(implicit) == groups_without_params(explicit)
    assert repr(getattr(implicit, "schedule", None)) == repr(getattr(explicit, "schedule", None))
    if isinstance(implicit, samkit.SharpnessAwareOptimizer) and name not in ("esam", "msam"):
        model_a, model_b = mlp(), mlp()
        a = samkit.create_optimizer(name, list(model_a.parameters()), lr=0.1)
        b = samkit.create_optimizer(name, list(model_b.parameters()), lr=0.1,
                                    **explicit_defaults(name))
        x, y = data()
        for _ in range(3):
            a.step(make_closure(a, model_a, x, y))
            b.step(make_closure(b, model_b, x, y))
        for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(p, q)


def _signature_defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_the_declarations_match_the_constructors(name):
    """A test may read signatures (create_optimizer does not): declared == the class's own."""
    entry = registry.optimizer_info(name)
    if not entry.sharpness_aware or isinstance(entry.wrapper, AscentPreset):
        return
    if entry.schedule is not None:  # aesam, rst: the schedule classes' defaults
        from samkit.optim.schedules import SCHEDULES

        assert dict(registry.SCHEDULE_INFO[entry.schedule].defaults) == _signature_defaults(
            SCHEDULES[entry.schedule]
        )
        return
    sig = _signature_defaults(entry.wrapper)
    ns = entry.namespaces()
    own = {**ns["ascent"], **ns["descent"]}
    if entry.ascent_choice:  # the record's keys go as ascent_options: only the own keys
        own = {**entry.ascent_keys, **entry.descent}
    for key, value in own.items():
        assert key in sig and sig[key] == value, (name, key, value, sig.get(key))
    for key in COMMON_KEYS:
        assert key in inspect.signature(entry.wrapper).parameters


@pytest.mark.parametrize("base", sorted(registry.BASES))
def test_the_base_declarations_match_torch(base):
    info = registry.BASES[base]
    sig = _signature_defaults(info.cls)
    for key, value in info.defaults.items():
        if key in sig and value is not REQUIRED:
            assert sig[key] == value, (base, key)
    assert info.defaults["lr"] is REQUIRED


@pytest.mark.parametrize("name", ["sam", "asam", "usam", "fishersam", "friendlysam"])
def test_presets_take_their_defaults_from_their_ascent_record(name):
    record = get_ascent(name)
    entry = registry.optimizer_info(name)
    declared = {"rho": record.rho, **record.group_defaults, **record.options}
    assert entry.namespaces()["ascent"] == declared
    signature = _signature_defaults(entry.wrapper)
    assert {k: v for k, v in signature.items() if k in declared} == declared
    # the same group values whichever way: the class, SharpnessAware, the registry
    w = [torch.nn.Parameter(torch.ones(3))]
    cls = entry.wrapper(torch.optim.SGD(w, lr=0.1))
    generic = SharpnessAware(torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1), name)
    assert groups_without_params(cls) == groups_without_params(generic)
    assert cls.ascent_options == generic.ascent_options


def test_describe_shows_each_entry_s_namespaces_and_defaults(capsys):
    text = registry.describe_optimizers()
    assert set(text) == set(NAMES)
    assert "ascent asam: rho=0.5, eta=0.01, normalize=True, p=2" in text["asam"]
    assert "descent: alpha=0.1" in text["gsam"] and "rho excluded" in text["gsam"]
    assert "schedule ae: c=0.0, delta=0.9" in text["aesam"]
    assert "base sgd: lr (required), momentum=0" in text["sgd"]
    from samkit.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ascent= sam (any of list_ascents()): rho_max=0.05" in out


def test_registration_lives_in_one_file():
    """Registering the same class again without declarations (optim/trajectory.py still does
    for saf and mesa) keeps the declared entry."""
    entry = registry.optimizer_info("saf")
    assert registry.register_optimizer("saf", entry.wrapper, "again") is entry
    assert registry.optimizer_info("saf").descent["lam"] == 0.3


# ------------------------------------------------------------------- routing


def test_each_key_lands_in_its_namespace():
    model = mlp()
    opt = samkit.create_optimizer("gsam", model, lr=0.1, momentum=0.9, ascent="asam", eta=0.02,
                                  p=math.inf, rho_max=0.4, alpha=0.3, max_grad_norm=2.0)
    g = opt.param_groups[0]
    assert (g["momentum"], g["eta"], g["rho_max"], g["gsam_alpha"], g["max_grad_norm"]) == (
        0.9, 0.02, 0.4, 0.3, 2.0)
    assert opt.ascent.name == "asam" and opt.ascent_options["p"] == math.inf
    opt = samkit.create_optimizer("aesam", mlp(), lr=0.1, rho=0.2, c=0.5, delta=0.8)
    assert type(opt) is samkit.SAM and opt.param_groups[0]["rho"] == 0.2
    assert (opt.schedule.c, opt.schedule.delta) == (0.5, 0.8)
    opt = samkit.create_optimizer("looksam", mlp(), lr=0.1, ascent="asam", rho=0.3, eta=0.05, k=2)
    assert opt.k == 2 and opt.param_groups[0]["rho"] == 0.3 and opt.param_groups[0]["eta"] == 0.05
    opt = samkit.create_optimizer("esam", mlp(), lr=0.1, beta=0.5, gamma=0.7, seed=3)
    assert (opt.beta, opt.gamma, opt.seed) == (0.5, 0.7, 3)


def test_explicit_namespaces():
    opt = samkit.create_optimizer(
        "rst", mlp(), ascent="asam", base_options={"lr": 0.1, "momentum": 0.9},
        ascent_options={"p": math.inf, "rho": 0.7}, schedule_options={"p": 0.25, "seed": 5},
    )  # fmt: skip
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["rho"] == 0.7
    assert opt.p == math.inf and opt.schedule.p == 0.25 and opt.schedule.seed == 5
    opt = samkit.create_optimizer("gsam", mlp(), lr=0.1, descent_options={"alpha": 0.4})
    assert opt.param_groups[0]["gsam_alpha"] == 0.4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="sam", rhoo=0.1), r"Invalid argument 'rhoo' for sam: no namespace takes it.*"
         r"ascent: rho.*did you mean rho"),
        (dict(name="rst", ascent="asam", p=0.5), r"Ambiguous argument 'p' for rst: the namespaces "
         r"ascent and schedule both take it; name one: ascent_options=\{'p': ...\} or "
         r"schedule_options=\{'p': ...\}"),
        (dict(name="asam", schedule="random", p=0.5), "Ambiguous argument 'p' for asam"),
        (dict(name="gsam", rho=0.1), "gsam does not take rho: GSAM's radius is rho_t"),
        (dict(name="gsam", ascent_options={"rho": 0.1}), "rho_t"),
        (dict(name="sam", base="adam", momentum=0.9), r"'momentum'.*base \(adam\): lr, betas"),
        (dict(name="sam", ascent_options={"eta": 0.1}), "Invalid ascent_options key 'eta' for sam"),
        (dict(name="sam", rho=0.1, ascent_options={"rho": 0.2}), "given twice"),
        (dict(name="sgd", max_grad_norm=1.0), "a plain torch optimizer takes no max_grad_norm"),
        (dict(name="sam", ascent="asam"), "Invalid ascent for sam: 'asam'.*take ascent=: aesam"),
        (dict(name="aesam", schedule="random"), "Invalid schedule for aesam: 'random'"),
        (dict(name="sam", schedule=samkit.AESchedule(), c=0.3), "Invalid argument 'c' for sam"),
    ],
)
def test_unknown_and_ambiguous_keys_raise_clearly(kwargs, message):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    kwargs.setdefault("lr", 0.1)
    with pytest.raises(ValueError, match=message):
        samkit.create_optimizer(name, mlp(), **kwargs)


def test_unambiguous_keywords_keep_working():
    """The calls of the README and the tests before the namespaces."""
    m = mlp()
    assert samkit.create_optimizer("sam", m, lr=0.1, rho=0.05).param_groups[0]["rho"] == 0.05
    assert samkit.create_optimizer("asam", m, lr=0.1, eta=0.02).param_groups[0]["eta"] == 0.02
    opt = samkit.create_optimizer("sam", m, lr=0.1, rho=0.05, schedule="ae", c=0.5)
    assert opt.schedule.c == 0.5
    opt = samkit.create_optimizer("rst", m, lr=0.1, p=0.3)  # SAM's ascent has no p
    assert opt.schedule.p == 0.3


# ------------------------------------------------------------------- float64 equality


def _steps(opt, model, n=5):
    x, y = data()
    for _ in range(n):
        opt.step(make_closure(opt, model, x, y))
    return [p.detach().clone() for p in model.parameters()]


def _hand(model, **kw):
    return torch.optim.SGD(samkit.param_groups(model), lr=0.1, momentum=0.9, **kw)


HAND_BUILT = {
    "sam": (dict(rho=0.1), lambda m: samkit.SAM(_hand(m), rho=0.1)),
    "asam": (dict(rho=0.4, eta=0.02, p=math.inf),
             lambda m: samkit.ASAM(_hand(m), rho=0.4, eta=0.02, p=math.inf)),
    "gsam": (dict(ascent="asam", eta=0.02, rho_max=0.3, rho_min=0.1, alpha=0.2),
             lambda m: samkit.GSAM(_hand(m), rho_max=0.3, rho_min=0.1, alpha=0.2, ascent="asam",
                                   ascent_options={"eta": 0.02})),
    "aesam": (dict(rho=0.1, c=-0.2, delta=0.5),
              lambda m: samkit.with_schedule(samkit.SAM(_hand(m), rho=0.1),
                                             samkit.AESchedule(c=-0.2, delta=0.5))),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_the_registry_equals_the_hand_built_optimizer_in_float64(name):
    kwargs, hand = HAND_BUILT[name]
    m1, m2 = mlp(), mlp()
    a = samkit.create_optimizer(name, m1, lr=0.1, momentum=0.9, **kwargs)
    b = hand(m2)
    assert type(a) is type(b)
    assert groups_without_params(a) == groups_without_params(b)
    for p, q in zip(_steps(a, m1), _steps(b, m2), strict=True):
        assert p.dtype == torch.float64 and torch.equal(p, q)


def test_one_way_to_build_ae_sam():
    """aesam over ASAM, asam + schedule="ae", samkit.ae_sam (an alias) and with_schedule by
    hand: the same optimizer, step for step."""
    models = [mlp() for _ in range(4)]
    opts = [
        samkit.create_optimizer("aesam", models[0], lr=0.1, ascent="asam", c=0.3, eta=0.05),
        samkit.create_optimizer("asam", models[1], lr=0.1, schedule="ae", c=0.3, eta=0.05),
        samkit.ae_sam(torch.optim.SGD(samkit.param_groups(models[2]), lr=0.1), c=0.3,
                      ascent="asam", ascent_options={"eta": 0.05}),
        samkit.with_schedule(samkit.ASAM(torch.optim.SGD(samkit.param_groups(models[3]), lr=0.1),
                                         eta=0.05), samkit.AESchedule(c=0.3)),
    ]  # fmt: skip
    results = [_steps(o, m, 6) for o, m in zip(opts, models, strict=True)]
    assert len({type(o) for o in opts}) == 1
    assert len({o.schedule.sam_steps for o in opts}) == 1 and 0 < opts[0].schedule.sam_steps < 6
    for other in results[1:]:
        for p, q in zip(results[0], other, strict=True):
            assert torch.equal(p, q)


# ------------------------------------------------------------------- davda54's form


@pytest.mark.parametrize(
    "build",
    [
        lambda params, *a, **kw: SharpnessAware(params, *a, ascent="asam", eta=0.05, p=math.inf,
                                                rho=0.3, **kw),
        lambda params, *a, **kw: samkit.ASAM(params, *a, rho=0.3, eta=0.05, normalize=False,
                                             **kw),
        lambda params, *a, **kw: samkit.ae_sam(params, *a, c=0.1, ascent="asam",
                                               ascent_options={"eta": 0.05}, **kw),
        lambda params, *a, **kw: samkit.rst_sam(params, *a, p=0.5, seed=3, **kw),
        lambda params, *a, **kw: registry.optimizer_info("toysign").wrapper(params, *a, rho=0.2,
                                                                            **kw),
    ],
    ids=["SharpnessAware-asam", "ASAM-normalize", "ae_sam-asam", "rst_sam", "toysign"],
)
def test_the_davda54_form_equals_the_wrapper_form_step_for_step(build):
    m1, m2 = mlp(), mlp()
    a = build(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, max_grad_norm=5.0)
    b = build(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), max_grad_norm=5.0)
    assert type(a) is type(b) and groups_without_params(a) == groups_without_params(b)
    for p, q in zip(_steps(a, m1), _steps(b, m2), strict=True):
        assert torch.equal(p, q)


def test_the_davda54_adapter():
    w = [torch.nn.Parameter(torch.ones(2))]
    (base, *tail), own = davda54.split_call((w, torch.optim.SGD, "x"), {"lr": 0.3, "rho": 1},
                                            {"rho"})  # fmt: skip
    assert isinstance(base, torch.optim.SGD) and base.defaults["lr"] == 0.3
    assert tail == ["x"] and own == {"rho": 1}
    args, kw = davda54.split_call((w,), {"rho": 1}, {"rho"})  # not davda54's form: unchanged
    assert args == (w,) and kw == {"rho": 1}
    with pytest.raises(ValueError, match="Invalid base_optimizer_class"):
        davda54.split_call((w, int), {}, ())
    with pytest.raises(ValueError, match="samkit has a class for adaptive SAM"):
        davda54.split_call((w, torch.optim.SGD), {"lr": 0.1, "adaptive": True}, ())


# ------------------------------------------------------------------- the runner's routing


def test_the_trainer_routes_its_fields_by_declaration():
    from samkit.config import TrainConfig
    from samkit.train.build import optimizer_kwargs

    kw, notes = optimizer_kwargs(TrainConfig(optimizer="gsam", rho=0.1, eta=0.02))
    assert "rho" not in kw and "eta" not in kw
    assert notes == ["gsam takes no rho; rho=0.1 is not used", "gsam takes no eta; eta=0.02 is "
                     "not used"]  # fmt: skip
    kw, notes = optimizer_kwargs(TrainConfig(optimizer="gsam", eta=0.02,
                                             optimizer_kwargs={"ascent": "asam"}))
    assert kw["eta"] == 0.02 and notes == []
    kw, _ = optimizer_kwargs(TrainConfig(optimizer="asam", base="adam", rho=0.3))
    assert "momentum" not in kw and kw["rho"] == 0.3


def test_compare_sends_declared_keys_to_optimizer_kwargs():
    from samkit.experiments.compare import _optimizer_keys

    assert _optimizer_keys("gsam", ["ascent=asam", "p=inf", "alpha=0.2", "rho=0.1"]) == [
        "optimizer_kwargs.ascent=asam", "optimizer_kwargs.p=inf", "optimizer_kwargs.alpha=0.2",
        "rho=0.1"]  # fmt: skip
    assert _optimizer_keys("saf", ["lam=0.1"]) == ["optimizer_kwargs.lam=0.1"]
    assert _optimizer_keys("sgd", ["nesterov=true"]) == ["optimizer_kwargs.nesterov=true"]


def test_plain_entries_unchanged():
    m = mlp()
    opt = samkit.create_optimizer("adamw", m, lr=1e-3, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()
