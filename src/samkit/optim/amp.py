r"""The one adapter between samkit's optimizers and ``torch.amp.GradScaler``.

A wrapping optimizer steps its *base* optimizer through the scaler (``scaler.step(base)``), while
the user may call ``scaler.unscale_`` on the wrapper or on the base, and a sharpness-aware step
has two backward passes per ``scaler.update()``. The public GradScaler API cannot express that,
so samkit reads and writes three private pieces of it:

* ``scaler._per_optimizer_states[id(optimizer)]``: ``{"stage": OptState, "found_inf_per_device":
  {device: Tensor}}`` (what ``unscale_`` recorded; ``step`` reads it);
* ``torch.amp.grad_scaler.OptState`` (``READY``, ``UNSCALED``, ``STEPPED``);
* ``scaler._scale``: the current scale, a 0-d float32 tensor (read without a host sync).

This module is the only place in samkit that touches them. :func:`check_grad_scaler_internals`
verifies that the installed torch still has them (the test suite calls it, so a torch release that
changes them fails loudly there, not as a wrong step in training).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_grad_scaler_internals",
    "clear_unscale",
    "enabled",
    "found_inf",
    "inv_scale",
    "record_non_finite",
    "unscale_once",
    "unscaled_by_user",
]


def _opt_state():
    from torch.amp.grad_scaler import OptState

    return OptState


def check_grad_scaler_internals() -> None:
    """Raise ``RuntimeError`` naming what changed when the installed torch's GradScaler no longer
    has the private pieces this module uses (see the module docstring)."""
    problems = []
    try:
        state = _opt_state()
        missing = [n for n in ("READY", "UNSCALED", "STEPPED") if not hasattr(state, n)]
        if missing:
            problems.append(f"OptState lacks {missing}")
    except ImportError as e:  # pragma: no cover - only with a changed torch
        problems.append(f"torch.amp.grad_scaler.OptState: {e}")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:
        problems.append("GradScaler has no _per_optimizer_states")
    else:
        fresh = states[12345]  # a defaultdict: a fresh record for any optimizer id
        if set(fresh) != {"stage", "found_inf_per_device"}:
            problems.append(f"a per-optimizer record has keys {sorted(fresh)}")
        elif not problems and fresh["stage"] is not _opt_state().READY:
            problems.append(f"a fresh record's stage is {fresh['stage']!r}, not READY")
    if not hasattr(scaler, "_scale"):
        problems.append("GradScaler has no _scale")
    else:
        scaler.scale(torch.ones(()))
        if not isinstance(scaler._scale, Tensor) or scaler._scale.dim() != 0:
            problems.append(f"GradScaler._scale is {type(scaler._scale).__name__}, not 0-d")
    if problems:
        raise RuntimeError(
            f"torch {torch.__version__} changed GradScaler internals that samkit.optim.amp "
            f"relies on: {'; '.join(problems)}. Update samkit/optim/amp.py"
        )


def enabled(scaler: torch.amp.GradScaler | None) -> bool:
    """Is ``scaler`` given and enabled?"""
    return scaler is not None and scaler.is_enabled()


def _stage(scaler, optimizer) -> Any:
    """The scaler's stage for ``optimizer`` (READY, UNSCALED, STEPPED), or None."""
    states = scaler._per_optimizer_states
    if id(optimizer) not in states:
        return None
    return states[id(optimizer)]["stage"]


def unscaled_by_user(scaler, *optimizers) -> bool:
    """Did the user call ``scaler.unscale_`` on any of ``optimizers`` since the last
    ``scaler.update()`` (their gradients are then unscaled)?"""
    return any(_stage(scaler, opt) is _opt_state().UNSCALED for opt in optimizers)


def clear_unscale(scaler, *optimizers) -> None:
    """Forget an ``unscale_`` of ``optimizers`` (before a second backward pass of the same step,
    which may then be unscaled again)."""
    states = scaler._per_optimizer_states
    for opt in optimizers:
        if id(opt) in states:
            states[id(opt)] = {"stage": _opt_state().READY, "found_inf_per_device": {}}


def unscale_once(scaler, wrapper, base) -> None:
    """Unscale ``base``'s gradients once, through the scaler's own record for ``base`` (so
    ``scaler.step(base)`` will not unscale them again), unless ``scaler.unscale_`` was already
    called on ``wrapper`` (its record then becomes the base's) or on ``base``."""
    state = _opt_state()
    states = scaler._per_optimizer_states
    record = states[id(base)]
    if _stage(scaler, wrapper) is state.UNSCALED:
        if record["stage"] is state.READY:  # update() reads both; counting twice is fine
            record["stage"] = state.UNSCALED
            record["found_inf_per_device"] = dict(states[id(wrapper)]["found_inf_per_device"])
    elif record["stage"] is state.READY:
        scaler.unscale_(base)


def record_non_finite(scaler, base, finite: Tensor | None) -> None:
    """Add a pass's finite flag (0-d bool; None: nothing to add) to the scaler's found-inf record
    of ``base``, so ``scaler.step(base)`` skips the step and ``update()`` lowers the scale (no
    host sync, no gradient touched)."""
    if finite is None:
        return
    found = scaler._per_optimizer_states[id(base)]["found_inf_per_device"]
    flag = (~finite).to(torch.float32)
    device = flag.device
    # a maximum, not a sum: fused optimizers (Adam(fused=True)) skip only on found_inf == 1
    found[device] = torch.maximum(found[device], flag) if device in found else flag


def found_inf(scaler, base) -> bool:
    """Will ``scaler.step(base)`` skip the step (inf/NaN recorded for ``base``)? The same test
    as ``GradScaler.step`` (one host sync per device)."""
    record = scaler._per_optimizer_states[id(base)]["found_inf_per_device"]
    return bool(sum(v.item() for v in record.values()))


def inv_scale(scaler) -> Tensor:
    """``1 / scale`` as a 0-d float32 tensor, computed in float64 as ``GradScaler.unscale_`` does
    (no host sync)."""
    return scaler._scale.double().reciprocal().float()
