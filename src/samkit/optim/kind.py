r"""The typed kind of an optimizer: what a caller needs to know, declared, never found by class.

:func:`kind_of` answers for any optimizer: a samkit optimizer builds its
:class:`OptimizerKind` from its declarations (:attr:`~samkit.optim.wrapper.WrappingOptimizer.
step_form`, its ascent record, the hooks that rewrite its descent, its step schedule); a plain
``torch.optim`` optimizer is described from its class and param groups. The step engine
(:mod:`samkit.step`), the edges (:func:`samkit.stability.edge_for`), the edge tracker, the
effective Hessian and the integrations read it.

* :class:`StepForm`: how a step runs its passes (plain, two-pass, one-pass, loss-term,
  example-selecting);
* :class:`BaseKind`: the base optimizer's update rule (:class:`BaseRule`: GD, heavy ball,
  Nesterov, Adam, unknown), its ``lr`` and β, and why it has no edge (if it has none);
* the ascent: the :class:`samkit.optim.ascents.Ascent` record (its ε, closed-form edge and
  effective-Hessian form), or None;
* :class:`DescentKind`: whether the step descends with the gradient of its (last) pass, or
  rewrites it (GSAM, LookSAM), skips passes (a schedule) or perturbs from its state (MSAM);
* :class:`EdgeRule`: which edge applies (the base optimizer's, the ascent's closed form, none),
  with the reason when none does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "BaseKind",
    "BaseRule",
    "DeclaresKind",
    "DescentKind",
    "EdgeRule",
    "OptimizerKind",
    "StepForm",
    "base_kind",
    "form_of",
    "kind_of",
]


class StepForm(str, enum.Enum):
    """How one step of an optimizer runs its forward-backward passes."""

    PLAIN = "plain"  # a torch optimizer: one pass at w
    TWO_PASS = "two-pass"  # a pass at w, the ascent, a pass at w + eps (SAM family)
    ONE_PASS = "one-pass"  # one pass at w + eps, eps from the optimizer's state (MSAM)
    LOSS_TERM = "loss-term"  # one pass at w, a term added to its loss (SAF, MESA)
    EXAMPLE_SELECTING = "example-selecting"  # two-pass, the second on chosen examples (ESAM)

    @property
    def wraps(self) -> bool:
        """A samkit optimizer over a base optimizer: ``step(closure, scaler=...)`` takes the
        scaler itself (the base step goes through ``scaler.step(base)``)."""
        return self is not StepForm.PLAIN

    @property
    def has_extra_pass(self) -> bool:
        """The step's first pass (at ``w``) is followed by a pass at ``w + ε``: under DDP with
        ``perturbation="local"`` the first pass need not all-reduce."""
        return self in (StepForm.TWO_PASS, StepForm.EXAMPLE_SELECTING)

    @property
    def perturbs(self) -> bool:
        """Some pass of a step runs at perturbed weights."""
        return self in (StepForm.TWO_PASS, StepForm.ONE_PASS, StepForm.EXAMPLE_SELECTING)


class BaseRule(str, enum.Enum):
    """The base optimizer's update rule, as far as the edges need it."""

    GD = "gd"
    MOMENTUM = "momentum"
    NESTEROV = "nesterov"
    ADAM = "adam"
    UNKNOWN = "unknown"


class EdgeRule(str, enum.Enum):
    """Which stability edge applies to the optimizer."""

    BASE = "base"  # the base optimizer's own edge (a plain optimizer)
    CLOSED_FORM = "closed-form"  # the ascent's closed form at the base's effective lr
    NONE = "none"  # none applies (OptimizerKind.note says why)


@dataclass(frozen=True)
class BaseKind:
    """The base optimizer (the one that takes the descent step).

    Attributes:
        rule: its update rule.
        name: its class name.
        lr: the learning rate of the first param group.
        beta: the momentum (heavy ball, Nesterov) or Adam's β₁; 0 for GD.
        no_edge: why it has no edge ('' when :func:`samkit.stability.base_edge_for` applies):
            per-group learning rates, ``lr <= 0``, dampening, an optimizer without an edge.
    """

    rule: BaseRule
    name: str
    lr: float
    beta: float = 0.0
    no_edge: str = ""


@dataclass(frozen=True)
class DescentKind:
    """How the step direction relates to the gradient of the step's (last) pass.

    Attributes:
        rewrites: the hooks that rewrite it (GSAM's ``_descent_``, LookSAM's ``_two_pass_`` and
            ``_one_pass_descent_``); empty for "descend with that gradient".
        schedule: a step schedule decides which steps take two passes (AE-SAM, RST).
        declared: a reason the optimizer declares itself (MSAM: it perturbs along its momentum
            before its one pass), or ''.
    """

    rewrites: tuple[str, ...] = ()
    schedule: bool = False
    declared: str = ""

    @property
    def note(self) -> str:
        """Why the step is more than "descend with the gradient at ``w + ε``" ('' if it is not);
        what ``step_rewrites()`` returns."""
        if self.declared:
            return self.declared
        if self.rewrites:
            return f"rewrites its steps ({', '.join(self.rewrites)})"
        return "has a step schedule" if self.schedule else ""


