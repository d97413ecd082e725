"""Where a :class:`~samkit.train.Trainer` runs: the device, and DDP under torchrun (one
process per device, rank 0 prints and writes; each rank takes its slice of every batch)."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        allowed = "auto, cpu, cuda, cuda:N, mps"
        raise ValueError(f"Invalid device: {name!r} (allowed: {allowed})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r}: CUDA is not available here (use cpu or auto)")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"Invalid device: {name!r}: MPS (Apple GPU) is not available here "
                         "(use cpu or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Invalid device: {name!r} (allowed: auto, cpu, cuda, cuda:N, mps)")
    return device


def join(device: torch.device) -> tuple[bool, int, int, torch.device]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) when launched by it:
    ``(owns the group, rank, world size, this rank's device)``."""
    from samkit import distributed

    owns = distributed.init_from_env(device.type)
    rank, world_size = distributed.rank(), distributed.world_size()
    if world_size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return owns, rank, world_size, device


def check_batches_shard(n: int, batch_size: int, world_size: int, drop_last: bool) -> None:
    """Every rank needs an example of every batch (the last, short one too)."""
    last = n % batch_size
    if batch_size < world_size or (not drop_last and 0 < last < world_size):
        size = batch_size if batch_size < world_size else last
        raise ValueError(
            f"Invalid batch_size for {world_size} processes: a batch of {size} "
            "example(s) cannot give every rank one (use a larger batch_size, or "
            "drop_last=true)"
        )


def wrap(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` under DDP, else itself."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def reduce_step(loss: Tensor, stop: bool, world_size: int) -> tuple[Tensor, bool]:
    """One all-reduce: the mean of ``loss`` over the ranks, and whether any asks to stop."""
    from samkit.distributed import all_reduce_sum

    packed = torch.stack([loss.double(), loss.new_tensor(float(stop)).double()])
    total, stops = all_reduce_sum(packed).unbind()
    return (total / world_size).to(loss.dtype), bool(stops > 0)


def destroy() -> None:
    import torch.distributed as dist

    dist.destroy_process_group()
