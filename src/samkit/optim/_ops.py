"""Small foreach helpers shared by the SAM-family variants (dot products across buckets)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from samkit.optim import kernels


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    r""":math:`\sum_i \langle x_i, y_i \rangle` over one bucket, as a 0-d tensor (no host sync),
    accumulated in float32 at least (float64 for float64)."""
    acc = kernels.accumulation_dtype(xs[0].dtype)
    parts = [
        torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(xs, ys, strict=True)
    ]
    return torch.stack(parts).sum()


def global_dot(pairs: Iterable[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> Tensor | None:
    """:func:`dot` summed over several buckets (maybe on several devices), on the first one."""
    total: Tensor | None = None
    for xs, ys in pairs:
        if not xs:
            continue
        part = dot(xs, ys)
        if total is None:
            total = part
        else:
            part = part.to(device=total.device, dtype=torch.promote_types(total.dtype, part.dtype))
            total = total + part
    return total


def on(value: Tensor, like: Tensor) -> Tensor:
    """``value`` as a 0-d scale for a foreach op on tensors like ``like`` (its device; its dtype,
    float32 for fp16/bf16: see :func:`samkit.optim.kernels.scale_for`)."""
    return kernels.scale_for(value, like)


def sq_norm_of(buckets, attr: str = "grads") -> Tensor:
    """Squared norm of ``getattr(bucket, attr)`` over every bucket."""
    return kernels.global_sq_norm(getattr(b, attr) for b in buckets)
