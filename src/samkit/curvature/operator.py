r"""The Hessian of a model's loss as a linear operator, applied by Hessian-vector products.

.. math::
    H = \nabla^2_w L(w), \qquad L(w) = \sum_b \frac{n_b}{N} \, \ell\big(f(x_b; w), y_b\big)

over the batches :math:`(x_b, y_b)` of ``data`` (:math:`n_b` examples each, :math:`N` in all).
:math:`H v` is computed batch by batch, never forming :math:`H` (:math:`d \times d` for
:math:`d` parameters), so the memory is that of one batch's gradient graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from samkit.curvature._data import Batches, LossFn, fixed_rng, resolve_params, untouched

BACKENDS = ("auto", "func", "autograd")


class LinearOperator:
    r"""A symmetric linear map on the flattened parameters, :math:`\mathbb{R}^d \to \mathbb{R}^d`.

    ``A @ v`` takes a flat vector of shape ``(d,)``, a matrix ``(d, k)`` (applied column by
    column) or a list of tensors shaped like the parameters (the result then has the same form).
    ``matvecs`` counts the products (one per vector) since construction; it may be reset to 0.
    Subclasses implement :meth:`_matvec` on one flat vector in the operator's dtype and device.
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device):
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.dim = sum(self.numels)
        self._dtype = dtype
        self._device = torch.device(device)
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat vector (dtype and device of ``A``)."""
        if len(tensors) != len(self.shapes):
            raise ValueError(
                f"Invalid vector: a list of {len(tensors)} tensors (allowed: {len(self.shapes)} "
                "tensors shaped like the parameters)"
            )
        for i, (t, s) in enumerate(zip(tensors, self.shapes, strict=True)):
            if t.shape != s:
                raise ValueError(f"Invalid vector: entry {i} has shape {tuple(t.shape)}, not {s}")
        return torch.cat([t.reshape(-1) for t in tensors]).to(self.device, self.dtype)

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Views of a flat ``(d,)`` vector shaped like the parameters."""
        return [t.view(s) for t, s in zip(torch.split(v, self.numels), self.shapes, strict=True)]

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(v, (list, tuple)):
            return self.unflatten(self._apply(self.flatten(v)))
        if not isinstance(v, Tensor):
            raise ValueError(
                f"Invalid vector: {type(v).__name__} (allowed: a tensor of shape ({self.dim},) or "
                f"({self.dim}, k), or a list of tensors shaped like the parameters)"
            )
        if v.dim() in (1, 2) and v.shape[0] == self.dim and v.dtype != self.dtype:
            raise TypeError(
                f"Invalid vector: dtype {v.dtype} (allowed: the operator's dtype {self.dtype}; "
                "cast it explicitly, samkit does not cast silently)"
            )
        if v.dim() == 1 and v.shape[0] == self.dim:
            return self._apply(v.to(self.device))
        if v.dim() == 2 and v.shape[0] == self.dim:
            return self._matmat(v.to(self.device))
        raise ValueError(
            f"Invalid vector: shape {tuple(v.shape)} (allowed: ({self.dim},) or ({self.dim}, k))"
        )

    matvec = __matmul__

    def _matmat(self, v: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(d, k)``: one product per column (subclasses may
        batch them); ``matvecs`` grows by ``k``."""
        return torch.stack([self._apply(v[:, j]) for j in range(v.shape[1])], dim=1)

    def _apply(self, v: Tensor) -> Tensor:
        out = self._matvec(v)
        self.matvecs += 1
        return out

    def to_scipy(self, dtype: Any = "float64"):
        """A ``scipy.sparse.linalg.LinearOperator`` that calls this operator (for ``eigsh``).

        ``dtype`` (a numpy dtype, default float64 so that ARPACK's own arithmetic is in
        double) is what scipy sees; the products are computed in the operator's own dtype on
        its device, each one a host round trip. ``None``: the operator's dtype.
        """
        import numpy as np

        from samkit._extras import require

        require("curvature", "scipy", what=f"{type(self).__name__}.to_scipy()")
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = (
            np.dtype(dtype) if dtype is not None else torch.empty(0, dtype=self.dtype).numpy().dtype
        )

        def mv(x):
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(x).reshape(-1)))
            out = self._apply(t.to(self.device, self.dtype))
            return out.detach().cpu().numpy().astype(np_dtype, copy=False)

        return ScipyLinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, device={self.device})"


def loss_and_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    params: Sequence[Tensor],
    batches: Iterable[tuple[Any, Any, int]],
    seed: int = 0,
    shift: Sequence[Tensor] | Tensor | None = None,
) -> tuple[float, list[Tensor]]:
    r"""The mean loss and its gradient over ``batches`` at :math:`w + \text{shift}`.

    .. math::
        L(w) = \sum_b \frac{n_b}{N}\,\ell_b(w), \qquad
        \nabla L(w) = \sum_b \frac{n_b}{N}\,\nabla \ell_b(w)

    The one loss-and-gradient of samkit's measurements (the curvature operators,
    :func:`samkit.sharpness`, the edge tracker): batches weighted by size, batch ``b`` run
    with the random generator seeded to ``seed + b`` when the model is in training mode (fixed
    dropout masks), BatchNorm running statistics untouched, frozen parameters in ``params``
    differentiated all the same. ``batches`` yields ``(x, y, n)`` on the parameters' device (a
    :class:`~samkit.curvature._data.Batches`). ``shift`` (a flat ``(d,)`` vector or tensors
    shaped like ``params``) is added to the weights for the evaluation and taken off again
    exactly (the weights are copied back bit for bit, also on error); ``.grad`` is not
    touched. The loss is accumulated in float64 and returned as a float, which may be NaN or
    inf: the callers decide what a non-finite loss means.
    """
    params = list(params)
    backup = None
    if shift is not None:
        if isinstance(shift, Tensor):
            numels = [p.numel() for p in params]
            shift = [t.view_as(p) for t, p in zip(torch.split(shift, numels), params, strict=True)]
        backup = [p.detach().clone() for p in params]
    total = 0
    loss_sum: Tensor | None = None
    grads = [torch.zeros_like(p) for p in params]
    training = model.training
    device = params[0].device
    frozen = [p for p in params if not p.requires_grad]
    try:
        if shift is not None:
            with torch.no_grad():
                torch._foreach_add_(params, [t.to(p) for t, p in zip(shift, params, strict=True)])
        for p in frozen:
            p.requires_grad_(True)
        for b, (x, y, n) in enumerate(batches):
            with untouched(model), fixed_rng(device, seed + b, training), torch.enable_grad():
                loss = loss_fn(model(x), y)
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            used = [(acc, g) for acc, g in zip(grads, gs, strict=True) if g is not None]
            if used:
                torch._foreach_add_([a for a, _ in used], [g for _, g in used], alpha=float(n))
            part = loss.detach().to(torch.float64) * n
            loss_sum = part if loss_sum is None else loss_sum + part
            total += n
    finally:
        for p in frozen:
            p.requires_grad_(False)
        if backup is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
    if total == 0 or loss_sum is None:
        raise ValueError("Invalid data: the batches hold 0 examples (allowed: at least 1)")
    torch._foreach_div_(grads, float(total))
    return float(loss_sum) / total, grads


class CurvatureOperator(LinearOperator):
    r"""The base of the curvature operators of a model's loss (after curvlinops'
    ``CurvatureLinearOperator``): what every one of them shares lives here, once.

    .. math::
        A v = \sum_b \frac{n_b}{N} \, A_b v

    * **data**: one ``(x, y)`` batch or a re-iterable collection of them (see
      :class:`~samkit.curvature._data.Batches`), moved to the parameters' device; batch ``b``
      weighted by its size :math:`n_b / N` (``loss_fn`` is the mean over its batch);
    * **parameters**: ``params`` resolved against the model (default: those with
      ``requires_grad``; frozen ones may be asked for and stay frozen);
    * **model state**: BatchNorm running statistics untouched, the random generator seeded to
      ``seed + b`` for batch ``b`` in training mode (fixed dropout masks);
    * **guards**: non-finite weights refused; a determinism check at construction (two
      products of one random vector must agree, else ``ValueError`` naming the likely cause);
    * **a cache key** over every tensor the loss depends on: all the model's parameters and
      buffers (those outside ``params`` and frozen ones too) and those of ``loss_fn`` when it
      is a module, plus every module's mode;
    * **products counted** in ``matvecs``, ``(d, k)`` blocks applied by a batched product
      (:meth:`_batch_products`) where a subclass has one;
    * :meth:`loss_and_gradient` of the same loss (what :func:`samkit.sharpness` and the edge
      tracker use).

    Subclasses implement :meth:`_batch_product` (one batch, one vector, parameter-shaped
    tensors in and out) and may override :meth:`_batch_products` (one batch, ``k`` vectors
    stacked on a leading dimension) and :meth:`_pass` (e.g. to cache a graph).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Iterable[Tensor] | None = None,
        seed: int = 0,
        check_deterministic: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} (allowed: a torch.nn.Module)")
        if not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (allowed: a callable (output, y))")
        self.model = model
        self.loss_fn = loss_fn
        self.names, self.params = resolve_params(model, params)
        super().__init__(
            [p.shape for p in self.params], self.params[0].dtype, self.params[0].device
        )
        self.batches = Batches(data, self.device)
        self.seed = int(seed)
        self.batched = True  # whether (d, k) blocks go through _batch_products
        self.batched_error: BaseException | None = None
        bad = [n for n, p in zip(self.names, self.params, strict=True)
               if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(
                f"Invalid model: parameters {bad} hold NaN or inf (allowed: finite weights)"
            )
        if check_deterministic is None:
            check_deterministic = self.batches.single is None or any(
                m.training for m in model.modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))
            )
        if check_deterministic:
            self._check_deterministic()

    # -- what the subclasses provide ----------------------------------------------------------

    def _batch_product(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        """:math:`A_b v` for one batch, ``vs`` shaped like the parameters."""
        raise NotImplementedError

    def _batch_products(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        """:math:`A_b V` for one batch and ``k`` vectors (each entry of ``vs`` has a leading
        dimension ``k``); ``NotImplementedError`` where a subclass has no batched form."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------

    @contextmanager
    def _differentiable(self) -> Iterator[None]:
        """Let autograd differentiate every chosen parameter, frozen ones included."""
        frozen = [p for p in self.params if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            with torch.enable_grad():
                yield
        finally:
            for p in frozen:
                p.requires_grad_(False)

    @contextmanager
    def _batch_context(self, b: int) -> Iterator[None]:
        """Batch ``b``: running statistics untouched, the generator seeded to ``seed + b``."""
        with untouched(self.model), fixed_rng(self.device, self.seed + b, self.model.training):
            yield

    def _state_key(self) -> tuple:
        """Changes whenever a tensor the loss depends on is written in place or replaced, or a
        module changes mode: every parameter and buffer of the model (not only ``params``:
        a frozen layer or one left out of ``params`` changes the loss too) and of ``loss_fn``
        when it is a module (a class weight, say)."""
        modules = [self.model] + ([self.loss_fn] if isinstance(self.loss_fn, nn.Module) else [])
        tensors = [*self.params]
        for m in modules:
            tensors += [*m.parameters(), *m.buffers()]
        return (
            tuple(t._version for t in tensors),
            tuple(t.data_ptr() for t in tensors),
            tuple(m.training for mod in modules for m in mod.modules()),
        )

    def _accumulate(self, product, like: Sequence[Tensor]) -> list[Tensor]:
        """:math:`\\sum_b (n_b/N)\\,` ``product(x_b, y_b)`` (tensors shaped like ``like``)."""
        if self.batches.single is not None:
            ((x, y, _),) = iter(self.batches)
            with self._batch_context(0):
                return list(product(x, y))
        out = [torch.zeros_like(t) for t in like]
        total = 0
        for b, (x, y, n) in enumerate(self.batches):
            with self._batch_context(b):
                part = product(x, y)
            torch._foreach_add_(out, list(part), alpha=float(n))
            total += n
        torch._foreach_div_(out, float(total))
        return out

    def _pass(self, v: Tensor) -> Tensor:
        """:math:`A v` for one flat vector (every batch once)."""
        vs = self.unflatten(v)
        out = self._accumulate(lambda x, y: self._batch_product(x, y, vs), vs)
        return torch.cat([h.reshape(-1) for h in out])

    def _pass_many(self, V: Tensor) -> Tensor:
        """:math:`A V` for a ``(d, k)`` block, every batch once for all ``k`` columns."""
        k = V.shape[1]
        vt = V.T.contiguous()  # (k, d): row j is column j
        vs = [t.view(k, *s) for t, s in zip(torch.split(vt, self.numels, dim=1), self.shapes,
                                            strict=True)]
        out = self._accumulate(lambda x, y: self._batch_products(x, y, vs), vs)
        return torch.cat([h.reshape(k, -1) for h in out], dim=1).T

    def _matvec(self, v: Tensor) -> Tensor:
        return self._pass(v)

    def _matmat(self, v: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(d, k)``: one batched product per batch (a single
        backward pass with ``is_grads_batched`` for the Hessian) where the subclass has one,
        else column by column; ``matvecs`` grows by ``k`` either way. If the batched form
        fails (an op without a batching rule; not out of memory) the operator goes column by
        column from then on, with a warning, and ``batched_error`` keeps the error."""
        if self.batched and v.shape[1] > 1:
            try:
                out = self._pass_many(v)
            except NotImplementedError as err:
                if type(self)._batch_products is CurvatureOperator._batch_products:
                    self.batched = False  # the subclass has no batched form: no warning
                else:
                    self._batched_failed(err)
            except RuntimeError as err:
                if "out of memory" in str(err).lower():
                    raise
                self._batched_failed(err)
            else:
                self.matvecs += v.shape[1]
                return out
        return super()._matmat(v)

    def _batched_failed(self, err: BaseException) -> None:
        self.batched = False
        self.batched_error = err
        warnings.warn(
            f"{type(self).__name__}: the batched product failed ({err}); applying (d, k) "
            "blocks column by column from now on",
            UserWarning,
            stacklevel=4,
        )

    def _check_deterministic(self) -> None:
        """Two products of one random vector must agree (curvlinops' check): otherwise the
        operator is not one fixed matrix and no eigenvalue of it means anything."""
        g = torch.Generator(device=self.device).manual_seed(self.seed + 7919)
        v = torch.randn(self.dim, generator=g, device=self.device, dtype=self.dtype)
        a = self._matvec(v)
        b = self._matvec(v)
        self.clear_cache()
        scale = float(torch.linalg.vector_norm(a)) + torch.finfo(self.dtype).tiny
        diff = float(torch.linalg.vector_norm(a - b)) / scale
        if not diff <= 1e3 * torch.finfo(self.dtype).eps:
            modes = sorted({type(m).__name__ for m in self.model.modules() if m.training and
                            isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))})
            raise ValueError(
                f"Invalid operator: two products of the same vector differ by {diff:.2e} "
                "(relative): the loss is not one fixed function of the weights. Likely causes: "
                + (f"{', '.join(modes)} in training mode (call model.eval()); " if modes else "")
                + "a DataLoader that shuffles or augments (use shuffle=False and fixed data), "
                "or a non-deterministic model"
            )

    def clear_cache(self) -> None:
        """Drop any cached graph (it is rebuilt at the next product)."""

    def loss_and_gradient(
        self, shift: Sequence[Tensor] | Tensor | None = None
    ) -> tuple[float, list[Tensor]]:
        r""":math:`L(w + \text{shift})` and :math:`\nabla L(w + \text{shift})` over the
        operator's data, batches and seeds (see :func:`loss_and_gradient`)."""
        return loss_and_gradient(
            self.model, self.loss_fn, self.params, self.batches, self.seed, shift
        )


