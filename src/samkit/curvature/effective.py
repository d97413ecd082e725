r"""The effective Hessian of a sharpness-aware step.

A sharpness-aware step descends with :math:`\nabla L(w + \epsilon)` where the ascent is
:math:`\epsilon = \rho M g / c` (:math:`g = \nabla L(w)`). Linearising one step around a point
with the normalisers :math:`M` and :math:`c` held fixed (Long & Bartlett's assumption),
:math:`\nabla L(w + \epsilon) \approx g + H \epsilon = (I + \frac{\rho}{c} H M) g`, and a
perturbation :math:`\delta` of :math:`w` moves the step direction by

.. math::
    H_\mathrm{eff}\,\delta = \Big(H + H \,\frac{\rho M}{c}\, H\Big)\delta .

The step is stable while :math:`\lambda_{max}(H_\mathrm{eff})` stays below the *base*
optimizer's edge (:func:`samkit.stability.base_edge_for`: :math:`2/\eta` for gradient descent,
:math:`(2 + 2\beta)/\eta` for heavy ball, Adam's form). The forms declared by the ascents
(:mod:`samkit.optim.ascents`):

* SAM: :math:`M = I`, :math:`c = \|g\|_2`: :math:`H + (\rho/\|g\|) H^2`, same eigenvectors as
  :math:`H`, eigenvalues :math:`\lambda + (\rho/\|g\|)\lambda^2`; its condition
  :math:`\eta(\lambda + \rho\lambda^2/\|g\|) < 2` is exactly the SAM-edge
  (:func:`samkit.stability.sam_edge`);
* USAM: :math:`M = I`, :math:`c = 1`;
* ASAM (p = 2): :math:`M = T_w^2`, :math:`c = \|T_w g\|_2` (element-wise or filter-wise
  :math:`T_w`, :math:`T = I` on groups with ``normalize=False``);
* Fisher SAM: :math:`M = F^{-1}`, :math:`c = \sqrt{g^\top F^{-1} g}`,
  :math:`F = I + \eta\,\mathrm{diag}(g\odot g)` held fixed.

References:
    P. M. Long, P. L. Bartlett. Sharpness-Aware Minimization and the Edge of Stability.
    arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.curvature.operator import HessianOperator, LinearOperator


class EffectiveHessian(LinearOperator):
    r""":math:`H + H D H` for a Hessian operator :math:`H` and a diagonal :math:`D` (flat
    ``(d,)``, :math:`D = \rho M / c`). Each product costs two products of :math:`H`
    (``H.matvecs`` counts them; :attr:`hessian_products` too).

    Attributes:
        base: the Hessian operator.
        scale: the diagonal :math:`D`, flat, in the parameters' order.
        note: what the form is (for reports).
    """

    def __init__(self, base: LinearOperator, scale: Tensor, note: str = "") -> None:
        super().__init__(base.shapes, base.dtype, base.device, base.sharding)
        if scale.shape != (base.local_dim,):
            raise ValueError(
                f"Invalid scale: shape {tuple(scale.shape)}, not ({base.local_dim},)"
            )
        self.base = base
        self.scale = scale.to(base.device, base.dtype)
        self.note = note

    @property
    def hessian_products(self) -> int:
        """Products of :math:`H` taken by this operator (two per product)."""
        return 2 * self.matvecs

    def _matvec(self, v: Tensor) -> Tensor:
        u = self.base @ v
        return u + self.base @ (self.scale * u)

    def _matmat(self, v: Tensor) -> Tensor:
        """``H_eff @ V`` for ``V`` of shape ``(d, k)`` through ``H``'s own ``(d, k)`` products
        (batched where ``H`` batches them); ``matvecs`` grows by ``k``."""
        u = self.base @ v
        self.matvecs += v.shape[1]
        return u + self.base @ (self.scale[:, None] * u)


def _gradient(H: HessianOperator) -> list[Tensor]:
    """:math:`\nabla L(w)` on ``H``'s own data (size-weighted mean over its batches, the same
    random state per batch as ``H``'s products), at the current weights."""
    return H.loss_and_gradient()[1]


