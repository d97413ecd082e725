"""A new method is small on the one base (issue 21): a one-pass method and a loss-term method,
each written here in under 40 lines, pass the shared property tests (through the step engine, the
way the trainer steps; run over every registry optimizer on the one base too) and train in the
Trainer on digits."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import samkit
from samkit.optim.lossterm import LossTermOptimizer
from samkit.optim.onepass import OnePassOptimizer
from samkit.step import StepEngine

F = nn.functional


# ---------------------------------------------------------------- the two methods (< 40 lines)


class LastGradSAM(OnePassOptimizer):
    r"""One pass at :math:`w + \rho g_{t-1}/\|g_{t-1}\|` (the last step's gradient)."""

    def __init__(self, base_optimizer, rho: float = 0.05, *, max_grad_norm=None,
                 skip_non_finite: bool = False) -> None:
        samkit.optim._validation.check_non_negative("rho", rho)
        super().__init__(base_optimizer, dict(rho=rho), max_grad_norm, skip_non_finite)

    def _direction(self, p):
        return self.state[p].get("last_grad")

    def _before_base_step_(self, buckets) -> None:
        for b in buckets:
            for p, g in zip(b.params, b.grads, strict=True):
                self._state_tensor(p, "last_grad").copy_(g)


class ConfidencePenalty(LossTermOptimizer):
    r"""Adds :math:`\beta\, \frac1n \sum_i \sum_c p_{ic} \log p_{ic}` (Pereyra et al. 2017)."""

    def __init__(self, base_optimizer, beta: float = 0.1, *, max_grad_norm=None,
                 skip_non_finite: bool = False) -> None:
        samkit.optim._validation.check_non_negative("beta", beta)
        super().__init__(base_optimizer, dict(cp_beta=beta), max_grad_norm, skip_non_finite)

    def loss_term(self, output, batch):
        log_p = F.log_softmax(output.float(), dim=-1)
        beta = self.param_groups[0]["cp_beta"]
        return self._counted(beta * (log_p.exp() * log_p).sum(-1).mean())


NEW = {"lastgradsam": LastGradSAM, "confidencepenalty": ConfidencePenalty}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The two methods in the registry for the tests (removed afterwards)."""
    from samkit.optim import registry

    for name, cls in NEW.items():
        monkeypatch.setitem(registry._REGISTRY, name,
                            registry.OptimizerEntry(name, cls.__doc__, "sgd", cls))


# ---------------------------------------------------------------- the shared properties


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(n=24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                               generator=g)


def train(opt, model, steps, x=None, y=None):
    """``steps`` steps through the step engine, with what any optimizer may ask for (example
    indices, an epoch where SAF's and MESA's terms are on, the training set's size)."""
    if x is None:
        x, y = data()
    engine = StepEngine(opt, model, F.cross_entropy)
    n = len(y)
    return [float(engine.step(x, y, indices=torch.arange(n), epoch=9, num_examples=n))
            for _ in range(steps)]


def wrapping(names):
    """The registry optimizers among ``names`` that stand on the one base."""
    model = mlp()
    return [n for n in names
            if samkit.optim.kind_of(samkit.create_optimizer(n, model, lr=0.1)).form.wraps]


ALL = sorted(NEW) + wrapping(samkit.list_optimizers())


@pytest.mark.parametrize("name", sorted(NEW))
def test_a_new_method_declares_its_kind(name):
    opt = samkit.create_optimizer(name, mlp(), lr=0.1)
    form = samkit.optim.kind_of(opt).form
    assert form is {"lastgradsam": samkit.optim.StepForm.ONE_PASS,
                    "confidencepenalty": samkit.optim.StepForm.LOSS_TERM}[name]
    assert opt.step_rewrites() is None or form is samkit.optim.StepForm.ONE_PASS
    assert samkit.stability.edge_for(opt, 1.0) is None and opt.kind.note  # says why
    assert samkit.stability.base_edge_for(opt) == pytest.approx(2 / 0.1)


@pytest.mark.parametrize("name", ALL)
def test_a_new_method_decreases_the_loss(name):
    model = mlp()
    # bSAM's base averages its momentum ((1 - beta1) g): the step of SGD's lr 0.2 with an
    # undamped momentum 0.9 needs lr 0.2 / (1 - 0.9) there
    lr = 2.0 if samkit.optim.registry.optimizer_info(name).base == "bsam" else 0.2
    losses = train(samkit.create_optimizer(name, model, lr=lr, momentum=0.9), model, 30)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ALL)
def test_a_new_method_resumes_bit_for_bit_from_its_state_dict(name):
    straight_model = mlp()
    straight = train(samkit.create_optimizer(name, straight_model, lr=0.1, momentum=0.9),
                     straight_model, 8)
    model = mlp()
    opt = samkit.create_optimizer(name, model, lr=0.1, momentum=0.9)
    first = train(opt, model, 4)
    fresh = mlp(seed=5)
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    again = samkit.create_optimizer(name, fresh, lr=0.1, momentum=0.9)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert first + train(again, fresh, 4) == straight
    clone = pickle.loads(pickle.dumps(opt))  # and pickles with its state
    assert clone.param_groups is clone.base_optimizer.param_groups


@pytest.mark.parametrize("name", ALL)
def test_a_new_method_skips_grad_none_and_non_finite_steps(name):
    model = mlp()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = samkit.create_optimizer(name, [*model.parameters(), unused], lr=0.1,
                                  skip_non_finite=True, max_grad_norm=1.0)
    train(opt, model, 3)
    assert torch.equal(unused.detach(), torch.ones(3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    train(opt, model, 1, x * math.inf, y)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", sorted(NEW))
def test_a_new_method_refuses_bad_arguments(name):
    with pytest.raises(ValueError, match="Invalid"):
        NEW[name](torch.optim.SGD(mlp().parameters(), lr=0.1), -1.0)
    with pytest.raises(ValueError, match="already sharpness-aware"):
        NEW[name](samkit.SAM(torch.optim.SGD(mlp().parameters(), lr=0.1)))
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        NEW[name](torch.optim.SGD(mlp().parameters(), lr=0.1), max_grad_norm=0.0)


def test_the_one_pass_method_matches_its_float64_reference():
    model, ref = mlp(), mlp()
    x, y = data()
    train_opt = LastGradSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2)
    train(train_opt, model, 3)
    params, last = list(ref.parameters()), None
    for _ in range(3):
        eps = [torch.zeros_like(p) for p in params]
        if last is not None:
            norm = torch.sqrt(sum((g * g).sum() for g in last))
            eps = [0.2 * g / norm for g in last]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
        with torch.no_grad():
            for p, e, g in zip(params, eps, grads, strict=True):
                p.sub_(e).sub_(0.1 * g)
        last = grads
    with train_opt.at_weights():  # a one-pass method holds w + eps between steps
        for p, q in zip(model.parameters(), params, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_the_loss_term_method_matches_its_float64_reference():
    model, ref = mlp(), mlp()
    x, y = data()
    train(ConfidencePenalty(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.3), model, 2)
    for _ in range(2):
        out = ref(x)
        p = F.softmax(out, -1)
        loss = F.cross_entropy(out, y) + 0.3 * (p * p.log()).sum(-1).mean()
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for w, g in zip(ref.parameters(), grads, strict=True):
                w.sub_(0.1 * g)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)  # the term in float32


@pytest.mark.parametrize("name", sorted(NEW))
def test_a_new_method_trains_in_the_trainer(name, tmp_path):
    from samkit.train import TrainConfig, Trainer

    cfg = TrainConfig(dataset="digits", subset=200, model="mlp",
                      model_kwargs={"width": 16, "depth": 1}, optimizer=name, lr=0.1,
                      batch_size=50, epochs=2, out_dir=str(tmp_path), name=name,
                      checkpoint=False)
    trainer = Trainer(cfg, verbose=0)
    result = trainer.fit()
    assert result["step"] == 8 and math.isfinite(result["train_loss"])
    opt = trainer.optimizer
    assert type(opt) is NEW[name]
    if name == "lastgradsam":
        assert opt.passes == 8  # one pass per step
    else:
        assert opt.last_term is not None  # the trainer's closure added the term
