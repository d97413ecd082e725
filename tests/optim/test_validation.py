"""Every optimizer checks types and finiteness at construction (issue 26, finding 9): a string
radius, complex or integer parameters, a NaN learning rate and a bool written as "maybe" fail
there, by name, never at the first step or as NaN weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import samkit
from samkit.optim import create_optimizer, list_optimizers

WRAPPERS = [samkit.SAM, samkit.ASAM, samkit.USAM, samkit.MSAM, samkit.ESAM, samkit.GSAM,
            samkit.LookSAM, samkit.FriendlySAM, samkit.FisherSAM]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("rho", ["0.1", True, None, float("nan"), float("inf"), -0.1, 1j])
@pytest.mark.parametrize("cls", [samkit.SAM, samkit.ASAM, samkit.MSAM, samkit.ESAM])
def test_a_radius_that_is_not_a_finite_number_fails_at_construction(cls, rho):
    base = torch.optim.SGD(model().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid rho"):
        cls(base, rho=rho)


@pytest.mark.parametrize("cls", WRAPPERS + [samkit.SAF, samkit.MESA])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_complex_or_integer_parameters_fail_at_construction(cls, dtype):
    p = torch.zeros(3, dtype=dtype, requires_grad=dtype.is_complex)
    base = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match=f"Invalid parameter in group 0 of {cls.__name__}: a "
                                        f"{dtype}"):
        cls(base)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), torch.tensor(float("nan"))])
@pytest.mark.parametrize("cls", WRAPPERS + [samkit.SAF, samkit.MESA])
def test_a_base_optimizer_with_a_non_finite_lr_fails_at_construction(cls, lr):
    base = torch.optim.SGD(model().parameters(), lr=0.1)
    base.param_groups[0]["lr"] = lr  # torch.optim only refuses lr < 0
    with pytest.raises(ValueError, match=f"Invalid lr for {cls.__name__}"):
        cls(base)


@pytest.mark.parametrize("name", list_optimizers())
def test_create_optimizer_refuses_a_nan_lr(name):
    with pytest.raises(ValueError, match=r"Invalid lr for .*: nan \(allowed: a finite number"):
        create_optimizer(name, model(), lr=float("nan"))


def test_torch_sgd_alone_turns_lr_nan_into_nan_weights():
    """What the check prevents: torch's SGD takes lr=nan and every weight becomes NaN."""
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=float("nan"))
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert all(torch.isnan(p).all() for p in m.parameters())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"momentum": 0.9, "nesterov": "maybe"}, r"Invalid nesterov: 'maybe' \(allowed: True, False\)"),
    ({"momentum": float("nan")}, "Invalid momentum for sgd"),
    ({"momentum": "0.9"}, "Invalid momentum for sgd"),
    ({"weight_decay": float("inf")}, "Invalid weight_decay"),
])
def test_create_optimizer_checks_the_base_optimizers_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_optimizer("sgd", model(), lr=0.1, **kwargs)
    with pytest.raises(ValueError, match=match.replace("for sgd", "for sam")):
        create_optimizer("sam", model(), lr=0.1, **kwargs)


def test_adam_betas_and_amsgrad_are_checked():
    with pytest.raises(ValueError, match=r"Invalid betas for adam: \(0.9, inf\)"):
        create_optimizer("adam", model(), lr=0.1, betas=(0.9, math.inf))
    with pytest.raises(ValueError, match="Invalid amsgrad"):
        create_optimizer("adamw", model(), lr=0.1, amsgrad="yes")


def test_the_davda54_form_checks_the_base_arguments():
    with pytest.raises(ValueError, match="Invalid nesterov: 'maybe'"):
        samkit.SAM(model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nesterov="maybe")
    with pytest.raises(ValueError, match="Invalid lr for SGD: nan"):
        samkit.SAM(model().parameters(), torch.optim.SGD, lr=float("nan"))


@pytest.mark.parametrize(("factory", "match"), [
    (lambda b: samkit.ESAM(b, seed=10**30), r"Invalid seed: 10+ \(allowed: an integer"),
    (lambda b: samkit.ESAM(b, seed="1"), "Invalid seed"),
    (lambda b: samkit.ESAM(b, beta="0.5"), "Invalid beta"),
    (lambda b: samkit.SAM(b, max_grad_norm="1"), "Invalid max_grad_norm"),
    (lambda b: samkit.SAF(b, lam="0.3"), "Invalid lam"),
    (lambda b: samkit.RandomSchedule(seed=-1), "Invalid seed"),
])
def test_other_arguments_are_checked_by_type(factory, match):
    with pytest.raises(ValueError, match=match):
        factory(torch.optim.SGD(model().parameters(), lr=0.1))


def test_valid_arguments_still_build_and_step():
    m = model()
    opt = create_optimizer("sam", m, lr=torch.tensor(0.1), momentum=0.9, nesterov=True,
                           rho=0.05)
    x = torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=torch.tensor(0.05))
    samkit.ESAM(torch.optim.SGD(m.parameters(), lr=0.1), seed=2**63 - 1)


def test_short_repr_cuts_long_values():
    from samkit.optim._validation import short_repr

    assert "..." in short_repr("x" * 1000) and len(short_repr("x" * 1000)) <= 200
    nested = [[[[list(range(10**4))]]]] * 10**3
    assert len(short_repr(nested)) <= 200
    assert short_repr(0.5) == "0.5"


def test_the_shared_integer_and_range_checks():
    import numpy as np

    from samkit.optim._validation import check_choice, check_in_range, check_int

    assert check_int("k", np.int64(3), 1, 5) == 3 and check_int("m", None, 1, none=True) is None
    for bad, match in [(True, r"Invalid k: True \(allowed: an integer >= 1 and <= 5\)"),
                       (0, "an integer >= 1"), (6, "<= 5"), (2.0, "an integer")]:
        with pytest.raises(ValueError, match=match):
            check_int("k", bad, 1, 5)
    with pytest.raises(ValueError, match=r"Invalid m: 0 \(allowed: None or an integer >= 1\)"):
        check_int("m", 0, 1, none=True)
    with pytest.raises(ValueError, match=r"Invalid p: 0.5 \(allowed: 0 <= p < 0.5\)"):
        check_in_range("p", 0.5, 0, 0.5)
    with pytest.raises(ValueError, match=r"\(allowed: a, b\)"):
        check_choice("x", "c", ("a", "b"), show=str)
