"""Learning-rate schedules as a per-step multiplier (for ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

import bisect
import math


class LRSchedule:
    """factor(step) for ``step`` = 0, 1, ..., ``total_steps`` - 1.

    Linear warm-up over ``warmup_steps`` (from 1/warmup_steps to 1), then ``constant`` (1),
    ``cosine`` (from 1 to 0 at the end of training) or ``step`` (times ``gamma`` at each
    milestone, given as fractions of the steps after warm-up). A plain object rather than a
    lambda, so ``LambdaLR.state_dict()`` saves it and a resumed run has the very same schedule.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int,
        warmup_steps: int = 0,
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
    ) -> None:
        if kind not in ("constant", "cosine", "step"):
            raise ValueError(f"Invalid schedule: {kind!r} (allowed: constant, cosine, step)")
        if total_steps < 1:
            raise ValueError(f"Invalid total_steps: {total_steps} (allowed: >= 1)")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(max(warmup_steps, 0), total_steps))
        self.milestones = [float(m) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, progress)
        return 1.0
