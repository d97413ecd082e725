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
