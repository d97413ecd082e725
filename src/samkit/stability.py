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


def _descent_rewrites(optimizer) -> list[str]:
    """The descent hooks ``optimizer`` overrides (GSAM, LookSAM, MSAM, ...): with them the step
    is not "descend with the gradient at w + ε" and the ascent's closed-form edge does not hold."""
    from samkit.optim.base import SharpnessAwareOptimizer

    return [
        hook
        for hook in ("_two_pass_", "_descent_", "_one_pass_descent_")
        if getattr(type(optimizer), hook) is not getattr(SharpnessAwareOptimizer, hook)
    ]


def optimizer_kind(optimizer) -> dict:
    """What the edge depends on: the descent rule, the ascent rule and their hyperparameters.

    Returns a dict with ``base`` (``"gd"``, ``"momentum"``, ``"nesterov"``, ``"adam"`` or
    ``"unknown"``), ``ascent`` (``None`` for a plain optimizer, the ascent's name when it
    declares a closed-form edge and the descent is the plain one, else ``"unknown"``), ``lr``,
    ``beta`` (momentum or Adam's β₁), ``rho`` and ``note`` (why no edge applies, or ``""``).
    The ascent is read from what the optimizer declares (``optimizer.ascent``, an
    :class:`samkit.optim.ascents.Ascent`), never from its type. The first param group's
    hyperparameters are used; all groups must share ``lr``.
    """
    from samkit.optim.base import SharpnessAwareOptimizer

    info: dict = {"base": "unknown", "ascent": None, "lr": None, "beta": 0.0,
                  "rho": None, "note": ""}  # fmt: skip
    base = optimizer
    if isinstance(optimizer, SharpnessAwareOptimizer):
        base = optimizer.base_optimizer
        ascent = getattr(optimizer, "ascent", None)
        rewrites = _descent_rewrites(optimizer)
        name = type(optimizer).__name__
        info["ascent"] = "unknown"
        if ascent is None:
            info["note"] = f"no closed-form edge for {name} (it declares no ascent)"
        elif rewrites:
            info["note"] = (
                f"no closed-form edge for {name}: its descent rewrites the step "
                f"({', '.join(rewrites)})"
            )
        elif ascent.edge is None:
            info["note"] = f"{ascent.edge_note or 'no closed-form edge'} ({name})"
        else:
            info["ascent"] = ascent.name
        info["rho"] = float(optimizer.param_groups[0]["rho"])
    groups = optimizer.param_groups
    lrs = {float(g["lr"]) for g in groups}
    info["lr"] = float(groups[0]["lr"])
    if len(lrs) > 1:
        info["note"] = info["note"] or f"param groups have different learning rates {sorted(lrs)}"
    elif not info["lr"] > 0:
        info["note"] = info["note"] or f"lr is {info['lr']} (a schedule's end): no edge"
    group = groups[0]
    if isinstance(base, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if beta == 0.0:
            info["base"] = "gd"
        else:
            info["base"] = "nesterov" if group.get("nesterov", False) else "momentum"
            info["beta"] = beta
            if float(group.get("dampening", 0.0)) != 0.0:
                info["note"] = info["note"] or "SGD with dampening != 0 has no edge here"
    elif isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        info["base"] = "adam"
        info["beta"] = float(group["betas"][0])
        if info["ascent"] is not None:
            info["note"] = info["note"] or "no closed-form edge for SAM with an Adam base"
    else:
        info["note"] = info["note"] or f"no edge for {type(base).__name__}"
    return info


def base_edge_for(optimizer) -> float | None:
    r"""The edge of the *base* optimizer alone: :math:`2/\eta` (GD), :math:`(2 + 2\beta)/\eta`
    (heavy ball; Nesterov's form), Adam's :math:`(2 + 2\beta_1)/(\eta(1 - \beta_1))`; None where
    none applies (per-group learning rates, dampening, other optimizers). This is what
    :math:`\lambda_{max}(H_\mathrm{eff})` of a sharpness-aware step is compared with."""
    info = optimizer if isinstance(optimizer, dict) else optimizer_kind(optimizer)
    lr, beta, kind = info["lr"], info["beta"], info["base"]
    if kind == "unknown" or lr is None or not lr > 0:
        return None
    note = info["note"]
    if note and ("learning rates" in note or "dampening" in note or note.startswith("no edge")):
        return None
    if kind == "adam":
        return float(adam_edge(lr, beta))
    if kind == "gd":
        return float(gd_edge(lr))
    return float(momentum_edge(lr, beta, nesterov=kind == "nesterov"))


def edge_for(optimizer, grad_norm: float | None = None) -> float | None:
    r"""The stability threshold of λ₁ for ``optimizer`` at gradient norm ``grad_norm``.

    * SGD: :func:`gd_edge`, or :func:`momentum_edge` (heavy ball or Nesterov);
    * Adam / AdamW: :func:`adam_edge` (compare it with the *preconditioned* sharpness
      :math:`\lambda_1(P^{-1}H)`);
    * a sharpness-aware optimizer over SGD whose ascent declares a closed-form edge
      (``optimizer.ascent.edge``: SAM's :func:`sam_edge` with ``grad_norm``, Long & Bartlett;
      USAM's :func:`usam_edge`) and whose descent is the plain one.

    Over heavy-ball or Nesterov SGD (an extension of the same quadratic argument, not in the
    paper): along :math:`v_1` SAM's gradient is :math:`\lambda(1 + \rho\lambda/\|g\|)` times the
    plain one, so SAM is stable while :math:`\lambda(1 + \rho\lambda/\|g\|)` stays below the
    base optimizer's edge :math:`E`. That is ``sam_edge(2/E, rho, grad_norm)`` (with :math:`E =
    2/\eta` it is the paper's SAM-edge); likewise ``usam_edge(2/E, rho)``: the ascent's edge is
    called with ``effective_lr = 2/E``.

    Returns ``None`` where no closed form applies (ASAM, Fisher SAM and others: use
    :func:`samkit.curvature.effective_hessian` against :func:`base_edge_for`; SAM over Adam,
    per-group learning rates, other optimizers); :func:`optimizer_kind` says why.
    """
    info = optimizer if isinstance(optimizer, dict) else optimizer_kind(optimizer)
    if info["note"] or info["base"] == "unknown":
        return None
    base_edge = base_edge_for(info)
    if base_edge is None:
        return None
    if info["ascent"] is None or info["base"] == "adam":
        return base_edge
    from samkit.optim.ascents import get_ascent

    ascent = get_ascent(info["ascent"])
    if ascent.edge_needs_grad_norm and grad_norm is None:
        raise ValueError(
            f"Invalid grad_norm: None (the {ascent.name} edge needs the gradient norm)"
        )
    return float(ascent.edge(2.0 / base_edge, info["rho"], grad_norm))
