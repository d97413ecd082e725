"""Functional foreach kernels shared by every sharpness-aware optimizer.

Each function takes lists of tensors that live on one device with one dtype (a *bucket*, see
:func:`group_by_device_and_dtype`) and works on the whole list with ``torch._foreach_*`` ops: one
kernel launch per op for the whole bucket instead of one per parameter, and no host sync.

The in-place functions (names ending in ``_``) overwrite their first argument. The optimizers use
the gradients themselves as the workspace for the perturbation ε (they are cleared right after
the first pass) and the weight backup as the scratch space for T_w, so a step needs no memory
beyond that one parameter-sized backup.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

NORMALIZATIONS = ("elementwise", "filterwise")


def group_by_device_and_dtype(*tensor_lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists into buckets whose first tensors share a device and a dtype.

    ``group_by_device_and_dtype(params, grads)`` returns ``[(params_a, grads_a), ...]``.
    """
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in tensor_lists)
    )
    for items in zip(*tensor_lists, strict=True):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for lst, t in zip(bucket, items, strict=True):
            lst.append(t)
    return list(buckets.values())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which norms of ``dtype`` tensors are accumulated (float32 at least)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sq_norm(tensors: Sequence[Tensor]) -> Tensor:
    r"""Squared Euclidean norm of the concatenation of ``tensors``, :math:`\sum_i \|t_i\|_2^2`.

    Returns a 0-d tensor on the bucket's device, accumulated in float32 (float64 for float64).
    """
    dtype = accumulation_dtype(tensors[0].dtype)
    # accumulated in ``dtype`` itself: an fp16 norm above 65504 would be inf (ε = 0 silently)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square().sum()