class HessianOperator(CurvatureOperator):
    r"""The Hessian of ``loss_fn(model(x), y)``, averaged over ``data``, with respect to ``params``.

    .. math::
        H v = \sum_b \frac{n_b}{N} \, \nabla^2_w \ell_b(w) \, v

    Each product runs every batch once; the batches are weighted by their size (``loss_fn``
    must return the **mean** loss over its batch, as ``nn.CrossEntropyLoss()`` does), so a data
    set in chunks gives the Hessian of the mean loss over all of it with the memory of one
    chunk. Batches are moved to the parameters' device. Products are taken at the weights the
    model has at that moment.

    Backends:

    * ``"autograd"``: reverse-over-reverse (double backward),
      :math:`Hv = \nabla_w \langle \nabla_w L, v \rangle`. With one batch and ``cache=True``
      the graph of :math:`\nabla_w L` is built once and each product is a single backward pass
      through it (1.44x the cost of a gradient on the MLP of ``benchmarks/curvature.py``);
      the graph is rebuilt when any parameter or buffer of the model (frozen ones and those
      outside ``params`` included) or of ``loss_fn`` is modified in place, or a module changes
      mode, and it is held (the memory of one batch's double-backward graph) while the operator
      lives. Over several batches each product recomputes every batch.
    * ``"func"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` over
      ``functional_call``; nothing is kept between products. It needs forward-mode formulas for
      every op of the model.
    * ``"auto"`` (default): ``"autograd"``, and ``"func"`` if double backward fails (an op
      without a double-backward formula). ``backend_in_use`` says which one runs. The order
      follows measurement: on CPU (torch 2.13, that MLP, 2000 images) forward-over-reverse
      cost 2.9x a gradient and recomputed double backward 2.5x (see
      BENCHMARKS.md).

    Model state: the model is used **in the mode the caller set** and is never changed.

    * ``model.eval()`` (the usual choice): dropout is off and BatchNorm uses its running
      statistics, so :math:`H` is the Hessian of the deterministic network.
    * ``model.train()``: BatchNorm normalizes with the statistics of each batch (each chunk is a
      separate batch) but its running statistics are *not* updated; dropout draws its masks
      from a generator reseeded identically at every product (batch ``b`` with ``seed + b``;
      the caller's generator state is restored), so :math:`H` is one fixed symmetric matrix:
      the Hessian of the loss with those masks.

    Neither the parameters nor their ``.grad`` are touched.

    A ``(d, k)`` block ``H @ V`` is one batched backward pass per batch
    (``torch.autograd.grad(..., is_grads_batched=True)`` through one gradient graph; a
    ``torch.func.vmap`` of the forward-over-reverse product with ``"func"``), not ``k``
    products; block Lanczos uses it.

    Built on :class:`CurvatureOperator` (data, weighting, seeds, the determinism check, the
    cache key, :meth:`loss_and_gradient`).

    Args:
        model: the network; its parameters must share one device and one floating dtype.
        loss_fn: ``loss_fn(model(x), y)`` returns the mean loss over the batch.
        data: one ``(x, y)`` batch, or a re-iterable collection of them (a list, a
            ``DataLoader``; not a one-shot generator, the data are read at every product).
        params: the parameters to differentiate (default: those with ``requires_grad``); the
            others are held fixed.
        backend: ``"auto"``, ``"autograd"`` or ``"func"``.
        cache: keep one batch's gradient graph between products (``"autograd"`` only).
        seed: the dropout seed in training mode.
        check_deterministic: compute two products of one random vector at construction and
            raise ``ValueError`` if they differ (BatchNorm / dropout in training mode, a
            shuffling loader). ``None`` (default): checked when the data are not one batch or
            a BatchNorm / dropout module is in training mode (an eval-mode model on one
            tensor batch is deterministic by construction). The check's products are not
            counted in ``matvecs``.

    Example::

        H = HessianOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
        Hv = H @ torch.randn(H.shape[0])
        top = top_eigenvalues(H, k=1, tol=1e-4)
    """


    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Iterable[Tensor] | None = None,
        backend: str = "auto",
        cache: bool = True,
        seed: int = 0,
        check_deterministic: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (allowed: {', '.join(BACKENDS)})")
        self.backend = backend
        self.backend_in_use = "func" if backend == "func" else "autograd"
        self.backend_error: BaseException | None = None
        self.cache = bool(cache)
        self._graph: list[tuple[int, Tensor]] | None = None
        self._graph_key: tuple | None = None
        super().__init__(model, loss_fn, data, params, seed, check_deterministic)

    # -- one batch ----------------------------------------------------------------------------

    def _loss_of(self, x: Any, y: Any):
        model, loss_fn, names = self.model, self.loss_fn, self.names

        def loss_of(ps: tuple[Tensor, ...]) -> Tensor:
            return loss_fn(functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

        return loss_of

    def _hvp_func(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        primals = tuple(p.detach() for p in self.params)
        _, hv = torch.func.jvp(torch.func.grad(self._loss_of(x, y)), (primals,), (tuple(vs),))
        return hv

    def _hvps_func(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        primals = tuple(p.detach() for p in self.params)
        grad = torch.func.grad(self._loss_of(x, y))

        def one(*ts: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad, (primals,), (ts,))[1]

        return torch.func.vmap(one, randomness="same")(*vs)

    def _gradient_graph(self, x: Any, y: Any) -> list[tuple[int, Tensor]]:
        """``(i, dL/dw_i)`` with ``create_graph=True``, for the gradients that depend on ``w``."""
        with self._differentiable():
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def _backward_through(
        self, graph: list[tuple[int, Tensor]], vs: Sequence[Tensor], retain: bool,
        batched: bool = False,
    ) -> list[Tensor]:
        """One backward pass through the gradient graph with ``vs`` (``k`` of them stacked on
        a leading dimension when ``batched``)."""
        k = vs[0].shape[0] if batched else None
        shape = (lambda p: (k, *p.shape)) if batched else (lambda p: p.shape)
        if not graph:  # the gradient does not depend on w: H = 0
            return [p.new_zeros(shape(p)) for p in self.params]
        with self._differentiable():
            hv = torch.autograd.grad(
                [g for _, g in graph],
                self.params,
                grad_outputs=[vs[i] for i, _ in graph],
                retain_graph=retain,
                allow_unused=True,
                is_grads_batched=batched,
            )
        return [
            p.new_zeros(shape(p)) if h is None else h for p, h in zip(self.params, hv, strict=True)
        ]

    def _hvp_autograd(self, x: Any, y: Any, vs: Sequence[Tensor]) -> list[Tensor]:
        return self._backward_through(self._gradient_graph(x, y), vs, retain=False)

    def _cached_graph(self) -> list[tuple[int, Tensor]]:
        key = self._state_key()
        if self._graph is None or key != self._graph_key:
            self._graph = None  # free the old graph before building the new one
            ((x, y, _),) = iter(self.batches)
            with self._batch_context(0):
                self._graph = self._gradient_graph(x, y)
            self._graph_key = self._state_key()
        return self._graph

    def _hvp_cached(self, vs: Sequence[Tensor]) -> list[Tensor]:
        return self._backward_through(self._cached_graph(), vs, retain=True)

    def _batch_product(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        if self._current == "func":
            return self._hvp_func(x, y, vs)
        return self._hvp_autograd(x, y, vs)

    def _batch_products(self, x: Any, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        if self._current == "func":
            return self._hvps_func(x, y, vs)
        return self._backward_through(self._gradient_graph(x, y), vs, retain=False, batched=True)

    # -- the whole data set -------------------------------------------------------------------

    def _cached(self, backend: str) -> bool:
        return self.batches.single is not None and backend == "autograd" and self.cache

    def _pass(self, v: Tensor, backend: str | None = None) -> Tensor:
        backend = backend or self.backend_in_use
        if self._cached(backend):
            return torch.cat([h.reshape(-1) for h in self._hvp_cached(self.unflatten(v))])
        self._current = backend
        return super()._pass(v)

    def _pass_many(self, V: Tensor, backend: str | None = None) -> Tensor:
        backend = backend or self.backend_in_use
        if self._cached(backend):
            k = V.shape[1]
            vt = V.T.contiguous()
            vs = [t.view(k, *s) for t, s in
                  zip(torch.split(vt, self.numels, dim=1), self.shapes, strict=True)]
            out = self._backward_through(self._cached_graph(), vs, retain=True, batched=True)
            return torch.cat([h.reshape(k, -1) for h in out], dim=1).T
        self._current = backend
        return super()._pass_many(V)

    _current = "autograd"

    def _with_fallback(self, run, v: Tensor) -> Tensor:
        if self.backend_in_use == "func":
            return run(v, "func")
        try:
            return run(v, "autograd")
        except (RuntimeError, NotImplementedError) as err:
            if (self.backend != "auto" or not _missing_double_backward(err)
                    or _batching_error(err)):
                raise  # an out-of-memory or any other error is not a reason to switch
            self._graph = None
            try:
                out = run(v, "func")
            except Exception:
                raise err from None  # both failed: the double-backward error is the relevant one
            self.backend_error = err
            self.backend_in_use = "func"
            warnings.warn(
                f"HessianOperator: double backward is not available ({err}); using the func "
                "backend (forward-over-reverse) from now on",
                UserWarning,
                stacklevel=4,
            )
            return out

    def _matvec(self, v: Tensor) -> Tensor:
        return self._with_fallback(self._pass, v)

    def _matmat(self, v: Tensor) -> Tensor:
        if self.batched and v.shape[1] > 1:
            try:
                out = self._with_fallback(self._pass_many, v)
            except (RuntimeError, NotImplementedError) as err:
                if not _batching_error(err):
                    raise  # out of memory, a missing double backward under "autograd", ...
                self._batched_failed(err)
            else:
                self.matvecs += v.shape[1]
                return out
        return LinearOperator._matmat(self, v)

    def clear_cache(self) -> None:
        """Drop the cached gradient graph (it is rebuilt at the next product)."""
        self._graph = None
        self._graph_key = None

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", backend={self.backend_in_use!r})"


def _batching_error(err: BaseException) -> bool:
    """Whether ``err`` comes from vmap / a batched backward (an op without a batching rule)."""
    text = str(err).lower()
    return any(s in text for s in ("batching rule", "vmap", "is_grads_batched", "batched grad"))


def _missing_double_backward(err: BaseException) -> bool:
    """Whether ``err`` says that an op has no (double-)backward formula."""
    if isinstance(err, NotImplementedError):
        return True
    text = str(err).lower()
    if "out of memory" in text or _batching_error(err):
        return False
    return any(s in text for s in (
        "derivative for", "not implemented", "double backward", "does not require grad",
        "twice differentiable", "not supported",
    ))


class MatrixOperator(LinearOperator):
    """A dense symmetric ``(d, d)`` matrix as an operator (small problems, tests, references)."""

    def __init__(self, matrix: Tensor) -> None:
        if (
            not isinstance(matrix, Tensor)
            or matrix.dim() != 2
            or matrix.shape[0] != matrix.shape[1]
        ):
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"Invalid matrix: {shape} (allowed: a square 2-d tensor)")
        if not matrix.dtype.is_floating_point:
            raise ValueError(f"Invalid matrix: dtype {matrix.dtype} (allowed: a floating dtype)")
        super().__init__([torch.Size([matrix.shape[0]])], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v


def as_operator(A: Any) -> Any:
    """``A`` itself if it is an operator (anything with ``shape``, ``dtype``, ``device`` and
    ``@``); a :class:`MatrixOperator` for a dense square tensor."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return MatrixOperator(A)
    if all(hasattr(A, a) for a in ("shape", "dtype", "device", "__matmul__")):
        return A
    raise ValueError(
        f"Invalid operator: {type(A).__name__} (allowed: a LinearOperator such as "
        "HessianOperator, or a square tensor)"
    )
