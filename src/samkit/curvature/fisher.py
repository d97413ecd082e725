r"""Fisher information matrices of a model as linear operators: the empirical Fisher and the
Monte-Carlo Fisher.

For a loss that is a negative log-likelihood, :math:`\ell(f, y) = -\log p(y \mid f)` with
:math:`f = f(x; w)` the model's output, and per-example gradients
:math:`g_i(y) = \nabla_w \ell(f(x_i; w), y) = J_i^\top r_i(y)`,
:math:`r_i(y) = \nabla_f \ell(f_i, y)`, :math:`J_i = \partial f(x_i; w)/\partial w`:

.. math::
    F_\mathrm{emp} = \frac{1}{N}\sum_{i=1}^N g_i(y_i)\, g_i(y_i)^\top, \qquad
    F = \frac{1}{N}\sum_{i=1}^N \mathbb{E}_{\hat y \sim p(\cdot \mid f_i)}
        \big[g_i(\hat y)\, g_i(\hat y)^\top\big], \qquad
    F_\mathrm{MC} = \frac{1}{NS}\sum_{i=1}^N \sum_{s=1}^S g_i(\hat y_{is})\, g_i(\hat y_{is})^\top .

* The **empirical Fisher** uses the given labels :math:`y_i`. It is not the Fisher: it is the
  (uncentred) second moment of the gradients of the data at hand, and near a minimum it
  shrinks with the residuals while the Hessian does not (Kunstner et al. 2019).
* The **Fisher** takes the expectation over labels drawn from the model's own predictive
  distribution. Since :math:`\mathbb{E}_{\hat y}[r_i r_i^\top] = \nabla^2_f \ell(f_i, \cdot)`
  for an exponential family in its natural parameter (softmax cross-entropy, a Gaussian with
  fixed variance), the Fisher **equals the generalized Gauss-Newton matrix**
  :math:`G = \frac{1}{N}\sum_i J_i^\top \nabla^2_f \ell_i\, J_i`
  (:class:`~samkit.curvature.GGNOperator`) for those losses; it does not depend on the labels.
* The **Monte-Carlo Fisher** replaces the expectation by :math:`S` sampled labels per example,
  an unbiased estimate of :math:`F` of rank at most :math:`NS`. The labels are drawn once, at
  construction, from a seeded generator: every product applies the same matrix (Lanczos needs
  one fixed matrix).

Each product, per batch, is three backward passes through one forward graph (like the GGN):
:math:`u = Jv` by the double-vjp trick, the per-example coefficients
:math:`c_i = \frac{1}{S}\sum_s r_i(\hat y_{is})\,\big(r_i(\hat y_{is})^\top u_i\big)`, then
:math:`J^\top c`; never a per-example gradient (memory: the outputs, not :math:`N \times d`).
:math:`r_i` is read from the batch loss: for a loss that is the **mean over the batch of
per-example losses** (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``), row :math:`i` of
:math:`\nabla_f L` is :math:`r_i / n`. The examples must not interact in the forward pass
(BatchNorm in training mode couples them: use ``model.eval()``).

References:
    J. Martens. New Insights and Perspectives on the Natural Gradient Method. JMLR 21, 2020.
    F. Kunstner, L. Balles, P. Hennig. Limitations of the Empirical Fisher Approximation for
    Natural Gradient Descent. NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from samkit.curvature._data import Batches, LossFn, fixed_rng, untouched
from samkit.curvature.operator import CurvatureOperator, Product
from samkit.optim._validation import check_int

LIKELIHOODS = ("categorical", "gaussian")


class FisherProduct(Product):
    r""":math:`\frac{1}{n}\sum_i J_i^\top \Big(\frac{1}{S}\sum_s r_{is} r_{is}^\top\Big) J_i v`
    for one batch, with :math:`r_{is}` the per-example loss gradients in the outputs at the
    batch's labels (one label set: the empirical Fisher) or at its ``S`` sampled label sets
    (the Monte-Carlo Fisher): one forward graph (cacheable), three backward passes per
    product (no batched form).

    The labels a batch ``(x, y)`` holds: ``y`` itself (``sampled=False``), or ``S`` label
    sets stacked on dimension 1 of ``y`` (``sampled=True``, ``y[:, s]`` is set ``s``)."""

    name = "fisher"
    cacheable = True

    def __init__(self, sampled: bool) -> None:
        super().__init__()
        self.sampled = bool(sampled)

    def build(self, op: CurvatureOperator, x: Any, y: Any) -> tuple:
        r"""The output ``f`` (graph in ``w``), :math:`J^\top u` as a graph in a dummy ``u``,
        and the per-example gradients :math:`r` ``(S, n, ...)`` (detached)."""
        out = op.model(x)
        if not isinstance(out, Tensor) or out.dim() == 0:
            raise ValueError(
                f"Invalid model: its output is a {type(out).__name__} (allowed: one tensor with "
                "a leading batch dimension for a Fisher operator)"
            )
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, op.params, grad_outputs=u, create_graph=True,
                                  allow_unused=True)
        jtu_used = [(i, g) for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        n = out.shape[0]
        labels = [y[:, s] for s in range(y.shape[1])] if self.sampled else [y]
        f = out.detach().requires_grad_(True)
        r = []
        for ys in labels:
            (grad_f,) = torch.autograd.grad(op.loss_fn(f, ys), f)
            r.append(grad_f * n)  # row i of the mean loss's gradient is r_i / n
        return out, u, jtu_used, torch.stack(r)

    def apply(self, op, built, vs, retain, batched):
        out, u, jtu, r = built
        zeros = [torch.zeros_like(p) for p in op.params]
        if not jtu:  # the outputs do not depend on w
            return zeros
        (jv,) = torch.autograd.grad([g for _, g in jtu], u,
                                    grad_outputs=[vs[i] for i, _ in jtu], retain_graph=True)
        n, S = out.shape[0], r.shape[0]
        dots = (r * jv).reshape(S, n, -1).sum(dim=2)  # r_is^T (J v)_i
        coeff = (r * dots.view(S, n, *([1] * (r.dim() - 2)))).sum(dim=0) / (n * S)
        fv = torch.autograd.grad(out, op.params, grad_outputs=coeff, retain_graph=retain,
                                 allow_unused=True)
        return [z if g is None else g for z, g in zip(zeros, fv, strict=True)]


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher of ``loss_fn(model(x), y)`` over ``data``, at the given labels.

    .. math::
        F_\mathrm{emp}\, v = \frac{1}{N}\sum_{i=1}^N g_i \,(g_i^\top v), \qquad
        g_i = \nabla_w \ell\big(f(x_i; w), y_i\big)

    positive semi-definite, of rank at most :math:`N`. Not the Fisher information and not a
    curvature of the loss in general (see the module's text): it is the second moment of the
    per-example gradients, what Adam's and Fisher-SAM's diagonals estimate.

    ``loss_fn`` must be the mean over the batch of per-example losses (``nn.CrossEntropyLoss()``,
    ``nn.MSELoss()``) and the examples must not interact (``model.eval()`` with BatchNorm). The
    model's output must be one tensor with the batch on dimension 0. Data, weighting, the
    cache, seeds and the determinism check are those of
    :class:`~samkit.curvature.CurvatureOperator` (arguments as for
    :class:`~samkit.curvature.HessianOperator`).

    ``process_group`` (as for :class:`~samkit.curvature.HessianOperator`): under data
    parallelism :math:`N` counts the examples of all ranks and the sum runs over all of them,
    :math:`F_\mathrm{emp} = \sum_r \frac{n_r}{N} F_{\mathrm{emp},r}` (one all-reduce per
    product), the same on every rank; DDP and FSDP2 models as for the Hessian.

    Example::

        F = EmpiricalFisherOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
        top = top_eigenvalues(F, k=1, tol=1e-4)

    References:
        F. Kunstner, L. Balles, P. Hennig. Limitations of the Empirical Fisher Approximation
        for Natural Gradient Descent. NeurIPS 2019.
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
                         product=FisherProduct(sampled=False), cache=cache,
                         process_group=process_group)


def _likelihood(loss_fn: Any, likelihood: str | None) -> str:
    """The likelihood named, or the one ``loss_fn`` is the negative log of (up to a constant)."""
    if likelihood is not None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"Invalid likelihood: {likelihood!r} (allowed: {', '.join(LIKELIHOODS)})"
            )
        return likelihood
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean" or loss_fn.weight is not None or loss_fn.label_smoothing:
            raise ValueError(
                "Invalid loss_fn: a CrossEntropyLoss with reduction="
                f"{loss_fn.reduction!r}, weight={'set' if loss_fn.weight is not None else None}, "
                f"label_smoothing={loss_fn.label_smoothing} is not the mean negative "
                "log-likelihood of a categorical (allowed: nn.CrossEntropyLoss(), or pass "
                "likelihood= explicitly)"
            )
        return "categorical"
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise ValueError(
                f"Invalid loss_fn: MSELoss(reduction={loss_fn.reduction!r}) (allowed: "
                "reduction='mean', or pass likelihood= and variance= explicitly)"
            )
        return "gaussian"
    raise ValueError(
        f"Invalid likelihood: None with loss_fn {type(loss_fn).__name__} (allowed: "
        f"{', '.join(LIKELIHOODS)}; it can be left out only for nn.CrossEntropyLoss and "
        "nn.MSELoss)"
    )


class MCFisherOperator(CurvatureOperator):
    r"""The Monte-Carlo Fisher of a model: per-example gradients at labels sampled from the
    model's predictive distribution, ``samples`` per example, drawn once at construction.

    .. math::
        F_\mathrm{MC}\, v = \frac{1}{NS}\sum_{i=1}^N\sum_{s=1}^S g_i(\hat y_{is})
        \big(g_i(\hat y_{is})^\top v\big), \qquad \hat y_{is} \sim p(\cdot \mid f(x_i; w))

    an unbiased estimate of the Fisher :math:`F`, which for these likelihoods equals the GGN
    (:class:`~samkit.curvature.GGNOperator`); its error falls as :math:`1/\sqrt{S}`.

    Likelihoods (``loss_fn`` must be its negative log-likelihood, up to a constant, as the
    mean over the batch):

    * ``"categorical"``: :math:`p = \mathrm{softmax}(f)` for outputs ``(n, C)`` and
      ``nn.CrossEntropyLoss()``; :math:`\hat y` are class indices.
    * ``"gaussian"``: :math:`\hat y = f + \sigma\,\xi`, :math:`\xi \sim \mathcal N(0, I)`, with
      :math:`\sigma^2` = ``variance``. For ``nn.MSELoss()`` (the mean over the :math:`C`
      outputs of an example, :math:`\ell = \|f - y\|^2 / C`) the default
      :math:`\sigma^2 = C/2` makes :math:`\ell = -\log p + \text{const}`; for another scaling
      pass the matching ``variance`` (:math:`\ell = \frac12\|f-y\|^2` needs 1), else the
      estimate is off by a constant factor.

    ``likelihood=None`` takes it from ``loss_fn`` (``nn.CrossEntropyLoss()``: categorical,
    ``nn.MSELoss()``: Gaussian). The labels of batch ``b`` are drawn from the model's output at
    construction (the model in the mode the caller set, batch ``b`` with the random generator
    at ``seed + b`` in training mode, like every product), by a generator seeded with
    ``seed`` that draws once for every example (``S`` uniforms each, the categorical label
    being the inverse of the softmax's distribution function at them; ``S`` standard normal
    outputs each for the Gaussian), example :math:`j` taking row :math:`j`: the same labels on
    every run and every process, kept in :attr:`labels` (one ``(n_b, S, ...)`` tensor per
    batch). The data are read once here and kept with the labels
    (a ``DataLoader`` becomes a list of its batches); the operator stays the Fisher of the
    weights at construction's labels, so build a new one after the weights change.

    The examples must not interact (``model.eval()`` with BatchNorm); the output must be one
    tensor with the batch on dimension 0. Data, weighting, the cache and the determinism check
    as for :class:`~samkit.curvature.HessianOperator`.

    ``process_group`` (as for :class:`~samkit.curvature.HessianOperator`): under data
    parallelism the operator is the Monte-Carlo Fisher of the union of the ranks' data (one
    all-reduce per product, one more at construction for the ranks' example counts). The
    examples of the union are numbered rank by rank (then batch by batch) and each rank takes
    its rows of the one draw for all :math:`N` examples, so the labels, and every number, are
    those of one process over the union with its batches in rank order (the same ``seed``;
    with dropout in training mode the masks follow each rank's own batch numbers, as for every
    operator), on every rank.

    Args:
        samples: label sets per example (>= 1); the product's cost hardly depends on it (one
            :math:`Jv`, one :math:`J^\top c` per batch).
        likelihood: ``"categorical"``, ``"gaussian"`` or ``None`` (from ``loss_fn``).
        variance: the Gaussian's :math:`\sigma^2` (> 0); ``None``: :math:`C/2`.

    Example::

        F = MCFisherOperator(model.eval(), nn.CrossEntropyLoss(), (x, y), samples=10)
        top = top_eigenvalues(F, k=1, tol=1e-4)

    References:
        J. Martens. New Insights and Perspectives on the Natural Gradient Method. JMLR 21,
        2020 (sections 9.2, 11).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        samples: int = 1,
        likelihood: str | None = None,
        variance: float | None = None,
        params: Iterable[Tensor] | None = None,
        cache: bool = True,
        seed: int = 0,
        check_deterministic: bool | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        samples = check_int("samples", samples, 1)
        self.likelihood = _likelihood(loss_fn, likelihood)
        if variance is not None:
            ok = isinstance(variance, (int, float)) and float(variance) > 0
            if not (ok and float(variance) < float("inf")) or self.likelihood != "gaussian":
                raise ValueError(
                    f"Invalid variance: {variance!r} (allowed: a finite number > 0, with the "
                    "gaussian likelihood only)"
                )
        self.samples = samples
        self.variance = None if variance is None else float(variance)
        self.labels: list[Tensor] = []
        super().__init__(model, loss_fn, data, params, seed, check_deterministic,
                         product=FisherProduct(sampled=True), cache=cache,
                         process_group=process_group)

    def _read_data(self, data: Any) -> Batches:
        """``data`` with its labels replaced by ``samples`` labels per example drawn from the
        model's outputs (in full weights under FSDP2; no collective per batch): example
        :math:`j` of the union (ranks in order, then batches, then rows) takes row :math:`j`
        of one draw for all :math:`N` examples from a generator seeded with ``seed``."""
        batches = Batches(data, self.device)
        xs, outs = [], []
        with torch.no_grad(), ExitStack() as stack:
            if self.full_weights is not None:
                stack.enter_context(self.full_weights.swapped())
            for b, (x, _, _) in enumerate(batches):
                with untouched(self.model), fixed_rng(self.device, self.seed + b,
                                                      self.model.training):
                    f = self.model(x)
                self._check_output(f)
                xs.append(x)
                outs.append(f.detach())
        n = sum(f.shape[0] for f in outs)
        offset, total = _n_before(self.process_group, n, self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        if self.likelihood == "categorical":
            noise = torch.rand((total, self.samples), generator=generator, device=self.device,
                               dtype=torch.float64)
        else:
            noise = torch.randn((total, self.samples, *outs[0].shape[1:]), generator=generator,
                                device=self.device, dtype=outs[0].dtype)
        noise = noise[offset : offset + n]
        sampled = []
        start = 0
        for x, f in zip(xs, outs, strict=True):
            yhat = self._draw(f, noise[start : start + f.shape[0]])
            start += f.shape[0]
            self.labels.append(yhat)
            sampled.append((x, yhat))
        return Batches(sampled, self.device)

    def _check_output(self, f: Any) -> None:
        if not isinstance(f, Tensor) or f.dim() == 0:
            raise ValueError(
                f"Invalid model: its output is a {type(f).__name__} (allowed: one tensor with a "
                "leading batch dimension for a Fisher operator)"
            )
        if not bool(torch.isfinite(f).all()):
            raise ValueError("Invalid model: its output holds NaN or inf (allowed: finite)")
        if self.likelihood == "categorical" and f.dim() != 2:
            raise ValueError(
                f"Invalid model: output shape {tuple(f.shape)} for the categorical "
                "likelihood (allowed: (n, C) logits)"
            )

    def _draw(self, f: Tensor, noise: Tensor) -> Tensor:
        """``samples`` labels per example, ``(n, S, ...)``, from the predictive distribution,
        given this batch's rows of the draw: uniforms ``(n, S)`` (categorical: the inverse of
        the softmax's distribution function) or standard normals ``(n, S, ...)``."""
        if self.likelihood == "categorical":
            cdf = torch.cumsum(torch.softmax(f.to(torch.float64), dim=1), dim=1)
            labels = torch.searchsorted(cdf, noise.contiguous(), right=True)
            return labels.clamp_(max=f.shape[1] - 1)
        per_example = f[0].numel() if f.shape[0] else 1
        variance = per_example / 2 if self.variance is None else self.variance
        return f[:, None] + variance**0.5 * noise


def _n_before(group: Any, n: int, device: torch.device) -> tuple[int, int]:
    """The examples of the ranks before this one in ``group`` and of all of them (one
    all-reduce of a vector of the ranks' counts); ``(0, n)`` without a group."""
    if group is None:
        return 0, n
    import torch.distributed as dist

    counts = torch.zeros(dist.get_world_size(group), dtype=torch.float64, device=device)
    counts[dist.get_rank(group)] = n
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return int(counts[: dist.get_rank(group)].sum()), int(counts.sum())


__all__ = ["EmpiricalFisherOperator", "FisherProduct", "MCFisherOperator"]
