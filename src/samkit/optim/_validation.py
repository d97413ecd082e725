"""Argument checks: a ValueError that names the value and what is allowed.

One home for samkit's checks of numbers, integers, choices and seeds (the optimizers, the
config, the curvature functions and sharpness use these). The wrappers (SAM family, MSAM,
ESAM, SAF/MESA) and ``create_optimizer`` check their own arguments *and* the optimizer they
wrap at construction, so that a bad value fails there, with its name, rather than as NaN
weights or a TypeError inside ``step``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import torch

# Hyperparameters of torch.optim's optimizers (and ours) that are numbers; each must be finite
# where a group holds it (None and tensors of one element are allowed, as torch allows them).
_NUMERIC_KEYS = ("lr", "momentum", "dampening", "weight_decay", "eps", "alpha", "lr_decay",
                 "initial_accumulator_value", "rho", "eta", "max_grad_norm")
_SEED_LIMIT = 1 << 63  # torch.Generator.manual_seed takes 64-bit seeds; derive_seed makes 63-bit


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut at ``limit`` characters (a value from a file or a flag may be huge)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 20
    r.maxlevel = 4
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool, a string or a complex), or a
    real tensor of one element; else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_non_negative(name: str, value) -> None:
    """``value`` must be a finite number >= 0 (a radius, a normalization offset)."""
    number = _real(value)
    if number is None or not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (allowed: a finite number >= 0"
                         f"{_not_a_number(value)})")


def _not_a_number(value: Any) -> str:
    if _real(value) is None:
        return f"; got a {type(value).__name__}"
    return ""


def check_choice(name: str, value, allowed: tuple | list, show=repr) -> None:
    """``value`` must be one of ``allowed`` (listed in the message with ``show``)."""
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {short_repr(value)} (allowed: "
                         f"{', '.join(map(show, allowed))})")


def check_int(name: str, value, low: int = 1, high: int | None = None,
              none: bool = False) -> int | None:
    """``value`` must be an integer (not a bool; numpy integers too) with ``low <= value``
    (``<= high`` when given), or None when ``none``; returns it as an ``int``."""
    if none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
        value >= low and (high is None or value <= high)
    ):
        allowed = ("None or " if none else "") + f"an integer >= {low}"
        allowed += f" and <= {high}" if high is not None else ""
        raise ValueError(f"Invalid {name}: {short_repr(value)} (allowed: {allowed})")
    return int(value)


def check_in_range(name: str, value: float, low: float, high: float) -> None:
    """``low <= value < high`` (a probability, a fraction)."""
    if not low <= value < high:
        raise ValueError(f"Invalid {name}: {value} (allowed: {low} <= {name} < {high})")


def check_positive(name: str, value) -> None:
    """``value`` must be a finite number > 0 (a clipping norm)."""
    number = _real(value)
    if number is None or not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (allowed: a finite number > 0, "
                         "or None)")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (allowed: True, False)")


def check_seed(name: str, value) -> int:
    """``value`` must be an integer in [0, 2**63) (what every generator samkit seeds takes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
        0 <= value < _SEED_LIMIT
    ):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (allowed: an integer, "
                         f"0 <= {name} < 2**63)")
    return int(value)


def check_finite_hyperparameter(owner: str, name: str, value: Any) -> None:
    """A numeric hyperparameter (``lr``, ``betas``, ...) must be a finite real number, or None."""
    if value is None:
        return
    if name == "betas" or isinstance(value, (tuple, list)):
        if not isinstance(value, (tuple, list)) or any(
            _real(v) is None or not math.isfinite(_real(v)) for v in value
        ):
            raise ValueError(f"Invalid {name} for {owner}: {short_repr(value)} (allowed: a "
                             "tuple of finite numbers)")
        return
    number = _real(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"Invalid {name} for {owner}: {short_repr(value)} (allowed: a finite "
                         f"number{_not_a_number(value)})")


def check_optimizer(optimizer: torch.optim.Optimizer, owner: str) -> None:
    """Every parameter of ``optimizer`` is a real floating-point tensor and every numeric
    hyperparameter of its groups (``lr``, ``momentum``, ``betas``, ...) is finite.

    ``owner`` (the class that checks) names the error's source. torch.optim itself accepts
    ``lr=nan`` (it only refuses ``lr < 0``), which turns every weight into NaN at the first step.
    """
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"Invalid parameter in group {i} of {owner}: a "
                                f"{type(p).__name__} (allowed: a torch.Tensor)")
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(
                    f"Invalid parameter in group {i} of {owner}: a {p.dtype} tensor of shape "
                    f"{tuple(p.shape)} (allowed: real floating-point parameters; {owner} does "
                    "not support complex or integer ones)")
        for key in (*_NUMERIC_KEYS, "betas"):
            if key in group:
                check_finite_hyperparameter(owner, key, group[key])


def check_keyword_types(owner: str, cls: Any, kwargs: dict[str, Any]) -> None:
    """The keyword arguments of ``cls`` whose default is a bool must be bools (``nesterov``,
    ``amsgrad``, ``maximize``): a string such as ``"maybe"`` is truthy and would switch them on;
    those whose default is a number must be finite numbers."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            continue
        if isinstance(param.default, bool):
            check_bool(key, value)
        elif key in (*_NUMERIC_KEYS, "betas") or (
            isinstance(param.default, (int, float)) and not isinstance(param.default, bool)
        ):
            check_finite_hyperparameter(owner, key, value)
