"""The epoch's record of a training run: the running sums of its steps (loss, right
predictions, examples or tokens, seconds; over every rank under DDP) and the ``epoch`` record
written to ``metrics.jsonl``."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor


def add_sums(sums: dict[str, float], loss_sum: Tensor, correct: Tensor, count: int, t0: float,
             train_time: float, sync: torch.device | None, world_size: int
             ) -> tuple[dict[str, float], float]:
    """``sums`` plus this stretch of steps (started at ``t0``; ``sync``: the CUDA device to wait
    for first); returns them and the run's ``train_time`` with the stretch's seconds."""
    if sync is not None:
        torch.cuda.synchronize(sync)
    elapsed = time.perf_counter() - t0
    if world_size > 1:  # the epoch's statistics over every rank's examples
        from samkit.distributed import all_reduce_sum

        packed = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(count))])
        loss_sum, correct, count = all_reduce_sum(packed).unbind()
        count = float(count)
    return {
        "loss": sums["loss"] + float(loss_sum),
        "correct": sums["correct"] + float(correct),
        "count": sums["count"] + count,
        "time": sums["time"] + elapsed,
    }, train_time + elapsed


def epoch_record(epoch: int, epochs: int, step: int, lr: float, sums: dict[str, float],
                 train_time: float, test: tuple[float, float] | None) -> dict[str, Any]:
    """The ``epoch`` record (``test``: the evaluation's loss and accuracy, when evaluated)."""
    count = max(sums["count"], 1)
    record: dict[str, Any] = {
        "event": "epoch",
        "epoch": epoch + 1,
        "epochs": epochs,
        "step": step,
        "lr": lr,
        "train_loss": sums["loss"] / count,
        "train_acc": sums["correct"] / count,
    }
    if test is not None:
        record["test_loss"], record["test_acc"] = test
    record["epoch_time"] = sums["time"]
    record["images_per_s"] = sums["count"] / sums["time"] if sums["time"] > 0 else math.nan
    record["train_time"] = train_time
    return record


def grad_norm(model: torch.nn.Module) -> float | None:
    """‖g‖₂ over every parameter's ``.grad`` (None when none has one)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.detach().float()) for g in grads])))