def effective_hessian(
    H: HessianOperator, optimizer: Any, grad: Tensor | Sequence[Tensor] | None = None
) -> EffectiveHessian:
    r"""The effective Hessian :math:`H + (\rho/c) H M H` of ``optimizer``'s sharpness-aware step.

    Args:
        H: the Hessian of the loss (a :class:`~samkit.curvature.HessianOperator`) over exactly
            the parameters ``optimizer`` steps (``requires_grad`` ones).
        optimizer: a sharpness-aware optimizer whose ascent declares an effective-Hessian form
            (``optimizer.ascent.effective``: SAM, USAM, ASAM with p = 2, Fisher SAM, and any
            registered ascent that declares one). Per-group ρ, ``eta`` and ``normalize`` are
            read from its param groups now; GSAM's current :math:`\rho_t` is ``group["rho"]``.
        grad: :math:`g = \nabla L(w)` (flat or parameter-shaped), if already computed on
            ``H``'s data; default: computed from ``H``'s data at the current weights.

    Returns:
        An :class:`EffectiveHessian` (``@``, ``.shape``, ``to_scipy()``, ``matmat`` through
        ``@`` on a ``(d, k)`` matrix, counted products), usable with
        :func:`~samkit.curvature.top_eigenvalues`.

    Note:
        Only the ascent is linearised. For an optimizer whose descent rewrites the step (GSAM's
        gap term :math:`-\alpha g_\perp`, LookSAM's reuse of :math:`g_v`) the operator is that
        of its ascent alone, i.e. of the plain step with the same ε; the note of the returned
        operator says so.

    Raises:
        ValueError: for an optimizer without a form (the reason is in the message: ASAM with
            p = ∞, FriendlySAM, ESAM, ...), or an ``H`` over other parameters.
    """
    from samkit.optim.ascents import effective_note
    from samkit.optim.kind import kind_of

    if not isinstance(H, HessianOperator):
        raise ValueError(
            f"Invalid H: {type(H).__name__} (allowed: a HessianOperator, whose data and "
            "parameters give g)"
        )
    kind = kind_of(optimizer)  # what the optimizer declares
    if not kind.form.wraps:
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} (allowed: a sharpness-aware "
            "optimizer; for a plain one the effective Hessian is H itself)"
        )
    why = effective_note(optimizer)
    if why:
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} has no effective form: {why}"
        )
    # the optimizer holds the model's parameters (FSDP2: the shards); H differentiates
    # H.params (FSDP2: the full weights), in the same order
    position = {id(p): i for i, p in enumerate(H.model_params)}
    groups_params, seen = [], set()
    for group in optimizer.param_groups:
        ps = [p for p in group["params"] if p.requires_grad]
        for p in ps:
            if id(p) not in position:
                raise ValueError(
                    "Invalid H: the optimizer steps a parameter of shape "
                    f"{tuple(p.shape)} that H does not differentiate (allowed: H over exactly "
                    "the optimizer's parameters, so that c spans the same g)"
                )
            seen.add(id(p))
        groups_params.append(ps)
    if len(seen) != len(H.params):
        raise ValueError("Invalid H: it differentiates parameters the optimizer does not step")
    shapes = [p.shape for p in H.params]
    if grad is None:
        flat_grads = _gradient(H)
    elif isinstance(grad, Tensor) and grad.numel() == H.dim:
        flat = grad.detach().to(H.device, H.dtype).reshape(-1)
        flat_grads = [t.view(s) for t, s in
                      zip(torch.split(flat, H.full_numels), shapes, strict=True)]
    elif isinstance(grad, (list, tuple)) and [tuple(g.shape) for g in grad] == [
        tuple(s) for s in shapes
    ]:
        flat_grads = [g.detach().to(H.device, H.dtype) for g in grad]
    else:
        given = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(
            f"Invalid grad: {given} (allowed: a flat ({H.dim},) tensor or a list of tensors "
            "shaped like the parameters, in full also for an FSDP2 model)"
        )
    grads = [[flat_grads[position[id(p)]] for p in ps] for ps in groups_params]
    full = [[H.params[position[id(p)]] for p in ps] for ps in groups_params]
    with torch.no_grad():
        diag = optimizer.ascent.effective(optimizer, full, grads)
    ordered: list[Tensor | None] = [None] * len(H.params)
    flat_params = [p for ps in groups_params for p in ps]
    for p, d in zip(flat_params, diag, strict=True):
        ordered[position[id(p)]] = d.reshape(-1)
    scale = H.local_part(torch.cat([d.to(H.device, H.dtype) for d in ordered]))
    note = f"{optimizer.ascent.name}: H + (rho/c) H M H"
    rewrites = kind.descent.rewrites
    if rewrites:
        name = type(optimizer).__name__
        note += f" (the ascent only: {name}'s {', '.join(rewrites)} not included)"
    return EffectiveHessian(H, scale, note=note)


