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

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from samkit.curvature._data import LossFn
from samkit.curvature.operator import CurvatureOperator


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
    mode), the determinism check and :meth:`loss_and_gradient` are those of
    :class:`CurvatureOperator`; see :class:`HessianOperator` for the arguments.

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
    ) -> None:
        self.cache = bool(cache)
        self._graph: tuple | None = None
        self._graph_key: tuple | None = None
        super().__init__(model, loss_fn, data, params, seed, check_deterministic)

    def _forward_graph(self, x: Any, y: Any) -> tuple:
        """The output ``f`` (graph in ``w``), :math:`J^\\top u` as a graph in a dummy ``u``,
        and :math:`\\nabla_f \\ell` as a graph in ``f``."""
        with self._differentiable():
            out = self.model(x)
            if not isinstance(out, Tensor):
                raise ValueError(
                    f"Invalid model: its output is a {type(out).__name__} (allowed: one tensor "
                    "for GGNOperator)"
                )
            u = torch.zeros_like(out, requires_grad=True)
            jtu = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True,
                                      allow_unused=True)
            jtu_used = [(i, g) for i, g in enumerate(jtu) if g is not None and g.requires_grad]
            f = out.detach().requires_grad_(True)
            grad_f = torch.autograd.grad(self.loss_fn(f, y), f, create_graph=True)[0]
        return out, u, jtu_used, f, grad_f

    def _through(self, graph: tuple, vs: Sequence[Tensor], retain: bool) -> list[Tensor]:
        out, u, jtu, f, grad_f = graph
        zeros = [torch.zeros_like(p) for p in self.params]
        if not jtu or not grad_f.requires_grad:  # the outputs do not depend on w, or l is linear
            return zeros
        with self._differentiable():
            (jv,) = torch.autograd.grad([g for _, g in jtu], u,
                                        grad_outputs=[vs[i] for i, _ in jtu], retain_graph=True)
            (hjv,) = torch.autograd.grad(grad_f, f, grad_outputs=jv, retain_graph=True,
                                         allow_unused=True)
            if hjv is None:
                return zeros
            gv = torch.autograd.grad(out, self.params, grad_outputs=hjv, retain_graph=retain,
                                     allow_unused=True)
        return [z if g is None else g for z, g in zip(zeros, gv, strict=True)]

    def _batch_product(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        return self._through(self._forward_graph(x, y), vs, retain=False)

    def _pass(self, v: Tensor) -> Tensor:
        if self.batches.single is None or not self.cache:
            return super()._pass(v)
        key = self._state_key()
        if self._graph is None or key != self._graph_key:
            self._graph = None
            ((x, y, _),) = iter(self.batches)
            with self._batch_context(0):
                self._graph = self._forward_graph(x, y)
            self._graph_key = self._state_key()
        out = self._through(self._graph, self.unflatten(v), retain=True)
        return torch.cat([h.reshape(-1) for h in out])

    def clear_cache(self) -> None:
        """Drop the cached forward graph (it is rebuilt at the next product)."""
        self._graph = None
        self._graph_key = None


__all__ = ["GGNOperator"]
