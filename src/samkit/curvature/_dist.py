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

from collections.abc import Sequence
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
