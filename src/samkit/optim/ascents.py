r"""Ascents: how a sharpness-aware optimizer finds its perturbation ε.

An ascent is a function ``direction(optimizer, buckets, options)`` that overwrites each bucket's
first-pass gradients :math:`g` in place with ε (``bucket.backups`` is free scratch space; the
parameters must not change), reading its hyperparameters from ``bucket.group`` (``rho`` and the
ascent's own group keys) and from ``options`` (settings fixed at construction, e.g. ASAM's ``p``).
Wrapped in an :class:`Ascent` record, it also declares

* its **stability edge** (:attr:`Ascent.edge`): a closed form
  ``edge(effective_lr, rho, grad_norm) -> float`` valid over gradient descent with step size
  ``effective_lr`` (``2 / E`` for a base optimizer with edge ``E``), or None with the reason in
  :attr:`Ascent.edge_note`;
* its **effective-Hessian form** (:attr:`Ascent.effective`): for an ascent
  :math:`\epsilon = \rho M g / c` with a diagonal :math:`M` and a scalar :math:`c` (both held
  fixed at the current weights, as Long & Bartlett's linearisation does), a function
  ``effective(optimizer, groups_params, grads) -> list[Tensor]`` giving the diagonal of
  :math:`\rho M / c` per parameter, so that one linearised step sees

  .. math::
      H_\mathrm{eff} = H + H \,\frac{\rho M}{c}\, H

  (:func:`samkit.curvature.effective_hessian`); or None with the reason in
  :attr:`Ascent.effective_note`.

A new ascent is one function and one line: ``register_ascent(Ascent("name", fn, ...))`` (see
:func:`samkit.optim.registry.register_ascent`); it is then a registry optimizer of its own and
the ``ascent=`` of GSAM, LookSAM, AE-SAM and RST.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from samkit.optim import kernels
from samkit.optim._validation import check_choice, check_non_negative

P_NORMS = (2, math.inf)

Direction = Callable[[Any, list, dict[str, Any]], None]
EdgeForm = Callable[[float, float, "float | None"], float]
EffectiveForm = Callable[[Any, Sequence[Sequence[Tensor]], Sequence[Sequence[Tensor]]], list]


@dataclass(frozen=True)
class Ascent:
    """One ascent rule and what it declares.

    Attributes:
        name: the registry name (lower case).
        direction: ``direction(optimizer, buckets, options)``, overwriting ``bucket.grads``
            with ε in place.
        description: one line for ``samkit optimizers``.
        rho: the default radius ρ.
        group_defaults: the ascent's own per-group hyperparameters besides ``rho`` (e.g.
            ``{"eta": 0.01, "normalize": True}`` for ASAM), added to every param group.
        options: construction-time settings and their defaults (e.g. ``{"p": 2}``).
        group_keys: the param-group key of an argument where the two differ (FriendlySAM's
            ``sigma`` is stored as ``fsam_sigma``).
        check: ``check(options)`` raises ``ValueError`` for bad options (or None).
        needs_unscaled_grads: ε depends on the loss scale (USAM, Fisher SAM, FriendlySAM):
            under AMP the first-pass gradients are unscaled before ``direction``.
        edge: the closed-form stability edge over gradient descent, or None.
        edge_note: why there is no closed-form edge (when ``edge`` is None).
        edge_needs_grad_norm: ``edge`` reads ``grad_norm`` (SAM's edge does, USAM's does not).
        effective: the diagonal of :math:`\\rho M / c` per parameter, or None.
        effective_note: why there is no effective-Hessian form (when ``effective`` is None).
        effective_check: ``effective_check(optimizer) -> str``: why this optimizer's settings
            leave the form out ('' when they do not; ASAM with p = ∞), or None.
        isotropic: :math:`M = I` (SAM, USAM): ``H_eff = H + c H^2`` is a
            polynomial in :math:`H`, with :math:`H`'s eigenvectors.
    """

    name: str
    direction: Direction
    description: str = ""
    rho: float = 0.05
    group_defaults: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    group_keys: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    needs_unscaled_grads: bool = False
    edge: EdgeForm | None = None
    edge_note: str = ""
    edge_needs_grad_norm: bool = False
    effective: EffectiveForm | None = None
    effective_note: str = ""
    effective_check: Callable[[Any], str] | None = None
    isotropic: bool = False

    def keys(self) -> set[str]:
        """The keyword arguments this ascent takes: ``rho``, its group keys and its options."""
        return {"rho", *self.group_defaults, *self.options}

    def resolve(self, **given: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``given`` into (group defaults incl. ``rho``, options), filling the defaults
        and validating them; unknown keys raise ``ValueError``."""
        unknown = sorted(set(given) - self.keys())
        if unknown:
            raise ValueError(
                f"Invalid argument(s) {unknown} for ascent {self.name!r} "
                f"(allowed: {sorted(self.keys())})"
            )
        groups = {"rho": given.get("rho", self.rho)}
        check_non_negative("rho", groups["rho"])
        for k, v in self.group_defaults.items():
            value = given.get(k, v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # a numeric default:
                check_non_negative(k, value)  # a string or NaN given for it is refused here
            groups[self.group_keys.get(k, k)] = value
        options = {k: given.get(k, v) for k, v in self.options.items()}
        if self.check is not None:
            self.check(options)
        return groups, options


# ------------------------------------------------------------------------ the directions


def _scale_by_rho_over(buckets, norm: Tensor) -> None:
    for b in buckets:
        scale = kernels.safe_ratio(b.group["rho"], norm.to(b.grads[0].device))
        torch._foreach_mul_(b.grads, kernels.scale_for(scale, b.grads[0]))


def _check_rho(buckets) -> None:
    for b in buckets:
        check_non_negative("rho", b.group["rho"])


def sam_direction(optimizer, buckets, options) -> None:
    r""":math:`\epsilon = \rho\, g / \|g\|_2` (the norm over every param group)."""
    _check_rho(buckets)
    _scale_by_rho_over(buckets, kernels.global_sq_norm(b.grads for b in buckets).sqrt())


def usam_direction(optimizer, buckets, options) -> None:
    r""":math:`\epsilon = \rho\, g`."""
    _check_rho(buckets)
    for b in buckets:
        torch._foreach_mul_(b.grads, float(b.group["rho"]))


def asam_direction(optimizer, buckets, options) -> None:
    r"""ASAM: :math:`\epsilon = \rho T^2 g / \|T g\|_2` (p = 2) or :math:`\rho T \mathrm{sign}(g)`
    (p = ∞), :math:`T = I` on groups with ``normalize=False``."""
    normalization, p = options["normalization"], options["p"]
    scales = []
    for b in buckets:
        check_non_negative("rho", b.group["rho"])
        check_non_negative("eta", b.group["eta"])
        if b.group.get("normalize", True):
            scales.append(kernels.normalizer(b.params, b.group["eta"], normalization, b.backups))
        else:
            scales.append(None)
    if p == 2:
        # g <- T g, then ||T g|| over everything, then g <- rho T (T g) / ||T g||.
        for b, t in zip(buckets, scales, strict=True):
            if t is not None:
                torch._foreach_mul_(b.grads, t)
        norm = kernels.global_sq_norm(b.grads for b in buckets).sqrt()
        for b, t in zip(buckets, scales, strict=True):
            if t is not None:
                torch._foreach_mul_(b.grads, t)
        _scale_by_rho_over(buckets, norm)
    else:
        for b, t in zip(buckets, scales, strict=True):
            torch._foreach_sign_(b.grads)
            if t is not None:
                torch._foreach_mul_(b.grads, t)
            torch._foreach_mul_(b.grads, float(b.group["rho"]))


def fisher_direction(optimizer, buckets, options) -> None:
    r"""Fisher SAM: :math:`\epsilon = \rho F^{-1} g / \sqrt{g^\top F^{-1} g}`,
    :math:`F = I + \eta\,\mathrm{diag}(g \odot g)`."""
    # backups <- F = 1 + eta g^2;  grads <- u = F^-1 g;  backups <- sqrt(F) u = F^-1/2 g
    for b in buckets:
        check_non_negative("rho", b.group["rho"])
        check_non_negative("eta", b.group["eta"])
        torch._foreach_copy_(b.backups, b.grads)
        torch._foreach_mul_(b.backups, b.grads)
        torch._foreach_mul_(b.backups, float(b.group["eta"]))
        torch._foreach_add_(b.backups, 1.0)
        torch._foreach_div_(b.grads, b.backups)
        torch._foreach_sqrt_(b.backups)
        torch._foreach_mul_(b.backups, b.grads)
    _scale_by_rho_over(buckets, kernels.global_sq_norm(b.backups for b in buckets).sqrt())


def friendly_direction(optimizer, buckets, options) -> None:
    r"""FriendlySAM: :math:`\epsilon = \rho\, d / \|d\|_2`, :math:`d = g - \sigma m`, with the
    running mean :math:`m \leftarrow \lambda m + (1 - \lambda) g` kept in ``optimizer.state``."""
    finite = optimizer._first_pass_finite
    for b in buckets:
        check_non_negative("rho", b.group["rho"])
        state = optimizer.state
        fresh = [i for i, p in enumerate(b.params) if "fsam_mean" not in state[p]]
        for i in fresh:  # allocated once: m_0 = g_0, d_0 = g_0
            state[b.params[i]]["fsam_mean"] = b.grads[i].clone()
        fresh_set = set(fresh)
        seen = [i for i in range(len(b.params)) if i not in fresh_set]
        if not seen:
            continue
        grads = [b.grads[i] for i in seen]
        raw = [b.backups[i] for i in seen]  # scratch: the raw gradient
        means = [state[b.params[i]]["fsam_mean"] for i in seen]
        torch._foreach_copy_(raw, grads)
        # d = g - sigma m_{t-1}
        torch._foreach_add_(grads, means, alpha=-float(b.group["fsam_sigma"]))
        # m <- m + (1 - lambda)(g - m), skipped (weight 0) after a non-finite first pass
        torch._foreach_sub_(raw, means)
        weight = 1.0 - float(b.group["fsam_lambda"])
        if finite is None:
            torch._foreach_mul_(raw, weight)
        else:
            torch._foreach_mul_(raw, (finite.to(raw[0].device, raw[0].dtype) * weight))
        torch._foreach_add_(means, raw)
    _scale_by_rho_over(buckets, kernels.global_sq_norm(b.grads for b in buckets).sqrt())


def centralize_(tensors) -> None:
    r"""Gradient centralization in place (Yong et al. 2020): every tensor with more than one
    dimension loses its mean over all dimensions but the first, :math:`g_i \leftarrow g_i -
    \mathrm{mean}(g_i)` for each output unit / filter :math:`i`; biases and other 1-d tensors
    are left alone."""
    for t in tensors:
        if t.dim() > 1:
            t.sub_(t.mean(dim=tuple(range(1, t.dim())), keepdim=True))


def gcsam_direction(optimizer, buckets, options) -> None:
    r"""GCSAM: :math:`\epsilon = \rho\, \Phi(g) / \|\Phi(g)\|_2`, :math:`\Phi` the gradient
    centralization of :func:`centralize_` (the norm of the centralized gradient, over every
    param group)."""
    _check_rho(buckets)
    for b in buckets:
        centralize_(b.grads)
    _scale_by_rho_over(buckets, kernels.global_sq_norm(b.grads for b in buckets).sqrt())


# ------------------------------------------------------------------------ the edges


def _sam_edge(effective_lr: float, rho: float, grad_norm: float | None) -> float:
    from samkit import stability

    if grad_norm is None:
        raise ValueError("Invalid grad_norm: None (the SAM-edge needs the gradient norm)")
    return float(stability.sam_edge(effective_lr, rho, grad_norm))


def _usam_edge(effective_lr: float, rho: float, grad_norm: float | None) -> float:
    from samkit import stability

    return float(stability.usam_edge(effective_lr, rho))


# ------------------------------------------------------------------------ effective Hessians


def _flat_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def _groups(optimizer, groups_params, grads):
    """(group, params, grads) for each param group (the optimizer's order)."""
    return zip(optimizer.param_groups, groups_params, grads, strict=True)


def _sam_effective(optimizer, groups_params, grads) -> list[Tensor]:
    r""":math:`M = I`, :math:`c = \|g\|_2`."""
    c = _flat_norm([g for gs in grads for g in gs])
    c = c.clamp_min(torch.finfo(c.dtype).tiny)
    return [
        torch.full_like(g, float(group["rho"])) / c.to(g.dtype)
        for group, _, gs in _groups(optimizer, groups_params, grads)
        for g in gs
    ]


def _usam_effective(optimizer, groups_params, grads) -> list[Tensor]:
    r""":math:`M = I`, :math:`c = 1`."""
    return [
        torch.full_like(g, float(group["rho"]))
        for group, _, gs in _groups(optimizer, groups_params, grads)
        for g in gs
    ]


def _asam_effective(optimizer, groups_params, grads) -> list[Tensor]:
    r""":math:`M = T^2`, :math:`c = \|T g\|_2` (p = 2), :math:`T = I` where ``normalize=False``."""
    normalization = optimizer.ascent_options["normalization"]
    squares, tg = [], []
    for group, ps, gs in _groups(optimizer, groups_params, grads):
        for p, g in zip(ps, gs, strict=True):
            if group.get("normalize", True):
                (t,) = kernels.normalizer([p.detach()], float(group["eta"]), normalization)
                t = t.to(g.dtype)
            else:
                t = torch.ones_like(g)
            squares.append((float(group["rho"]), t * t))
            tg.append(t * g)
    c = _flat_norm(tg)
    c = c.clamp_min(torch.finfo(c.dtype).tiny)
    return [rho * t2 / c.to(t2.dtype) for rho, t2 in squares]


def _fisher_effective(optimizer, groups_params, grads) -> list[Tensor]:
    r""":math:`M = F^{-1}`, :math:`c = \sqrt{g^\top F^{-1} g}`, with
    :math:`F = I + \eta\,\mathrm{diag}(g \odot g)` held fixed."""
    inv, parts = [], []
    for group, _, gs in _groups(optimizer, groups_params, grads):
        for g in gs:
            f_inv = 1.0 / (1.0 + float(group["eta"]) * g * g)
            inv.append((float(group["rho"]), f_inv))
            parts.append(g * f_inv.sqrt())
    c = _flat_norm(parts)
    c = c.clamp_min(torch.finfo(c.dtype).tiny)
    return [rho * f / c.to(f.dtype) for rho, f in inv]


def _check_asam(options: dict[str, Any]) -> None:
    check_choice("p", options["p"], P_NORMS)
    check_choice("normalization", options["normalization"], kernels.NORMALIZATIONS)


def _asam_has_effective(optimizer) -> str:
    """Why an ASAM instance has no effective-Hessian form ('' when it has one)."""
    if optimizer.ascent_options.get("p") != 2:
        return "ASAM with p = inf: eps = rho T sign(g) is not of the form rho M g / c"
    return ""


SAM_ASCENT = Ascent(
    "sam", sam_direction, "SAM, Foret et al. 2021: eps = rho g / ||g||", rho=0.05,
    edge=_sam_edge, edge_needs_grad_norm=True, effective=_sam_effective, isotropic=True,
)  # fmt: skip
USAM_ASCENT = Ascent(
    "usam", usam_direction, "unnormalized SAM: eps = rho g", rho=0.05,
    needs_unscaled_grads=True, edge=_usam_edge, effective=_usam_effective, isotropic=True,
)  # fmt: skip
ASAM_ASCENT = Ascent(
    "asam", asam_direction, "ASAM, Kwon et al. 2021: eps = rho T^2 g / ||T g||", rho=0.5,
    group_defaults={"eta": 0.01, "normalize": True},
    options={"p": 2, "normalization": "elementwise"}, check=_check_asam,
    edge_note="no closed-form edge for ASAM (T depends on w): use the effective Hessian",
    effective=_asam_effective, effective_check=_asam_has_effective,
)  # fmt: skip
FISHER_ASCENT = Ascent(
    "fishersam", fisher_direction, "Fisher SAM, Kim et al. 2022: eps = rho F^-1 g/..", rho=0.1,
    group_defaults={"eta": 1.0}, needs_unscaled_grads=True,
    edge_note="no closed-form edge for Fisher SAM (F depends on g): use the effective Hessian",
    effective=_fisher_effective,
)  # fmt: skip
FRIENDLY_ASCENT = Ascent(
    "friendlysam", friendly_direction, "F-SAM, Li et al. 2024: eps along g - mean(g)",
    rho=0.05, group_defaults={"sigma": 1.0, "lmbda": 0.6},
    group_keys={"sigma": "fsam_sigma", "lmbda": "fsam_lambda"},
    needs_unscaled_grads=True,
    edge_note="no closed-form edge for FriendlySAM (eps depends on the gradient history)",
    effective_note="FriendlySAM's eps = rho (g - sigma m)/||g - sigma m|| depends on the running "
    "mean m, not on g alone: not of the form rho M g / c",
)  # fmt: skip
GCSAM_ASCENT = Ascent(
    "gcsam", gcsam_direction, "GCSAM, Hassan et al. 2025: eps along the centralized g",
    rho=0.05,
    edge_note="no closed-form edge for GCSAM (eps = rho P g/||P g||, P a projection)",
    effective_note="GCSAM's eps = rho P g / ||P g|| has a non-diagonal projection P (the mean "
    "removal per output unit): not of the form rho M g / c with a diagonal M",
)  # fmt: skip


def effective_note(optimizer) -> str:
    """Why ``optimizer`` (a sharpness-aware optimizer) has no effective-Hessian form, or ''."""
    ascent = getattr(optimizer, "ascent", None)
    if ascent is None:
        return f"{type(optimizer).__name__} declares no ascent"
    if ascent.effective is None:
        return ascent.effective_note or f"ascent {ascent.name!r} declares no effective form"
    if ascent.effective_check is not None:
        return ascent.effective_check(optimizer)
    return ""


# ------------------------------------------------------------------------ the table

ASCENTS: dict[str, Ascent] = {}


def add_ascent(ascent: Ascent) -> Ascent:
    """Put ``ascent`` in the table (replacing one of the same name); see
    :func:`samkit.optim.registry.register_ascent`, which also makes it a registry optimizer."""
    if not isinstance(ascent, Ascent):
        raise ValueError(f"Invalid ascent: {ascent!r} (allowed: a samkit.optim.ascents.Ascent)")
    ASCENTS[ascent.name.lower()] = ascent
    return ascent


def get_ascent(name: str | Ascent) -> Ascent:
    """The :class:`Ascent` of ``name`` (case-insensitive), or ``name`` itself if it is one."""
    if isinstance(name, Ascent):
        return name
    ascent = ASCENTS.get(str(name).lower())
    if ascent is None:
        raise ValueError(f"Invalid ascent: {name!r} (allowed: {', '.join(sorted(ASCENTS))})")
    return ascent


for _ascent in (SAM_ASCENT, USAM_ASCENT, ASAM_ASCENT, FISHER_ASCENT, FRIENDLY_ASCENT,
                GCSAM_ASCENT):
    add_ascent(_ascent)
