r"""The Hessian preconditioned by Adam's second moment (Cohen et al. 2022).

Adam steps :math:`w \leftarrow w - \eta P^{-1} m` with the diagonal preconditioner

.. math::
    P = \mathrm{diag}\big(\sqrt{\hat v} + \epsilon\big), \qquad
    \hat v = \frac{v_t}{1 - \beta_2^{\,t}}

(:math:`v_t` the second-moment average, ``max_exp_avg_sq`` with AMSGrad). Its stability is
governed by the *preconditioned sharpness* :math:`\lambda_1(P^{-1} H)`, which reaches
:math:`(2 + 2\beta_1)/(\eta (1 - \beta_1))` at the adaptive edge of stability. The symmetric
:math:`P^{-1/2} H P^{-1/2}` has the same eigenvalues, so Lanczos applies.

The bias correction :math:`1/(1 - \beta_1^t)` of the first moment is left out, as in the
threshold above: it tends to 1 after a few times :math:`1/(1-\beta_1)` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.curvature.operator import HessianOperator, LinearOperator


class PreconditionedOperator(LinearOperator):
    r""":math:`D A D` for a symmetric operator :math:`A` and a diagonal :math:`D` (flat ``(d,)``).

    With :math:`D = P^{-1/2}` its eigenvalues are those of :math:`P^{-1} A`; an eigenvector
    :math:`u` of :math:`DAD` maps to the eigenvector :math:`Du` of :math:`P^{-1}A`.
    """

    def __init__(self, base: LinearOperator, scale: Tensor) -> None:
        super().__init__(base.shapes, base.dtype, base.device, base.sharding)
        if scale.shape != (base.local_dim,):
            raise ValueError(
                f"Invalid scale: shape {tuple(scale.shape)}, not ({base.local_dim},)"
            )
        self.base = base
        self.scale = scale.to(base.device, base.dtype)

    def _matvec(self, v: Tensor) -> Tensor:
        return self.scale * (self.base @ (self.scale * v))


def adam_preconditioned(H: HessianOperator, adam_optimizer: Optimizer) -> PreconditionedOperator:
    r"""The operator :math:`P^{-1/2} H P^{-1/2}` for the Adam / AdamW state of ``H``'s parameters.

    Its top eigenvalue (``top_eigenvalues(adam_preconditioned(H, opt))``) is the preconditioned
    sharpness of Cohen et al. 2022. :math:`P` is read now, from the optimizer's state:
    ``exp_avg_sq`` (``max_exp_avg_sq`` when ``amsgrad``), ``step`` and the group's ``betas``
    and ``eps``; build a new operator after further steps.

    Raises ``ValueError`` when a parameter of ``H`` is not in the optimizer or has no Adam state
    yet (take one step first).

    References:
        J. Cohen, B. Ghorbani, S. Krishnan, N. Agarwal, S. Medapati, M. Badura, D. Suo,
        D. Cardoze, Z. Nado, G. Dahl, J. Gilmer. Adaptive Gradient Methods at the Edge of
        Stability. arXiv 2207.14484, 2022.
    """
    if not isinstance(H, HessianOperator):
        raise ValueError(
            f"Invalid H: {type(H).__name__} (allowed: a HessianOperator, whose parameters "
            "identify the optimizer's state)"
        )
    if not isinstance(adam_optimizer, Optimizer):
        raise ValueError(
            f"Invalid adam_optimizer: {type(adam_optimizer).__name__} (allowed: "
            "torch.optim.Adam or AdamW)"
        )
    group_of = {id(p): g for g in adam_optimizer.param_groups for p in g["params"]}
    scales = []
    for name, p in zip(H.names, H.model_params, strict=True):  # the optimizer's own tensors
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"Invalid adam_optimizer: it does not hold the parameter {name!r}")
        if "betas" not in group or "eps" not in group:
            raise ValueError(
                f"Invalid adam_optimizer: {type(adam_optimizer).__name__} has no betas / eps "
                "(allowed: torch.optim.Adam or AdamW)"
            )
        state = adam_optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if key not in state or "step" not in state:
            raise ValueError(
                f"Invalid adam_optimizer: no {key!r} for parameter {name!r} (take at least one "
                "optimizer step first)"
            )
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        v_sq = state[key].detach()
        if H.sharding is not None:  # FSDP2: this rank's block, like the operator's vectors
            v_sq = v_sq.to_local()
        v_hat = v_sq.to(torch.float64) / (1.0 - beta2**step)
        p_diag = v_hat.sqrt() + float(group["eps"])
        scales.append(p_diag.rsqrt().reshape(-1))
    return PreconditionedOperator(H, torch.cat(scales))
