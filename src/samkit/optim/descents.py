r"""Descents: how the second-pass gradient becomes the step (and what one-pass steps do).

A descent is a set of hooks on :class:`~samkit.optim.base.SharpnessAwareOptimizer` (each with a
default that descends with :math:`\nabla L(w + \epsilon)` unchanged), written here as functions
of ``(optimizer, buckets)`` so that any ascent can be combined with them:

* :func:`gap_descent` (GSAM): :math:`g_p - \alpha g_\perp`;
* :func:`looksam_descent`, :func:`looksam_one_pass_descent` (LookSAM): keep the component
  :math:`g_v` of :math:`g_s` orthogonal to :math:`g` on full steps, reuse it in between;
* :func:`weighted_descent` (WSAM): :math:`g + \alpha (g_p - g)` fed to the base optimizer, or
  (decoupled) the base step with :math:`g` and the sharpness term applied after it.

:data:`DESCENTS` names them with the preset that carries each (``gsam``, ``looksam``), so the
registry lists all four kinds (ascents, descents, schedules, presets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samkit.optim import _ops, kernels


def gap_descent(optimizer, buckets) -> None:
    r"""GSAM: :math:`g_p \leftarrow g_p - \alpha\,(g - c\, g_p)`,
    :math:`c = \langle g, g_p\rangle / \|g_p\|^2`, with α = ``group["gsam_alpha"]`` and
    :math:`g` in ``bucket.first_grads``."""
    # g_p - alpha (g - c g_p) = (1 + alpha c) g_p - alpha g
    inner = _ops.global_dot((b.first_grads, b.grads) for b in buckets)
    c = inner / _ops.sq_norm_of(buckets).clamp_min(torch.finfo(inner.dtype).tiny)
    for b in buckets:
        alpha = float(b.group["gsam_alpha"])
        torch._foreach_mul_(b.grads, _ops.on(1.0 + alpha * c, b.grads[0]))
        torch._foreach_add_(b.grads, b.first_grads, alpha=-alpha)


def _gv(optimizer, params) -> list[torch.Tensor]:
    return [optimizer.state[p]["looksam_gv"] for p in params]


def looksam_descent(optimizer, buckets) -> None:
    r"""LookSAM's full step: store :math:`g_v = g_s - (\langle g, g_s\rangle / \|g\|^2)\, g` per
    parameter (``state["looksam_gv"]``; the old one is kept after a non-finite step) and
    descend with :math:`g_s` unchanged."""
    # g_v built in the (free) backup; g_s is left as is.
    inner = _ops.global_dot((b.first_grads, b.grads) for b in buckets)
    coef = inner / _ops.sq_norm_of(buckets, "first_grads").clamp_min(
        torch.finfo(inner.dtype).tiny
    )
    for b in buckets:
        torch._foreach_copy_(b.backups, b.grads)
        torch._foreach_add_(
            b.backups, torch._foreach_mul(b.first_grads, _ops.on(-coef, b.grads[0]))
        )
    # keep the old g_v where this step was not finite (AMP overflow): no host sync
    finite = torch.isfinite(_ops.sq_norm_of(buckets, "backups"))
    if optimizer._first_pass_finite is not None:
        finite = finite & optimizer._first_pass_finite.to(finite.device)
    for b in buckets:
        for p in b.params:
            if "looksam_gv" not in optimizer.state[p]:
                optimizer.state[p]["looksam_gv"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
        gv = _gv(optimizer, b.params)
        for t in b.backups:
            t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        torch._foreach_sub_(b.backups, gv)
        torch._foreach_mul_(b.backups, _ops.on(finite, b.backups[0]))
        torch._foreach_add_(gv, b.backups)


def looksam_one_pass_descent(optimizer, buckets) -> None:
    r"""LookSAM's in-between step: :math:`g \leftarrow g + \alpha \frac{\|g\|}{\|g_v\|} g_v`,
    α = ``group["looksam_alpha"]``."""
    g_norm = _ops.sq_norm_of(buckets).sqrt()
    gv_norm = kernels.global_sq_norm(_gv(optimizer, b.params) for b in buckets).sqrt()
    ratio = kernels.safe_ratio(g_norm, gv_norm.to(g_norm.device))
    for b in buckets:
        scale = _ops.on(ratio * float(b.group["looksam_alpha"]), b.grads[0])
        torch._foreach_add_(b.grads, torch._foreach_mul(_gv(optimizer, b.params), scale))


def weighted_descent(optimizer, buckets) -> None:
    r"""WSAM, with :math:`\alpha = \gamma / (1 - \gamma)` = ``group["wsam_alpha"]`` and
    :math:`g` in ``bucket.first_grads``, :math:`g_p` in ``bucket.grads``:

    * coupled: :math:`g_p \leftarrow g + \alpha (g_p - g) = \alpha g_p + (1 - \alpha) g`;
    * decoupled (``group["wsam_decouple"]``): :math:`g_p \leftarrow g` and
      ``bucket.first_grads`` :math:`\leftarrow g - g_p` (the negated sharpness gradient, applied
      after the base step by :func:`weighted_after_step`)."""
    for b in buckets:
        alpha = float(b.group["wsam_alpha"])
        if b.group["wsam_decouple"]:
            torch._foreach_sub_(b.first_grads, b.grads)  # g - g_p
            torch._foreach_add_(b.grads, b.first_grads)  # g_p + (g - g_p) = g
        else:
            torch._foreach_mul_(b.grads, alpha)
            torch._foreach_add_(b.grads, b.first_grads, alpha=1.0 - alpha)


def weighted_after_step(optimizer, buckets) -> None:
    r"""WSAM's decoupled sharpness step, after the base step:
    :math:`w \leftarrow w - \gamma_t \alpha (g_p - g)` (:math:`\gamma_t` the group's current
    ``lr``), on the groups with ``wsam_decouple``."""
    for b in buckets:
        if b.group["wsam_decouple"]:
            step = float(b.group["lr"]) * float(b.group["wsam_alpha"])
            torch._foreach_add_(b.params, b.first_grads, alpha=step)  # first_grads = g - g_p


@dataclass(frozen=True)
class Descent:
    """A descent rule by name: its hooks and the preset that carries it (with its own
    hyperparameters and state)."""

    name: str
    description: str
    preset: str  # the registry name of the preset that takes this descent
    descent: object
    one_pass_descent: object = None


DESCENTS: dict[str, Descent] = {
    "gsam": Descent("gsam", "GSAM's surrogate-gap term: g_p - alpha g_perp", "gsam", gap_descent),
    "looksam": Descent(
        "looksam", "LookSAM's reuse of g_v between full steps", "looksam",
        looksam_descent, looksam_one_pass_descent,
    ),  # fmt: skip
    "wsam": Descent(
        "wsam", "WSAM's weighted sharpness: g + gamma/(1-gamma) (g_p - g), decoupled or not",
        "wsam", weighted_descent,
    ),  # fmt: skip
}
