r"""The generalized Gauss-Newton matrix of a model's loss as a linear operator.

.. math::
    G = \sum_b \frac{n_b}{N}\, J_b^\top \big(\nabla^2_f \ell_b\big) J_b, \qquad
    J_b = \frac{\partial f(x_b; w)}{\partial w}

the Hessian with the model linearized in its weights: :math:`H = G + \sum_i \partial_{f_i}
\ell \, \nabla^2_w f_i`, and the second term is dropped. For a convex loss in the outputs
(cross-entropy, square loss) :math:`G` is positive semi-definite; for cross-entropy it equals
the Fisher information of the model's predictive distribution, and for square loss on a model
linear in its weights it is the Hessian.

References:
    N. N. Schraudolph. Fast Curvature Matrix-Vector Products for Second-Order Gradient
    Descent. Neural Computation 14(7), 2002. J. Martens. New Insights and Perspectives on the
    Natural Gradient Method. JMLR 21, 2020.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from samkit.curvature._data import LossFn
from samkit.curvature.operator import CurvatureOperator, Product


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix of ``loss_fn(model(x), y)`` over ``data``.

    .. math::
        G v = \sum_b \frac{n_b}{N}\, J_b^\top \big(\nabla^2_f \ell_b\big) (J_b v)

    Each product, per batch, uses one forward pass kept as a graph and three backward passes:
    :math:`J v` by the double-vjp trick (a backward of :math:`J^\top u` in :math:`u`), the
    loss Hessian in the outputs times :math:`Jv` (double backward of ``loss_fn`` alone, so any
    loss that is twice differentiable in the outputs works: ``nn.CrossEntropyLoss()``,
    ``nn.MSELoss()``), then :math:`J^\top (\cdot)`. With one batch and ``cache=True`` the
    forward graph is kept between products and rebuilt when any parameter or buffer changes
    in place (the cache key of :class:`CurvatureOperator`). The model's output must be one
    tensor.

    Data, weighting, model state (BatchNorm untouched, fixed dropout masks in training
    mode), the cache, the determinism check and :meth:`loss_and_gradient` are those of
    :class:`CurvatureOperator`, which it uses with the product :class:`GaussNewtonProduct`;
    see :class:`HessianOperator` for the arguments (``process_group`` included: under data
    parallelism :math:`G` is that of the union of the ranks' data, one all-reduce per
    product).

    Example::

        G = GGNOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
        top = top_eigenvalues(G, k=1, tol=1e-4)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Iterable[Tensor] | None = None,
        cache: bool = True,
        seed: int = 0,
        check_deterministic: bool | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        super().__init__(model, loss_fn, data, params, seed, check_deterministic,
                         product=GaussNewtonProduct(), cache=cache,
                         process_group=process_group)


class GaussNewtonProduct(Product):
    r""":math:`J^\top (\nabla^2_f \ell)\, J v` for one batch: the forward graph is built once
    (cacheable), each product is three backward passes through it (no batched form)."""

    name = "ggn"
    cacheable = True

    def build(self, op: CurvatureOperator, x: Any, y: Any) -> tuple:
        r"""The output ``f`` (graph in ``w``), :math:`J^\top u` as a graph in a dummy ``u``,
        and :math:`\nabla_f \ell` as a graph in ``f``."""
        out = op.model(x)
        if not isinstance(out, Tensor):
            raise ValueError(
                f"Invalid model: its output is a {type(out).__name__} (allowed: one tensor "
                "for GGNOperator)"
            )
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, op.params, grad_outputs=u, create_graph=True,
                                  allow_unused=True)
        jtu_used = [(i, g) for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        f = out.detach().requires_grad_(True)
        grad_f = torch.autograd.grad(op.loss_fn(f, y), f, create_graph=True)[0]
        return out, u, jtu_used, f, grad_f

    def apply(self, op, built, vs, retain, batched):
        out, u, jtu, f, grad_f = built
        zeros = [torch.zeros_like(p) for p in op.params]
        if not jtu or not grad_f.requires_grad:  # the outputs do not depend on w, or l is linear
            return zeros
        (jv,) = torch.autograd.grad([g for _, g in jtu], u,
                                    grad_outputs=[vs[i] for i, _ in jtu], retain_graph=True)
        (hjv,) = torch.autograd.grad(grad_f, f, grad_outputs=jv, retain_graph=True,
                                     allow_unused=True)
        if hjv is None:
            return zeros
        gv = torch.autograd.grad(out, op.params, grad_outputs=hjv, retain_graph=retain,
                                 allow_unused=True)
        return [z if g is None else g for z, g in zip(zeros, gv, strict=True)]


__all__ = ["GGNOperator", "GaussNewtonProduct"]
