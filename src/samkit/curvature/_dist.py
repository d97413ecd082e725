r"""The process group of a measurement: curvature over the union of the ranks' data.

Under data parallelism (DDP, FSDP2, torchrun) rank :math:`r` holds :math:`n_r` of the
:math:`N = \sum_r n_r` examples. The loss of the union is the size-weighted mean of the ranks'
mean losses, and so are its gradient and its Hessian (the Hessian of a mean is the mean of the
Hessians):

.. math::
    L = \sum_r \frac{n_r}{N} L_r, \qquad \nabla L = \sum_r \frac{n_r}{N} \nabla L_r, \qquad
    H v = \sum_r \frac{n_r}{N} H_r v .

Each rank scales its local mean by :math:`n_r / N` (:math:`N` all-reduced once, when the
measurement is set up) and one all-reduce (SUM) of the scaled tensors gives the mean over the
union, the same on every rank: one all-reduce per product, one per loss-and-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

GROUP_WORDS = ("local",)


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(process_group: Any) -> Any:
    """The process group a measurement answers for, or ``None`` for this process's data alone.

    ``None`` (the default): the default group when ``torch.distributed`` is initialized and has
    more than one rank, else a single process. A ``ProcessGroup``: that group. ``"local"``:
    this process's data only.
    """
    if isinstance(process_group, str):
        if process_group in GROUP_WORDS:
            return None
        raise ValueError(
            f"Invalid process_group: {process_group!r} (allowed: None, a "
            "torch.distributed.ProcessGroup, or 'local')"
        )
    dist = _dist()
    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise ValueError(
            f"Invalid process_group: {type(process_group).__name__} (allowed: None, a "
            "torch.distributed.ProcessGroup, or 'local')"
        )
    if not dist.is_initialized():
        raise ValueError(
            "Invalid process_group: torch.distributed is not initialized (allowed: a group of "
            "an initialized torch.distributed, None or 'local')"
        )
    return process_group


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its hooks must not run inside
    ``torch.autograd.grad``), or ``model`` itself."""
    dist = _dist()
    if dist.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.module
    return model