def scale_for(value: Tensor, like: Tensor) -> Tensor:
    """A 0-d scale for a foreach op on tensors like ``like``: on its device, in its dtype, except
    float32 for fp16/bf16 tensors (ρ/‖g‖ of a large scaled gradient is subnormal in fp16; the
    op computes in float32 and rounds once)."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return value.to(device=like.device, dtype=dtype)


class ShardedTensors(list):
    """A bucket's list of tensors that are the local shards of distributed tensors (FSDP2's
    ``DTensor`` parameters and gradients).

    :func:`global_sq_norm` all-reduces the squared norm of such lists over ``group`` (one
    all-reduce per call, for all of them together), dividing each list's part by ``replicas``,
    the number of ranks that hold a copy of the same shard (1 for plain sharding). Element-wise
    kernels treat it as the plain list it is.
    """

    __slots__ = ("group", "replicas")

    def __init__(self, tensors: Iterable[Tensor], group: object, replicas: int = 1) -> None:
        super().__init__(tensors)
        self.group = group
        self.replicas = replicas


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    if total is None:
        return part
    part = part.to(device=total.device, dtype=torch.promote_types(total.dtype, part.dtype))
    return total + part


def global_sq_norm(buckets_of_tensors: Iterable[Sequence[Tensor]]) -> Tensor | None:
    """Squared norm over several buckets (maybe on several devices): one sum, no host sync.

    The result lives on the device of the first bucket; ``None`` when there is no tensor.
    Buckets given as :class:`ShardedTensors` (local shards) are summed on this rank, then
    all-reduced once per process group, so every rank gets the exact norm of the whole tensors.
    """
    total: Tensor | None = None
    sharded: dict[object, Tensor] = {}
    for tensors in buckets_of_tensors:
        if not tensors:
            continue
        part = sq_norm(tensors)
        if isinstance(tensors, ShardedTensors):
            if tensors.replicas != 1:
                part = part / tensors.replicas
            sharded[tensors.group] = _add(sharded.get(tensors.group), part)
        else:
            total = _add(total, part)
    for group, part in sharded.items():
        import torch.distributed as dist

        part = part.clone()
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        total = _add(total, part)
    return total


def split_sharded(*tensor_lists: Sequence[Tensor]) -> list[tuple[tuple | None, tuple]]:
    """Split parallel lists by how their first tensors are distributed.

    Returns ``[(info, lists), ...]``: ``info`` is ``None`` for plain tensors (the lists as
    given) and ``(process group, replicas)`` for ``DTensor`` s (FSDP2 parameters), whose lists
    then hold the *local* tensors. These share storage with the DTensors, so in-place kernels
    on them update the distributed tensors; ``replicas`` counts the ranks holding each shard.
    """
    if not tensor_lists[0] or not any(is_dtensor(t) for t in tensor_lists[0]):
        return [(None, tuple(tensor_lists))]
    parts: dict[object, tuple[tuple | None, tuple[list[Tensor], ...]]] = {}
    for items in zip(*tensor_lists, strict=True):
        info = _shard_info(items[0]) if is_dtensor(items[0]) else None
        key = None if info is None else (id(info[0]), info[1])
        if key not in parts:
            parts[key] = (info, tuple([] for _ in tensor_lists))
        for lst, t in zip(parts[key][1], items, strict=True):
            lst.append(t.to_local() if is_dtensor(t) else t)
    return list(parts.values())


def _shard_info(tensor: Tensor) -> tuple[object, int]:
    import torch.distributed as dist

    mesh = tensor.device_mesh
    replicas = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            replicas *= mesh.size(dim)
        elif not placement.is_shard():
            raise NotImplementedError(
                f"sharpness-aware steps on a DTensor placed as {placement} are not supported "
                "(allowed: Shard and Replicate placements, as FSDP and HSDP use)"
            )
    if mesh.ndim == 1:
        return mesh.get_group(), replicas
    if mesh.size() != dist.get_world_size():
        raise NotImplementedError(
            f"sharpness-aware norms over a {mesh.ndim}-d device mesh that does not span every "
            "rank are not supported (use a 1-d mesh, or a mesh over all ranks)"
        )
    return dist.group.WORLD, replicas


def is_dtensor(tensor: Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


_DTENSOR: list = []


def _dtensor_type():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a build without torch.distributed
            DTensor = None  # noqa: N806
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def safe_ratio(rho: float | Tensor, norm: Tensor) -> Tensor:
    r""":math:`\rho / \|\cdot\|`, with the norm clamped away from zero.

    A zero gradient has every entry zero, so the clamped ratio multiplies zeros and ε = 0 exactly
    (no 0/0 = NaN); any norm above the smallest normal float is used as is.
    """
    return rho / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def normalizer(
    params: Sequence[Tensor],
    eta: float,
    normalization: str = "elementwise",
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    r"""The diagonal of ASAM's normalization operator :math:`T_w` for each tensor.

    * ``"elementwise"``: :math:`T_w = |w| + \eta`, entry by entry. Written into ``out`` (a scratch
      list shaped like ``params``) when given, else into new tensors.
    * ``"filterwise"``: every output filter (row ``w[i]`` of a weight, output channel of a conv;
      each entry of a 1-d tensor) is scaled by :math:`\|w_i\|_2 + \eta`. Returned as expanded,
      read-only views of a per-filter vector, so no parameter-sized memory is used.
    """
    if normalization == "elementwise":
        if out is None:
            result = torch._foreach_abs(params)
        else:
            torch._foreach_copy_(out, params)
            torch._foreach_abs_(out)
            result = list(out)
        torch._foreach_add_(result, eta)
        return result
    if normalization == "filterwise":
        views = []
        for w in params:
            if w.dim() == 0:
                views.append(w.abs() + eta)
                continue
            rows = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) + eta
            views.append(rows.view(-1, *([1] * (w.dim() - 1))).expand_as(w))
        return views
    raise ValueError(f"Invalid normalization: {normalization!r} (allowed: {NORMALIZATIONS})")


def perturb_(params: Sequence[Tensor], eps: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Save ``w`` into ``backup``, then move to ``w + eps``."""
    torch._foreach_copy_(backup, params)
    torch._foreach_add_(params, eps)


def restore_(params: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Put the saved ``w`` back, bit for bit (a copy, never ``w + eps - eps``)."""
    torch._foreach_copy_(params, backup)


def sgd_direction_(
    params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor] | None,
    momentum: float, dampening: float, weight_decay: float,
) -> Sequence[Tensor]:
    r"""The direction of ``torch.optim.SGD`` (no Nesterov, no ``maximize``), with its rounding:
    :math:`d = g + \lambda w` (a new list, or ``grads`` itself when :math:`\lambda = 0`), then
    with momentum :math:`v \leftarrow \mu v + (1 - \text{dampening})\, d` in place, returning
    ``bufs``; without it (``bufs`` None) returns :math:`d`. The parameters and gradients are not
    modified; with the same ops in the same order as torch's SGD the result is its, bit for bit.
    """
    decayed = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads
    if bufs is None:
        return decayed
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, decayed, alpha=1 - dampening)
    return bufs


def sgd_momentum_in_place_(
    params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor],
    momentum: float, dampening: float, weight_decay: float,
) -> Sequence[Tensor]:
    r"""SGD's momentum update without a parameter-sized temporary:
    :math:`v \leftarrow \mu v + (1 - \text{dampening})\, g + (1 - \text{dampening})\lambda w`,
    in place; returns ``bufs``. The same value as :func:`sgd_direction_`'s, rounded in another
    order (the decayed gradient is never formed), so not torch's bits."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads, alpha=1 - dampening)
    if weight_decay:
        torch._foreach_add_(bufs, params, alpha=weight_decay * (1 - dampening))
    return bufs