def is_polynomial_in_h(Heff: EffectiveHessian) -> bool:
    """Whether :math:`D` is a multiple of the identity (SAM, USAM): :math:`H_\\mathrm{eff} =
    H + cH^2` is then a polynomial in :math:`H`, with :math:`H`'s eigenvectors."""
    scale = Heff.scale
    return bool(scale.numel() == 0 or torch.equal(scale, scale[:1].expand_as(scale)))


def effective_top_on_krylov(Heff: EffectiveHessian, krylov: Any, tol: float) -> Any:
    r"""The top eigenpair of :math:`H_\mathrm{eff} = H + HDH` by Rayleigh-Ritz on the Krylov
    space of a Lanczos run on :math:`H` (``top_eigenvalues(H, ..., keep_basis=True)``), for
    one product of :math:`H`.

    With the run's basis :math:`Q` and :math:`G = HQ` (from the recurrence),

    .. math::
        Q^\top H_\mathrm{eff} Q = Q^\top G + G^\top D G,

    so the projection costs no products; for its top Ritz pair :math:`(\theta, u = Qs)`,
    :math:`H_\mathrm{eff}u = Gs + H(D\,Gs)` costs one, and gives the exact residual
    :math:`r = \|H_\mathrm{eff}u - \theta u\|`. ``converged`` is the same test as
    :func:`~samkit.curvature.top_eigenvalues`': :math:`r + \sqrt m\,\varepsilon\,\|B\| \le
    \mathrm{tol}\,|\theta|`, so :math:`\theta` is then within that bound of an eigenvalue of
    :math:`H_\mathrm{eff}`. That it is the *largest* one rests on the space: for SAM and
    USAM (:func:`is_polynomial_in_h`) the Krylov space of :math:`H` is one of
    :math:`H_\mathrm{eff}` too, explored from the same random direction, and
    :math:`\lambda_{max}(H_\mathrm{eff}) = \max_i \lambda_i + c\lambda_i^2` is reached at an
    end of :math:`H`'s spectrum, both of which the space resolves; for other :math:`D` the
    space was not built for :math:`H_\mathrm{eff}`, so use the pair as a warm start.

    Returns:
        An :class:`~samkit.curvature.EigenResult` (``k = 1``, ``method="rayleigh-ritz"``,
        ``matvecs = 1``).
    """
    from samkit.curvature.eigen import EigenResult

    if krylov.basis is None or krylov.image is None:
        raise ValueError("Invalid krylov: run top_eigenvalues(..., keep_basis=True) on H first")
    q, g = krylov.basis, krylov.image
    if q.shape[0] != Heff.local_dim:
        raise ValueError(
            f"Invalid krylov: basis of dimension {q.shape[0]}, not {Heff.local_dim}"
        )
    # the (m, m) projection in the operator's dtype (its rounding is inside the bound below;
    # the residual that certifies the pair is computed from a product)
    projected = Heff.reduce_sum(q.T @ g + g.T @ (Heff.scale[:, None] * g)).double()
    projected = 0.5 * (projected + projected.T)
    theta, s = torch.linalg.eigh(projected)
    value, coeffs = float(theta[-1]), s[:, -1:].to(q.dtype)
    u = q @ coeffs
    hu = g @ coeffs
    before = Heff.base.matvecs
    heff_u = hu + Heff.base @ (Heff.scale[:, None] * hu)
    products = Heff.base.matvecs - before
    residual = float(Heff.reduce_sum((heff_u - value * u).pow(2).sum()).sqrt())
    eps = torch.finfo(q.dtype).eps
    bound = residual + math.sqrt(q.shape[1]) * eps * float(theta.abs().max())
    norm = float(Heff.reduce_sum(u.pow(2).sum()).sqrt())
    return EigenResult(
        values=torch.tensor([value], dtype=torch.float64),
        vectors=u / max(norm, torch.finfo(q.dtype).tiny),
        residuals=torch.tensor([residual], dtype=torch.float64),
        error_bounds=torch.tensor([bound], dtype=torch.float64),
        matvecs=products,
        converged=bound <= tol * abs(value),
        method="rayleigh-ritz",
    )