def has_dtensors(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is a ``DTensor`` (FSDP2's sharded parameters)."""
    if not _dist().is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


class DataParallel:
    r"""The size-weighted mean over the ranks of a group, :math:`\sum_r (n_r/N)\, t_r`.

    Built once per measurement: one all-reduce of ``(n_r, flags...)`` gives :math:`N` (and the
    flags summed over the ranks, so that decisions taken at construction agree everywhere).
    :meth:`mean` then costs one all-reduce (SUM) for any list of tensors.

    Attributes:
        group: the process group.
        world: its size.
        local: :math:`n_r`, the examples of this rank.
        total: :math:`N`, the examples of all ranks.
        flags: the flags passed at construction, summed over the ranks.
        reduces: the all-reduces taken by :meth:`mean` (and :meth:`sum`) so far.
    """

    def __init__(self, group: Any, local: int, device: torch.device,
                 flags: Sequence[float] = ()) -> None:
        dist = _dist()
        self.group = group
        self.world = dist.get_world_size(group)
        self.device = device
        counts = torch.tensor([float(local), *map(float, flags)], dtype=torch.float64,
                              device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self.local = int(local)
        self.total = int(round(float(counts[0])))
        self.flags = [float(f) for f in counts[1:].cpu()]
        if self.total <= 0:
            raise ValueError("Invalid data: the ranks hold 0 examples in all (allowed: at least 1)")
        self.weight = self.local / self.total
        self.reduces = 0

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The tensors summed over the ranks (one all-reduce; new tensors, the inputs kept)."""
        tensors = list(tensors)
        if not tensors:
            return []
        dtypes = {t.dtype for t in tensors}
        dtype = tensors[0].dtype if len(dtypes) == 1 else torch.float64
        flat = torch.cat([t.reshape(-1).to(self.device, dtype) for t in tensors])
        _dist().all_reduce(flat, op=_dist().ReduceOp.SUM, group=self.group)
        self.reduces += 1
        parts = torch.split(flat, [t.numel() for t in tensors])
        return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors, strict=True)]

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`\sum_r (n_r/N)\, t_r` for this rank's local means ``tensors`` (one
        all-reduce); identical on every rank."""
        return self.sum([t * self.weight for t in tensors])


def local_count(batches: Any) -> int:
    """The examples this rank holds: the sum of the batch sizes of ``batches``
    (a :class:`~samkit.curvature._data.Batches`; a collection is read once)."""
    from samkit.curvature._data import batch_size

    if batches.single is not None:
        return batch_size(*batches.single)
    return sum(n for _, _, n in batches)


class Sharding:
    r"""How the flat vectors of an operator on FSDP2 parameters are split over the ranks.

    FSDP2 (``fully_shard`` on a 1-D mesh) holds each parameter as a ``DTensor`` placed
    ``Shard(0)``: rank :math:`r` keeps a contiguous block of its rows, in rank order. A vector
    on the parameters is held the same way: on each rank, the concatenation of its blocks of
    every parameter (:attr:`local_dim` entries; :attr:`dim` in all), so the memory of a
    Lanczos basis per rank falls with the world size. A dot product is the sum over the ranks
    of the local dots (:meth:`sum`: one all-reduce); :meth:`gather` rebuilds the full vector
    (one all-gather), :meth:`local` cuts this rank's part out of a full one.

    Attributes:
        group: the mesh's process group.
        world, rank: its size and this process's rank in it.
        dim, local_dim: the entries of a full vector, and of this rank's part.
        full_shapes: the parameters' global shapes.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        from torch.distributed.tensor import DTensor, Shard

        dist = _dist()
        meshes = set()
        for i, p in enumerate(params):
            if not isinstance(p, DTensor):
                raise ValueError(
                    f"Invalid params: entry {i} is a plain tensor among FSDP2 shards (allowed: "
                    "every parameter sharded by fully_shard, or none)"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"Invalid params: entry {i} is placed {tuple(p.placements)} on a "
                    f"{p.device_mesh.ndim}-d mesh (allowed: fully_shard's Shard(0) on a 1-d "
                    "mesh)"
                )
            meshes.add(id(p.device_mesh.get_group()))
        if len(meshes) != 1:
            raise ValueError("Invalid params: they are sharded over different meshes "
                             "(allowed: one mesh)")
        self.group = params[0].device_mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.full_shapes = [torch.Size(p.shape) for p in params]
        self.full_numels = [s.numel() for s in self.full_shapes]
        local = [tuple(p.to_local().shape) for p in params]
        shapes: list[Any] = [None] * self.world
        dist.all_gather_object(shapes, local, group=self.group)
        # numels[r][i]: entries of parameter i on rank r, in rank order along dim 0
        self.numels = [[math.prod(s) for s in rank_shapes] for rank_shapes in shapes]
        for i, full in enumerate(self.full_numels):
            if sum(n[i] for n in self.numels) != full:
                raise ValueError(
                    f"Invalid params: the shards of entry {i} hold "
                    f"{sum(n[i] for n in self.numels)} entries, not {full} (allowed: "
                    "fully_shard's row blocks)"
                )
        self.local_shapes = [torch.Size(s) for s in local]
        self.local_dim = sum(self.numels[self.rank])
        self.dim = sum(self.full_numels)
        self._padded = max(sum(n) for n in self.numels)

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (one all-reduce; a new tensor)."""
        t = t.clone()
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=self.group)
        return t

    def gather(self, v: Tensor) -> Tensor:
        """The full ``(dim,)`` or ``(dim, k)`` vector from this rank's ``(local_dim, ...)``
        part (one all-gather)."""
        pad = v.new_zeros((self._padded, *v.shape[1:]))
        pad[: v.shape[0]] = v
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        _dist().all_gather(parts, pad, group=self.group)
        pieces = []
        starts = [0] * self.world
        for i in range(len(self.full_numels)):
            for r in range(self.world):
                n = self.numels[r][i]
                pieces.append(parts[r][starts[r] : starts[r] + n])
                starts[r] += n
        return torch.cat(pieces)

    def local(self, v: Tensor) -> Tensor:
        """This rank's ``(local_dim, ...)`` part of a full ``(dim, ...)`` vector (no
        communication)."""
        pieces = []
        start = 0
        for i, full in enumerate(self.full_numels):
            offset = start + sum(self.numels[r][i] for r in range(self.rank))
            pieces.append(v[offset : offset + self.numels[self.rank][i]])
            start += full
        return torch.cat(pieces)


def _is_fsdp_hook(hook: Any) -> bool:
    return str(getattr(hook, "__module__", "")).startswith("torch.distributed.fsdp")


class FullWeights:
    r"""An FSDP2 model seen as a plain replicated module: inside :meth:`swapped`, each sharded
    parameter is replaced on its module(s) by a full plain tensor (:attr:`leaves`, all-gathered
    from the shards) and FSDP's forward hooks are off, so ``model(x)`` is the plain forward
    pass and ``torch.autograd.grad`` (double backward included) differentiates the leaves.

    The leaves are refreshed from the shards at every :meth:`swapped` (one all-gather of the
    weights, as FSDP's own forward does; copied only where they changed, so a cached graph
    stays valid while the weights do). Memory: one full copy of the weights per rank while the
    operator lives.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], params: Sequence[Tensor],
                 sharding: Sharding) -> None:
        self.model, self.sharding = model, sharding
        self.params = list(params)
        where: dict[int, list[tuple[nn.Module, str]]] = {id(p): [] for p in self.params}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in where:
                owner, _, leaf = name.rpartition(".")
                where[id(p)].append((model.get_submodule(owner) if owner else model, leaf))
        self.places = [where[id(p)] for p in self.params]
        full = self._gather()
        self.leaves = [nn.Parameter(t.clone(), requires_grad=p.requires_grad)
                       for t, p in zip(full, self.params, strict=True)]
        self.names = list(names)

    def _gather(self) -> list[Tensor]:
        with torch.no_grad():
            local = torch.cat([p.to_local().reshape(-1) for p in self.params])
            flat = self.sharding.gather(local)
        return [t.view(s) for t, s in zip(torch.split(flat, self.sharding.full_numels),
                                          self.sharding.full_shapes, strict=True)]

    def refresh(self) -> None:
        """Copy the shards' current values into the leaves (where they changed)."""
        with torch.no_grad():
            for leaf, t in zip(self.leaves, self._gather(), strict=True):
                if not torch.equal(leaf, t):
                    leaf.copy_(t)

    @contextmanager
    def swapped(self, refresh: bool = True) -> Iterator[None]:
        """Context: the leaves on the modules, FSDP's forward hooks off; restored on exit."""
        if refresh:
            self.refresh()
        hooks = []
        saved = [(m, leaf, m._parameters[leaf]) for places in self.places for m, leaf in places]
        try:
            for m in self.model.modules():
                pre, post = m._forward_pre_hooks, m._forward_hooks
                if any(_is_fsdp_hook(h) for h in (*pre.values(), *post.values())):
                    hooks.append((m, pre, post))
                    m._forward_pre_hooks = type(pre)(
                        (k, h) for k, h in pre.items() if not _is_fsdp_hook(h))
                    m._forward_hooks = type(post)(
                        (k, h) for k, h in post.items() if not _is_fsdp_hook(h))
            for places, t in zip(self.places, self.leaves, strict=True):
                for m, leaf in places:
                    m._parameters[leaf] = t
            yield
        finally:
            for m, leaf, p in saved:
                m._parameters[leaf] = p
            for m, pre, post in hooks:
                m._forward_pre_hooks, m._forward_hooks = pre, post
