r"""The Hessian of a model's loss as a linear operator, applied by Hessian-vector products.

.. math::
    H = \nabla^2_w L(w), \qquad L(w) = \sum_b \frac{n_b}{N} \, \ell\big(f(x_b; w), y_b\big)

over the batches :math:`(x_b, y_b)` of ``data`` (:math:`n_b` examples each, :math:`N` in all).
:math:`H v` is computed batch by batch, never forming :math:`H` (:math:`d \times d` for
:math:`d` parameters), so the memory is that of one batch's gradient graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from samkit.curvature._data import (
    Batches,
    LossFn,
    batch_mean,
    differentiable,
    fixed_rng,
    resolve_params,
    untouched,
)
from samkit.curvature._dist import (
    DataParallel,
    FullWeights,
    Sharding,
    has_dtensors,
    local_count,
    resolve_group,
    unwrap,
)

BACKENDS = ("auto", "func", "autograd")


class LinearOperator:
    r"""A symmetric linear map on the flattened parameters, :math:`\mathbb{R}^d \to \mathbb{R}^d`.

    ``A @ v`` takes a flat vector of shape ``(d,)``, a matrix ``(d, k)`` (applied column by
    column) or a list of tensors shaped like the parameters (the result then has the same form).
    ``matvecs`` counts the products (one per vector) since construction; it may be reset to 0.
    Subclasses implement :meth:`_matvec` on one flat vector in the operator's dtype and device.

    With a ``sharding`` (:class:`~samkit.curvature._dist.Sharding`, an operator on FSDP2
    parameters) the operator is :math:`d \times d` (``shape``, ``dim``) but each rank holds
    its ``local_dim`` entries of a vector (its blocks of every parameter, ``shapes`` being the
    local blocks' shapes): ``A @ v`` takes and returns local parts, :meth:`reduce_sum` sums a
    local dot over the ranks. Without one, ``local_dim == dim`` and both are the identity.
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device,
                 sharding: Sharding | None = None):
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.local_dim = sum(self.numels)
        self.sharding = sharding
        if sharding is not None and sharding.local_dim != self.local_dim:
            raise ValueError(f"Invalid sharding: {sharding.local_dim} local entries, not "
                             f"{self.local_dim}")
        self.dim = self.local_dim if sharding is None else sharding.dim
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

    def reduce_sum(self, t: Tensor) -> Tensor:
        """A local partial sum (a dot product of local parts) summed over the ranks that hold
        the vectors' parts (one all-reduce); ``t`` itself when the vectors are whole."""
        return t if self.sharding is None else self.sharding.sum(t)

    def local_part(self, v: Tensor) -> Tensor:
        """This rank's part of a full ``(dim, ...)`` vector; ``v`` itself when the vectors are
        whole. Random vectors are drawn in full and cut, so that they are the same vectors
        at every world size."""
        return v if self.sharding is None else self.sharding.local(v)

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
        d = self.local_dim
        if v.dim() in (1, 2) and v.shape[0] == d and v.dtype != self.dtype:
            raise TypeError(
                f"Invalid vector: dtype {v.dtype} (allowed: the operator's dtype {self.dtype}; "
                "cast it explicitly, samkit does not cast silently)"
            )
        if v.dim() == 1 and v.shape[0] == d:
            return self._apply(v.to(self.device))
        if v.dim() == 2 and v.shape[0] == d:
            return self._matmat(v.to(self.device))
        raise ValueError(
            f"Invalid vector: shape {tuple(v.shape)} (allowed: ({d},) or ({d}, k)"
            + (", this rank's part of a sharded vector)" if self.sharding is not None else ")")
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

        if self.sharding is not None:
            raise ValueError(
                f"Invalid operator for to_scipy(): {type(self).__name__} holds sharded vectors "
                "(FSDP2); use samkit's top_eigenvalues, which works on the shards"
            )
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


class UnsupportedProduct(NotImplementedError):
    """A product cannot be formed for this model by this way of computing it: an op without a
    double-backward formula (``"autograd"``), without a forward-mode formula (``"func"``), or,
    with ``batched=True``, without a batching rule (``vmap``, ``is_grads_batched``).

    Raised by :class:`CurvatureOperator` for any error of a :meth:`Product.apply` other than out
    of memory, with torch's error as ``__cause__`` (and ``.error``). The operator classifies by
    this type and by where the error came from, never by the wording of the message: it tries
    its fallback product (``backend="auto"``) or goes column by column. A subclass of
    ``NotImplementedError``, and so of ``RuntimeError``.
    """

    def __init__(self, product: str, error: BaseException, batched: bool = False) -> None:
        kind = "batched product" if batched else "product"
        super().__init__(f"the {product!r} {kind} failed: {type(error).__name__}: {error}")
        self.product, self.error, self.batched = product, error, batched


def loss_and_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    params: Sequence[Tensor],
    batches: Iterable[tuple[Any, Any, int]],
    seed: int = 0,
    shift: Sequence[Tensor] | Tensor | None = None,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[float, list[Tensor]]:
    r"""The mean loss and its gradient over ``batches`` at :math:`w + \text{shift}`.

    .. math::
        L(w) = \sum_b \frac{n_b}{N}\,\ell_b(w), \qquad
        \nabla L(w) = \sum_b \frac{n_b}{N}\,\nabla \ell_b(w)

    The one loss-and-gradient of samkit's measurements (the curvature operators,
    :func:`samkit.sharpness`, the edge tracker), on the same size-weighted mean as every
    curvature product (:func:`~samkit.curvature._data.batch_mean`): batch ``b`` run with the
    random generator seeded to ``seed + b`` when the model is in training mode (fixed dropout
    masks), BatchNorm running statistics untouched, frozen parameters in ``params``
    differentiated all the same. ``batches`` yields ``(x, y, n)`` on the parameters' device (a
    :class:`~samkit.curvature._data.Batches`). ``shift`` (a flat ``(d,)`` vector or tensors
    shaped like ``params``) is added to the weights for the evaluation and taken off again
    exactly (the weights are copied back bit for bit, also on error); ``.grad`` is not
    touched. The loss is accumulated in float64 and returned as a float, which may be NaN or
    inf: the callers decide what a non-finite loss means.

    ``reduce`` (optional) maps the local ``[loss, *grads]`` to their mean over the ranks' data
    (:meth:`samkit.curvature._dist.DataParallel.mean`: one all-reduce), so that every rank
    returns the loss and gradient of the union.
    """
    params = list(params)
    backup = None
    if shift is not None:
        if isinstance(shift, Tensor):
            numels = [p.numel() for p in params]
            shift = [t.view_as(p) for t, p in zip(torch.split(shift, numels), params, strict=True)]
        backup = [p.detach().clone() for p in params]

    def loss_grad(x: Any, y: Any) -> list[Tensor]:
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        return [loss.detach().to(torch.float64), *grads]

    try:
        if shift is not None:
            with torch.no_grad():
                torch._foreach_add_(params, [t.to(p) for t, p in zip(shift, params, strict=True)])
        with differentiable(params):
            loss, *grads = batch_mean(model, batches, seed, params[0].device, loss_grad)
            if reduce is not None:
                loss, *grads = reduce([loss, *grads])
    finally:
        if backup is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
    return float(loss), grads


class Product:
    """How a :class:`CurvatureOperator` forms one batch's product: the strategy it is built with.

    :meth:`build` runs the forward pass of one batch (and whatever can be kept between products:
    a gradient graph); :meth:`apply` applies it to one vector or, with ``batched=True``, to ``k``
    vectors stacked on a leading dimension. Both run with every chosen parameter differentiable
    (frozen ones included); without a cached graph both run inside the batch's context (seeded
    generator, BatchNorm untouched). The operator does the rest: batches, weighting, the cache,
    counting, fallbacks and the classification of errors (:class:`UnsupportedProduct`).

    Class attributes: ``name`` (what ``backend_in_use`` reports), ``cacheable`` (:meth:`build`
    returns a graph worth keeping for one batch; :meth:`apply` is then a pure backward pass),
    ``batchable`` (:meth:`apply` has a batched form). Per instance: ``batched`` (whether the
    batched form is used; turned off when it fails) and ``batched_error``.
    """

    name = "product"
    cacheable = False
    batchable = False

    def __init__(self) -> None:
        self.batched = self.batchable
        self.batched_error: BaseException | None = None

    def build(self, op: CurvatureOperator, x: Any, y: Any) -> Any:
        raise NotImplementedError

    def apply(
        self, op: CurvatureOperator, built: Any, vs: Sequence[Tensor], retain: bool, batched: bool
    ) -> Sequence[Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DoubleBackward(Product):
    r"""Reverse-over-reverse: :math:`Hv = \nabla_w \langle \nabla_w L, v \rangle`, one backward
    pass through the graph of :math:`\nabla_w L` (built with ``create_graph=True``, cacheable);
    ``k`` vectors in one pass with ``is_grads_batched``."""

    name = "autograd"
    cacheable = True
    batchable = True

    def build(self, op: CurvatureOperator, x: Any, y: Any) -> list[tuple[int, Tensor]]:
        """``(i, dL/dw_i)`` with ``create_graph=True``, for the gradients that depend on ``w``."""
        loss = op.loss_fn(op.model(x), y)
        grads = torch.autograd.grad(loss, op.params, create_graph=True, allow_unused=True)
        return [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def apply(self, op, built, vs, retain, batched):
        k = vs[0].shape[0] if batched else None
        shape = (lambda p: (k, *p.shape)) if batched else (lambda p: p.shape)
        if not built:  # the gradient does not depend on w: H = 0
            return [p.new_zeros(shape(p)) for p in op.params]
        hv = torch.autograd.grad(
            [g for _, g in built],
            op.params,
            grad_outputs=[vs[i] for i, _ in built],
            retain_graph=retain,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return [p.new_zeros(shape(p)) if h is None else h
                for p, h in zip(op.params, hv, strict=True)]


class ForwardOverReverse(Product):
    """Forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` over ``functional_call``;
    nothing is kept between products; ``k`` vectors through ``torch.func.vmap``."""

    name = "func"
    batchable = True

    def build(self, op: CurvatureOperator, x: Any, y: Any) -> Any:
        model, loss_fn, names = op.model, op.loss_fn, op.names
        # the parameters outside ``params`` enter as constants (else the product would carry
        # an autograd graph through them)
        chosen = set(names)
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}

        def loss_of(ps: tuple[Tensor, ...]) -> Tensor:
            weights = {**fixed, **dict(zip(names, ps, strict=True))}
            return loss_fn(functional_call(model, weights, (x,)), y)

        return torch.func.grad(loss_of), tuple(p.detach() for p in op.params)

    def apply(self, op, built, vs, retain, batched):
        grad, primals = built

        def one(*ts: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad, (primals,), (ts,))[1]

        return torch.func.vmap(one, randomness="same")(*vs) if batched else one(*vs)


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
    * **the product**: a :class:`Product` chosen at construction (the strategy: double
      backward, forward-over-reverse, Gauss-Newton, ...) and an optional ``fallback`` product,
      used from the first time the product raises :class:`UnsupportedProduct` on;
    * **a cache** of one batch's graph (``cache=True`` and a cacheable product), keyed over
      every tensor the loss depends on: all the model's parameters and buffers (those outside
      ``params`` and frozen ones too) and those of ``loss_fn`` when it is a module, plus every
      module's mode;
    * **guards**: non-finite weights refused; a determinism check at construction (two
      products of one random vector must agree, else ``ValueError`` naming the likely cause);
    * **products counted** in ``matvecs``; a ``(d, k)`` block applied by one batched product
      per batch where the product has a batched form (column by column, with a warning, if it
      fails);
    * :meth:`loss_and_gradient` of the same loss (what :func:`samkit.sharpness` and the edge
      tracker use);
    * **a process group** (``process_group``): under data parallelism the operator is that of
      the union of the ranks' data, :math:`A v = \sum_r \frac{n_r}{N} A_r v`, with
      :math:`n_r` the examples of rank :math:`r` (uneven shards weighted by their size;
      :math:`N` all-reduced once, at construction). Each product is the local one scaled by
      :math:`n_r/N` and summed over the ranks by **one all-reduce**; :meth:`loss_and_gradient`
      by one more. Every rank gets the same numbers (an all-reduce SUM hands every rank the
      same result), and the algorithms on top (:func:`~samkit.curvature.top_eigenvalues`,
      :func:`~samkit.curvature.hessian_trace`, :func:`~samkit.curvature.spectral_density`,
      :func:`~samkit.curvature.effective_hessian`) draw their random vectors from generators
      seeded alike on every rank, so they take the same decisions and return the same values
      everywhere. Every rank must call the same products in the same order (they are
      collectives). A ``DistributedDataParallel`` model is measured through its ``.module``
      (DDP's hooks never run inside ``torch.autograd.grad``);
    * **FSDP2** (``fully_shard``, parameters ``DTensor`` shards ``Shard(0)`` on a 1-d mesh):
      ``torch.autograd.grad`` does not reach the shards (FSDP2 computes with separate unsharded
      tensors and hands their gradients to the shards in its backward hooks), so the products
      run on the full weights: all-gathered into plain tensors (:class:`FullWeights`,
      refreshed at every product where the shards changed), the model run with FSDP's forward
      hooks off, the exact product taken by the same :class:`Product`. Vectors are held like
      the parameters: each rank its rows of every parameter (``local_dim`` of ``dim``
      entries; ``A @ v`` all-gathers the weights and ``v``, all-reduces the product once and
      keeps this rank's rows), so a Lanczos basis takes ``1/world`` of the memory per rank.

    Attributes (besides those of :class:`LinearOperator`): ``model`` (a DDP wrapper's module),
    ``model_params`` (the model's own parameter tensors, the shards under FSDP2: what
    optimizers hold), ``params`` (the tensors differentiated: ``model_params``, or the full
    weights under FSDP2), ``names``, ``process_group`` (the resolved group, ``None`` for this
    process's data), ``data_parallel`` (:class:`~samkit.curvature._dist.DataParallel`, or
    ``None``), ``full_weights`` (FSDP2 only).

    A new curvature operator is a new :class:`Product` (see
    :class:`~samkit.curvature.GGNOperator`); nothing else is overridden, except
    :meth:`_read_data` by an operator on data derived from the given ones
    (:class:`~samkit.curvature.MCFisherOperator`'s sampled labels).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Iterable[Tensor] | None = None,
        seed: int = 0,
        check_deterministic: bool | None = None,
        *,
        product: Product,
        fallback: Product | None = None,
        cache: bool = True,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} (allowed: a torch.nn.Module)")
        model = unwrap(model)
        group = resolve_group(process_group)
        if not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (allowed: a callable (output, y))")
        for name, p in (("product", product), ("fallback", fallback)):
            if not (isinstance(p, Product) or (p is None and name == "fallback")):
                raise ValueError(f"Invalid {name}: {p!r} (allowed: a samkit Product)")
        self.model = model
        self.loss_fn = loss_fn
        self.product = product
        self.fallback = fallback
        self.backend_error: BaseException | None = None
        self.cache = bool(cache)
        self._graph: Any = None
        self._graph_key: tuple | None = None
        self.names, self.model_params = resolve_params(model, params)
        self.params = self.model_params
        self.full_weights: FullWeights | None = None
        sharding = None
        if has_dtensors(self.model_params):  # FSDP2: products on the full weights, vectors
            if isinstance(process_group, str):  # sharded like the parameters
                raise ValueError(
                    "Invalid process_group: 'local' for an FSDP2 model (allowed: None or the "
                    "group of its mesh; its weights are sharded over the ranks)"
                )
            sharding = Sharding(self.model_params)
            group = sharding.group if group is None else group  # a mesh of one rank too
            self.full_weights = FullWeights(model, self.names, self.model_params, sharding)
            self.params = self.full_weights.leaves
        super().__init__(
            [p.shape for p in self.params] if sharding is None else sharding.local_shapes,
            self.params[0].dtype, self.params[0].device, sharding,
        )
        self.full_numels = [p.numel() for p in self.params]
        self.seed = int(seed)
        self.process_group = group
        self.batches = self._read_data(data)
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
        self.data_parallel: DataParallel | None = None
        if group is not None:  # N and the check's decision, agreed by every rank at once
            self.data_parallel = DataParallel(group, local_count(self.batches), self.device,
                                              flags=[float(bool(check_deterministic))])
            check_deterministic = self.data_parallel.flags[0] > 0
        if check_deterministic:
            self._check_deterministic()

    @property
    def backend_in_use(self) -> str:
        """The name of the product in use (``"autograd"``, ``"func"``, ...)."""
        return self.product.name

    @property
    def batched(self) -> bool:
        """Whether ``(d, k)`` blocks go through one batched product per batch."""
        return self.product.batched

    @property
    def batched_error(self) -> BaseException | None:
        """The error that turned the batched form off (``None`` while it works)."""
        return self.product.batched_error

    # -- shared machinery ---------------------------------------------------------------------

    def _read_data(self, data: Any) -> Batches:
        """The batches the products run over (called once by the constructor, after the
        model, parameters, seed and process group are set): ``data`` as it is. An operator
        on data derived from ``data`` (the Monte-Carlo Fisher's sampled labels) overrides it."""
        return Batches(data, self.device)

    @contextmanager
    def _differentiable(self) -> Iterator[None]:
        """Every chosen parameter differentiable inside the block, frozen ones included; for an
        FSDP2 model, its full weights in place of the shards (:class:`FullWeights`)."""
        with ExitStack() as stack:
            if self.full_weights is not None:
                stack.enter_context(self.full_weights.swapped())
            stack.enter_context(differentiable(self.params))
            yield

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

    def _cached_graph(self) -> Any:
        """The product's graph of the one batch, rebuilt when the state key has changed."""
        key = self._state_key()
        if self._graph is None or key != self._graph_key:
            self._graph = None  # free the old graph before building the new one
            ((x, y, _),) = iter(self.batches)
            with self._batch_context(0):
                self._graph = self.product.build(self, x, y)
            self._graph_key = self._state_key()
        return self._graph

    def _products(self, V: Tensor, batched: bool) -> Tensor:
        """:math:`A v` for a flat ``(d,)`` vector, or :math:`A V` for a ``(d, k)`` block in one
        batched product per batch: every batch once, through :attr:`product`."""
        product = self.product
        if self.sharding is not None:  # the full vector(s) from the ranks' parts
            V = self.sharding.gather(V)
        shapes = [p.shape for p in self.params]
        if batched:
            k = V.shape[1]
            vt = V.T.contiguous()  # (k, d): row j is column j
            vs = [t.view(k, *s) for t, s in
                  zip(torch.split(vt, self.full_numels, dim=1), shapes, strict=True)]
        else:
            vs = [t.view(s) for t, s in
                  zip(torch.split(V, self.full_numels), shapes, strict=True)]

        def run(built: Any, retain: bool) -> list[Tensor]:
            try:
                return list(product.apply(self, built, vs, retain, batched))
            except (UnsupportedProduct, torch.cuda.OutOfMemoryError):
                raise  # out of memory is never a reason to change the way of computing
            except RuntimeError as err:  # NotImplementedError included
                raise UnsupportedProduct(product.name, err, batched) from err

        with self._differentiable():
            if self.cache and product.cacheable and self.batches.single is not None:
                out = run(self._cached_graph(), retain=True)
            else:
                out = batch_mean(self.model, self.batches, self.seed, self.device,
                                 lambda x, y: run(product.build(self, x, y), retain=False))
        if self.data_parallel is not None:  # the mean over the ranks' data: one all-reduce
            out = self.data_parallel.mean(out)
        if batched:
            return self.local_part(torch.cat([h.reshape(k, -1) for h in out], dim=1).T)
        return self.local_part(torch.cat([h.reshape(-1) for h in out]))

    def _run(self, V: Tensor, batched: bool = False) -> Tensor:
        """:meth:`_products`, switching to the fallback product (with a warning, for good) the
        first time a single product is unsupported; if the fallback fails too, the first error
        is raised and nothing changes."""
        try:
            return self._products(V, batched)
        except UnsupportedProduct as err:
            if batched or self.fallback is None:
                raise
            failed, self.product = self.product, self.fallback
            self.clear_cache()
            try:
                out = self._products(V, batched)
            except Exception:
                self.product = failed
                raise err from err.error  # both failed: the first product's error is relevant
            self.fallback = None
            self.backend_error = err
            warnings.warn(
                f"{type(self).__name__}: {err}; using the {self.product.name} backend "
                f"({type(self.product).__name__}) from now on",
                UserWarning,
                stacklevel=5,
            )
            return out

    def _matvec(self, v: Tensor) -> Tensor:
        return self._run(v)

    def _matmat(self, v: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(d, k)``: one batched product per batch (a single
        backward pass with ``is_grads_batched`` for the Hessian) where the product has one,
        else column by column; ``matvecs`` grows by ``k`` either way. If the batched form
        fails, one column tells why: if the single product works (or the fallback product
        takes over), the batched form of the failing product is turned off with a warning
        (``batched_error`` keeps torch's error) and the rest goes column by column."""
        product = self.product
        if not (product.batched and v.shape[1] > 1):
            return super()._matmat(v)
        try:
            out = self._run(v, batched=True)
        except UnsupportedProduct as err:
            first = self._apply(v[:, 0])  # raises if the product itself is unsupported
            if self.product is product:  # the single product works: the batching is at fault
                product.batched = False
                product.batched_error = err.error
                warnings.warn(
                    f"{type(self).__name__}: the batched product failed ({err.error}); "
                    "applying (d, k) blocks column by column from now on",
                    UserWarning,
                    stacklevel=4,
                )
            return torch.cat([first[:, None], self._matmat(v[:, 1:])], dim=1)
        self.matvecs += v.shape[1]
        return out

    def _check_deterministic(self) -> None:
        """Two products of one random vector must agree (curvlinops' check): otherwise the
        operator is not one fixed matrix and no eigenvalue of it means anything."""
        g = torch.Generator(device=self.device).manual_seed(self.seed + 7919)
        v = self.local_part(torch.randn(self.dim, generator=g, device=self.device,
                                        dtype=self.dtype))
        a = self._run(v)
        b = self._run(v)
        self.clear_cache()
        sq = self.reduce_sum(torch.stack([a.pow(2).sum(), (a - b).pow(2).sum()]))
        scale = float(sq[0].sqrt()) + torch.finfo(self.dtype).tiny
        diff = float(sq[1].sqrt()) / scale
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
        """Drop the cached graph (it is rebuilt at the next product)."""
        self._graph = None
        self._graph_key = None

    def loss_and_gradient(
        self, shift: Sequence[Tensor] | Tensor | None = None
    ) -> tuple[float, list[Tensor]]:
        r""":math:`L(w + \text{shift})` and :math:`\nabla L(w + \text{shift})` over the
        operator's data, batches and seeds (see :func:`loss_and_gradient`); under a process
        group, over the union of the ranks' data (one all-reduce), the same on every rank.
        The gradient is shaped like :attr:`params`: in full under FSDP2 (and ``shift``, if
        given, too)."""
        reduce = None if self.data_parallel is None else self.data_parallel.mean
        with ExitStack() as stack:
            if self.full_weights is not None:
                stack.enter_context(self.full_weights.swapped())
            return loss_and_gradient(
                self.model, self.loss_fn, self.params, self.batches, self.seed, shift,
                reduce=reduce,
            )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", backend={self.backend_in_use!r})"


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
    cache key, :meth:`loss_and_gradient`); the backends are the products
    :class:`DoubleBackward` and :class:`ForwardOverReverse`, chosen here once. An error is
    classified by where it arises, never by its message: a failure of the second backward pass
    (of the jvp for ``"func"``) is an :class:`UnsupportedProduct`; out of memory is re-raised
    as it is.

    Args:
        model: the network; its parameters must share one device and one floating dtype.
        loss_fn: ``loss_fn(model(x), y)`` returns the mean loss over the batch.
        data: one ``(x, y)`` batch, or a re-iterable collection of them (a list, a
            ``DataLoader``; not a one-shot generator, the data are read at every product).
        params: the parameters to differentiate (default: those with ``requires_grad``); the
            others are held fixed.
        backend: ``"auto"``, ``"autograd"`` or ``"func"``, or a :class:`Product` instance
            (the strategy itself, no fallback).
        cache: keep one batch's gradient graph between products (``"autograd"`` only).
        seed: the dropout seed in training mode.
        check_deterministic: compute two products of one random vector at construction and
            raise ``ValueError`` if they differ (BatchNorm / dropout in training mode, a
            shuffling loader). ``None`` (default): checked when the data are not one batch or
            a BatchNorm / dropout module is in training mode (an eval-mode model on one
            tensor batch is deterministic by construction). The check's products are not
            counted in ``matvecs``.
        process_group: whose data the Hessian is of (torch.distributed's convention).
            ``None`` (default): the default group when ``torch.distributed`` is initialized
            with more than one rank (``data`` is then this rank's shard, and the operator is
            that of the union of the shards, weighted by their sizes: one all-reduce per
            product), else this process's data; a ``ProcessGroup``: that group; ``"local"``:
            this process's data only, whatever the group. A ``DistributedDataParallel``
            model is measured through its module; an FSDP2 model with vectors sharded like
            its parameters (see :class:`CurvatureOperator`).

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
        backend: str | Product = "auto",
        cache: bool = True,
        seed: int = 0,
        check_deterministic: bool | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        if isinstance(backend, Product):
            product, fallback = backend, None
        elif backend in BACKENDS:
            product = ForwardOverReverse() if backend == "func" else DoubleBackward()
            fallback = ForwardOverReverse() if backend == "auto" else None
        else:
            raise ValueError(
                f"Invalid backend: {backend!r} (allowed: {', '.join(BACKENDS)}, or a Product)"
            )
        self.backend = backend if isinstance(backend, str) else product.name
        super().__init__(model, loss_fn, data, params, seed, check_deterministic,
                         product=product, fallback=fallback, cache=cache,
                         process_group=process_group)


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


def local_dim(op: Any) -> int:
    """The entries of a vector of ``op`` held on this rank (``d`` unless ``op`` is sharded)."""
    return int(getattr(op, "local_dim", op.shape[0]))


def reduce_sum(op: Any, t: Tensor) -> Tensor:
    """A partial sum over this rank's part of ``op``'s vectors (a local dot) summed over the
    ranks (:meth:`LinearOperator.reduce_sum`); ``t`` itself for whole vectors."""
    f = getattr(op, "reduce_sum", None)
    return t if f is None else f(t)


def local_part(op: Any, v: Tensor) -> Tensor:
    """This rank's part of a full vector of ``op`` (:meth:`LinearOperator.local_part`);
    ``v`` itself for whole vectors."""
    f = getattr(op, "local_part", None)
    return v if f is None else f(v)


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
