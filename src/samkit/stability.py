r"""Stability thresholds ("edges") of the top Hessian eigenvalue for common optimizers.

On a quadratic with top Hessian eigenvalue λ, an optimizer is stable along the top eigenvector
while λ stays below its edge; on neural networks, training drives λ up to the edge and holds it
there (the *edge of stability*, Cohen et al. 2021). All functions accept Python numbers or
tensors (broadcast together; the result is a float64 tensor when any input is a tensor) and
raise ``ValueError`` for ``lr <= 0``, ``rho < 0``, ``grad_norm < 0`` or a β outside [0, 1).

References:
    J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar. Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability. ICLR 2021.
    J. Cohen et al. Adaptive Gradient Methods at the Edge of Stability. arXiv:2207.14484, 2022.
    P. M. Long, P. L. Bartlett. Sharpness-Aware Minimization and the Edge of Stability.
    arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Number = float | int | Tensor


def _check(name: str, value: Number, low: float, low_inclusive: bool, high: float = math.inf):
    t = torch.as_tensor(value, dtype=torch.float64)
    ok = (t >= low) if low_inclusive else (t > low)
    ok &= t < high
    if t.isnan().any() or not bool(ok.all()):
        sign = ">=" if low_inclusive else ">"
        allowed = f"{sign} {low:g}" + ("" if high == math.inf else f" and < {high:g}")
        raise ValueError(f"Invalid {name}: {value!r} (allowed: a number {allowed})")


def _out(result: Tensor, *inputs: Number) -> Number:
    return result if any(isinstance(v, Tensor) for v in inputs) else float(result)


def _as64(*values: Number) -> list[Tensor]:
    return [torch.as_tensor(v, dtype=torch.float64) for v in values]


def gd_edge(lr: Number) -> Number:
    r"""Gradient descent: :math:`\lambda^* = 2/\eta`."""
    _check("lr", lr, 0.0, False)
    (eta,) = _as64(lr)
    return _out(2.0 / eta, lr)


def momentum_edge(lr: Number, beta: Number, nesterov: bool = False) -> Number:
    r"""SGD with momentum β, as ``torch.optim.SGD`` implements it (dampening 0).

    .. math::
        \text{heavy ball: } \lambda^* = \frac{2 + 2\beta}{\eta}, \qquad
        \text{Nesterov: } \lambda^* = \frac{2 + 2\beta}{\eta\,(1 + 2\beta)}
    """
    _check("lr", lr, 0.0, False)
    _check("beta", beta, 0.0, True, 1.0)
    eta, b = _as64(lr, beta)
    edge = (2.0 + 2.0 * b) / eta
    if nesterov:
        edge = edge / (1.0 + 2.0 * b)
    return _out(edge, lr, beta)


def sam_edge(lr: Number, rho: Number, grad_norm: Number) -> Number:
    r"""SAM with normalized ascent ε = ρ g/‖g‖ and gradient-descent steps (Long & Bartlett).

    The positive root of :math:`\eta\lambda(1 + \rho\lambda/\|g\|) = 2`, written in the form that
    stays finite as :math:`\|g\| \to 0` (the edge then goes to 0) and gives 2/η at ρ = 0:

    .. math::
        \lambda^* = \frac{4}{\eta\left(1 + \sqrt{1 + 8\rho / (\eta \|g\|)}\right)}

    ``grad_norm`` is :math:`\|\nabla L(w)\|` at the current weights, on the batch of that step.
    """
    _check("lr", lr, 0.0, False)
    _check("rho", rho, 0.0, True)
    _check("grad_norm", grad_norm, 0.0, True)
    eta, r, g = _as64(lr, rho, grad_norm)
    ratio = torch.where(r == 0, torch.zeros_like(r * g), r / g)  # rho/0 -> inf, 0/0 -> 0
    return _out(4.0 / (eta * (1.0 + torch.sqrt(1.0 + 8.0 * ratio / eta))), lr, rho, grad_norm)


def usam_edge(lr: Number, rho: Number) -> Number:
    r"""Unnormalized SAM, ε = ρ g, with gradient-descent steps.

    .. math::
        \lambda^* = \frac{\sqrt{1 + 8\rho/\eta} - 1}{2\rho}
                  = \frac{4}{\eta\left(1 + \sqrt{1 + 8\rho/\eta}\right)}

    (the second form is used: it is exact at ρ = 0, where it gives 2/η).
    """
    _check("lr", lr, 0.0, False)
    _check("rho", rho, 0.0, True)
    eta, r = _as64(lr, rho)
    return _out(4.0 / (eta * (1.0 + torch.sqrt(1.0 + 8.0 * r / eta))), lr, rho)


def adam_edge(lr: Number, beta1: Number) -> Number:
    r"""Adam's edge for the *preconditioned* sharpness :math:`\lambda_1(P^{-1}H)` (Cohen et al.
    2022), with P the diagonal preconditioner :math:`\sqrt{\hat v} + \epsilon`:

    .. math::
        \lambda^* = \frac{2 + 2\beta_1}{\eta\,(1 - \beta_1)}
    """
    _check("lr", lr, 0.0, False)
    _check("beta1", beta1, 0.0, True, 1.0)
    eta, b = _as64(lr, beta1)
    return _out((2.0 + 2.0 * b) / (eta * (1.0 - b)), lr, beta1)


# --------------------------------------------------------------------------- which edge applies


def optimizer_kind(optimizer):
    """What the edge depends on: the typed kind of ``optimizer``
    (:class:`samkit.optim.kind.OptimizerKind`: the base optimizer's rule, ``lr`` and β, the
    ascent record, ρ, the descent, which edge applies and, when none does, why), read from what
    the optimizer declares, never from its type. The first param group's hyperparameters are
    used; all groups must share ``lr``. An ``OptimizerKind`` is returned as it is."""
    from samkit.optim.kind import OptimizerKind, kind_of

    return optimizer if isinstance(optimizer, OptimizerKind) else kind_of(optimizer)


def base_edge_for(optimizer) -> float | None:
    r"""The edge of the *base* optimizer alone: :math:`2/\eta` (GD), :math:`(2 + 2\beta)/\eta`
    (heavy ball; Nesterov's form), Adam's :math:`(2 + 2\beta_1)/(\eta(1 - \beta_1))`; None where
    none applies (per-group learning rates, dampening, other optimizers: ``kind.base.no_edge``
    says why). This is what :math:`\lambda_{max}(H_\mathrm{eff})` of a sharpness-aware step is
    compared with. ``optimizer``: an optimizer or its :func:`optimizer_kind`."""
    from samkit.optim.kind import BaseRule

    base = optimizer_kind(optimizer).base
    if base.no_edge or base.rule is BaseRule.UNKNOWN or not base.lr > 0:
        return None
    if base.rule is BaseRule.ADAM:
        return float(adam_edge(base.lr, base.beta))
    if base.rule is BaseRule.GD:
        return float(gd_edge(base.lr))
    return float(momentum_edge(base.lr, base.beta, nesterov=base.rule is BaseRule.NESTEROV))


def edge_for(optimizer, grad_norm: float | None = None) -> float | None:
    r"""The stability threshold of λ₁ for ``optimizer`` at gradient norm ``grad_norm``.

    Decided by the optimizer's kind (:func:`optimizer_kind`; ``optimizer`` may be one), from
    what it declares:

    * a plain optimizer (``kind.edge`` is ``EdgeRule.BASE``): SGD's :func:`gd_edge` or
      :func:`momentum_edge` (heavy ball or Nesterov); Adam / AdamW: :func:`adam_edge` (compare it
      with the *preconditioned* sharpness :math:`\lambda_1(P^{-1}H)`);
    * a sharpness-aware optimizer over SGD whose ascent declares a closed-form edge
      (``kind.ascent.edge``: SAM's :func:`sam_edge` with ``grad_norm``, Long & Bartlett;
      USAM's :func:`usam_edge`) and whose descent is the plain one (``EdgeRule.CLOSED_FORM``).

    Over heavy-ball or Nesterov SGD (an extension of the same quadratic argument, not in the
    paper): along :math:`v_1` SAM's gradient is :math:`\lambda(1 + \rho\lambda/\|g\|)` times the
    plain one, so SAM is stable while :math:`\lambda(1 + \rho\lambda/\|g\|)` stays below the
    base optimizer's edge :math:`E`. That is ``sam_edge(2/E, rho, grad_norm)`` (with :math:`E =
    2/\eta` it is the paper's SAM-edge); likewise ``usam_edge(2/E, rho)``: the ascent's edge is
    called with ``effective_lr = 2/E``.

    Returns ``None`` where no closed form applies (``EdgeRule.NONE``: ASAM, Fisher SAM and
    others: use :func:`samkit.curvature.effective_hessian` against :func:`base_edge_for`; SAM
    over Adam, per-group learning rates, other optimizers); ``kind.note`` says why.
    """
    from samkit.optim.kind import EdgeRule

    kind = optimizer_kind(optimizer)
    if kind.edge is EdgeRule.NONE:
        return None
    base_edge = base_edge_for(kind)
    if base_edge is None:
        return None
    if kind.edge is EdgeRule.BASE:
        return base_edge
    ascent = kind.ascent
    if ascent.edge_needs_grad_norm and grad_norm is None:
        raise ValueError(
            f"Invalid grad_norm: None (the {ascent.name} edge needs the gradient norm)"
        )
    return float(ascent.edge(2.0 / base_edge, kind.rho, grad_norm))
