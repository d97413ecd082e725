r"""Sharpness-aware steps under data parallelism (DDP) and sharding (FSDP).

**DDP: two perturbation modes.** A sharpness-aware step runs two forward-backward passes; under
``DistributedDataParallel`` only the second one *must* all-reduce its gradients (the base
optimizer steps with them, and every replica has to take the same step). The first pass gives
the ascent direction, and the user chooses whose gradient it is:

* ``"synced"``: the first-pass gradients are all-reduced as usual, so every replica computes the
  same ε from the gradient of the *global* batch. The step equals the single-process step on
  the whole batch (tested in float64). Two all-reduces per step.
* ``"local"``: the first forward *and* backward run under ``model.no_sync()``, so each replica
  perturbs its own copy of the weights with the gradient of its own shard,
  :math:`\epsilon_r = \rho\, g_r / \|g_r\|`, and the descent averages
  :math:`\nabla L_r(w + \epsilon_r)` over the replicas. This is the *m-sharpness* of Foret et
  al. with m the per-replica batch (what their multi-device code did); it often generalizes
  better than ``synced`` and saves one all-reduce per step. It needs an optimizer whose descent
  uses only the perturbed gradient (SAM, ASAM, USAM, FisherSAM, FriendlySAM, ...): LookSAM,
  GSAM and scheduled variants (AE-SAM, RST) would descend with an unsynced first-pass gradient,
  so they are refused.

Usage with the closure form (the closure is the usual one; ``model`` is the DDP module)::

    model = DistributedDataParallel(net)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    step = samkit.distributed.ddp_closure(closure, model, opt, perturbation="local")
    loss = opt.step(step)

With gradient accumulation use :func:`ddp_accumulation_closure` (every micro-batch but the last of a
synced pass runs under ``no_sync()``, all of them in a local first pass); with the explicit form,
run the first pass inside ``with first_pass(model, "local"):``.

**FSDP** (``torch.distributed.fsdp.fully_shard``): nothing to do. The parameters and gradients
are ``DTensor`` shards; the optimizers perturb the local shards in place and compute the global
norms (‖g‖ for SAM, ‖T_w g‖ for ASAM) with one all-reduce of the summed squared norms of the
local shards (:class:`samkit.optim.kernels.ShardedTensors`). The first pass of FSDP is always
reduce-scattered, so FSDP steps are ``synced`` steps.

**torchrun.** ``torchrun --nproc-per-node N -m samkit train ...`` trains with DDP: see
:func:`init_from_env` and the trainer's ``perturbation`` config key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim.base import SharpnessAwareOptimizer
from samkit.step import (
    PERTURBATIONS,
    check_perturbation,
    pass_syncs,
    step_closure,
    sync_context,
)

__all__ = [
    "PERTURBATIONS",
    "all_reduce_sum",
    "check_perturbation",
    "ddp_accumulation_closure",
    "ddp_closure",
    "first_pass",
    "init_from_env",
    "is_distributed",
    "rank",
    "shard_batch",
    "sync_context",
    "world_size",
]


# ---------------------------------------------------------------------- process group


def is_distributed() -> bool:
    """True when a default process group is initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device_type: str = "cpu") -> bool:
    """Initialize the default process group from torchrun's environment, if launched by it.

    Reads ``WORLD_SIZE``, ``RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``, which torchrun sets).
    The backend is NCCL for CUDA devices, gloo otherwise. Returns True when this call created
    the group (the caller then destroys it), False when there is nothing to do (a single
    process, or a group that already exists).
    """
    import torch.distributed as dist

    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but this torch build has no "
            "torch.distributed; run a single process"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return True


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks in place (no-op in a single process); returns it."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard_batch(x: Tensor, y: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s part of a global batch: contiguous, sizes differing by at most one.

    Every rank draws the same global batch (the same seeded order) and keeps its slice: what a
    ``DistributedSampler`` gives, for batches held as tensors, and the union over the ranks is
    exactly the single-process batch.
    """
    if len(y) < world_size:
        raise ValueError(
            f"Invalid batch: {len(y)} example(s) cannot be shared by {world_size} processes "
            "(every rank needs at least one; use a larger batch_size or drop_last=true)"
        )
    return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]


# ---------------------------------------------------------------------- DDP perturbation modes


def check_local_optimizer(optimizer: Any) -> None:
    """Refuse, for ``perturbation="local"``, optimizers whose step is not just descending with
    the perturbed gradient: their unsynced first-pass gradient would make replicas diverge."""
    from samkit.optim.kind import form_of

    if not form_of(optimizer).perturbs:
        return  # one pass at w (a plain or loss-term optimizer), which is synced
    why = optimizer.step_rewrites()
    if why is not None:
        raise ValueError(
            f"Invalid optimizer for perturbation='local': {type(optimizer).__name__} {why} with "
            "the first-pass gradient, which is not synced across replicas in local mode; use "
            "perturbation='synced', or an optimizer that descends with the perturbed gradient "
            "(SAM, ASAM, USAM, FisherSAM, FriendlySAM, ...)"
        )


def first_pass(model: nn.Module, perturbation: str = "synced"):
    """Context for the first forward *and* backward pass: ``no_sync()`` in local mode."""
    check_perturbation(perturbation)
    return sync_context(model, perturbation == "synced")


def ddp_closure(
    closure: Callable[[], Any],
    model: nn.Module,
    optimizer: SharpnessAwareOptimizer,
    perturbation: str = "synced",
) -> Callable[[], Any]:
    """Wrap a closure for ``optimizer.step`` so its first call (at ``w``) runs under
    ``model.no_sync()`` in local mode; the second call (at ``w + ε``) all-reduces as usual.

    The closure itself zeroes the gradients, runs forward and backward and returns the loss;
    ``model`` is the ``DistributedDataParallel`` module it calls (a plain module is fine too:
    then nothing is synced anyway). Which pass syncs is the step engine's rule
    (:func:`samkit.step.pass_syncs`).
    """
    check_perturbation(perturbation)
    if perturbation == "local":
        check_local_optimizer(optimizer)

    def wrapped():
        with sync_context(model, pass_syncs(optimizer, perturbation)):
            return closure()

    return wrapped


def ddp_accumulation_closure(
    optimizer: SharpnessAwareOptimizer,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    perturbation: str = "synced",
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], Tensor]:
    """:func:`samkit.accumulation_closure` for a DDP model, with a ``perturbation`` mode: exact
    accumulation over this replica's ``micro_batches`` with one all-reduce per synced pass.

    Each pass backpropagates every micro-batch's loss weighted by its share of the replica's
    examples. A synced pass runs all micro-batches but the last under ``no_sync()`` (DDP then
    all-reduces the accumulated gradient once); the first pass of ``"local"`` runs them all
    under ``no_sync()``. The pass at ``w + ε`` leaves BatchNorm running statistics untouched.
    Returns the replica's mean loss at ``w`` (detached). Built by :func:`samkit.step.step_closure`.
    """
    check_perturbation(perturbation)
    if perturbation == "local":
        check_local_optimizer(optimizer)
    return step_closure(
        optimizer, model, loss_fn, micro_batches, perturbation=perturbation, scaler=scaler
    )