@dataclass(frozen=True)
class OptimizerKind:
    """What an optimizer is, for the step engine and the edges.

    Attributes:
        name: the class name (for messages).
        form: how a step runs its passes.
        base: the base optimizer (the optimizer itself when it is plain).
        ascent: the :class:`~samkit.optim.ascents.Ascent` record ε comes from, or None.
        rho: ρ of the first param group (None for a plain optimizer).
        descent: how the step direction is formed.
        edge: which edge applies.
        note: why no edge applies ('' when one does).
    """

    name: str
    form: StepForm
    base: BaseKind
    ascent: Any = None
    rho: float | None = None
    descent: DescentKind = DescentKind()
    edge: EdgeRule = EdgeRule.BASE
    note: str = ""

    @property
    def label(self) -> str:
        """A short name of the edge that applies: ``"gd"``, ``"momentum"``, ``"adam"``,
        ``"sam+gd"``, ...; ``"none"``."""
        if self.edge is EdgeRule.NONE:
            return "none"
        if self.edge is EdgeRule.CLOSED_FORM:
            return f"{self.ascent.name}+{self.base.rule.value}"
        return self.base.rule.value


@runtime_checkable
class DeclaresKind(Protocol):
    """An optimizer that declares its kind (every samkit optimizer)."""

    @property
    def kind(self) -> OptimizerKind: ...


def base_kind(optimizer: torch.optim.Optimizer) -> BaseKind:
    """The :class:`BaseKind` of a plain torch optimizer (its first group's hyperparameters)."""
    groups = optimizer.param_groups
    group = groups[0]
    lr = float(group["lr"])
    lrs = {float(g["lr"]) for g in groups}
    name = type(optimizer).__name__
    rule, beta, no_edge = BaseRule.UNKNOWN, 0.0, ""
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if beta == 0.0:
            rule = BaseRule.GD
        else:
            rule = BaseRule.NESTEROV if group.get("nesterov", False) else BaseRule.MOMENTUM
            if float(group.get("dampening", 0.0)) != 0.0:
                no_edge = "SGD with dampening != 0 has no edge here"
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        rule, beta = BaseRule.ADAM, float(group["betas"][0])
    else:
        no_edge = f"no edge for {name}"
    if len(lrs) > 1:
        no_edge = f"param groups have different learning rates {sorted(lrs)}"
    elif not lr > 0:
        no_edge = f"lr is {lr} (a schedule's end): no edge"
    return BaseKind(rule, name, lr, beta, no_edge)


def form_of(optimizer: Any) -> StepForm:
    """How ``optimizer``'s steps run their passes: its declared ``step_form`` (cheap: read once
    per pass by the step engine), :attr:`StepForm.PLAIN` for a torch optimizer."""
    form = getattr(optimizer, "step_form", None)
    return form if isinstance(form, StepForm) else StepForm.PLAIN


def kind_of(optimizer: Any) -> OptimizerKind:
    """The :class:`OptimizerKind` of ``optimizer``: its own declaration (``optimizer.kind``) for
    a samkit optimizer, else that of a plain torch optimizer."""
    if isinstance(optimizer, DeclaresKind):
        kind = optimizer.kind
        if isinstance(kind, OptimizerKind):
            return kind
    base = base_kind(optimizer)
    edge = EdgeRule.NONE if base.no_edge else EdgeRule.BASE
    return OptimizerKind(type(optimizer).__name__, StepForm.PLAIN, base, edge=edge,
                         note=base.no_edge)


def wrapper_kind(optimizer: Any) -> OptimizerKind:
    """The kind of a samkit wrapping optimizer, from what it declares: ``step_form``,
    ``ascent``, ``descent_rewrites()``, ``schedule``, ``_step_note``, ``edge_note()``."""
    name = type(optimizer).__name__
    form = optimizer.step_form
    base = base_kind(optimizer.base_optimizer)
    ascent = optimizer.ascent
    descent = DescentKind(tuple(optimizer.descent_rewrites()),
                          getattr(optimizer, "schedule", None) is not None,
                          getattr(optimizer, "_step_note", ""))
    group = optimizer.param_groups[0]
    rho = float(group["rho"]) if "rho" in group else None
    # why no closed-form edge: the optimizer's own reason first, then the base optimizer's
    note = optimizer.edge_note()
    if not note:
        if ascent is None:
            note = f"no closed-form edge for {name} (it declares no ascent)"
        elif descent.rewrites or descent.declared:
            what = ", ".join(descent.rewrites) or descent.note
            note = f"no closed-form edge for {name}: its descent rewrites the step ({what})"
        elif ascent.edge is None:
            note = f"{ascent.edge_note or 'no closed-form edge'} ({name})"
    note = note or base.no_edge
    if not note and base.rule is BaseRule.ADAM:
        note = "no closed-form edge for SAM with an Adam base"
    if not note and base.rule is BaseRule.UNKNOWN:  # pragma: no cover - no_edge says so
        note = f"no edge for {base.name}"
    edge = EdgeRule.NONE if note else EdgeRule.CLOSED_FORM
    return OptimizerKind(name, form, base, ascent, rho, descent, edge, note)
