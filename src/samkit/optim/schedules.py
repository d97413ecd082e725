r"""Step schedules: when to take a sharpness-aware (two-pass) step and when a one-pass step.

A schedule is attached to any sharpness-aware optimizer whose ascent is a plain direction (SAM,
ASAM, USAM, Fisher SAM, FriendlySAM, ESAM, GSAM)::

    opt = with_schedule(samkit.ASAM(base, rho=0.5), AESchedule(c=0.0))

After the first forward-backward pass, ``first_step`` asks ``schedule.use_sam(...)``; on False
the base optimizer descends with the first-pass gradient at once and ``step(closure)`` does not
run the closure a second time (``first_step()`` returns False in the explicit form). The
schedule's state (running statistics, random generator, counters) is saved by ``state_dict``.

* :class:`AESchedule` (AE-SAM, Jiang et al., ICLR 2023): SAM only when the squared gradient norm
  is large against its running statistics.
* :class:`RandomSchedule` (RST, Zhao et al. 2022): SAM with probability :math:`p_t`.
* :class:`PeriodicSchedule` (Composer's SAM ``interval``): SAM every k-th step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samkit.optim import kernels
from samkit.optim._validation import check_non_negative, check_seed
from samkit.optim.base import Bucket, SharpnessAwareOptimizer
from samkit.optim.davda54 import accepts_base_class
from samkit.optim.kind import DeclaresKind

SCHEDULES: dict[str, type] = {}  # filled below: "ae", "random" (alias "rst") and "periodic"


def _linear(start: float, end: float | None, step: int, total: int | None) -> float:
    """``start`` moved linearly to ``end`` over ``total`` steps (``start`` when no ``end``)."""
    if end is None or not total:
        return start
    return start + (end - start) * min(1.0, step / total)


def _check_total(end, total_steps) -> None:
    if end is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(
            f"Invalid total_steps: {total_steps!r} (allowed: an integer >= 1 when a final value "
            "is given)"
        )


class AESchedule:
    r"""AE-SAM's policy: a SAM step when the squared gradient norm is unusually large.

    With :math:`s_t = \|\nabla L_B(w_t)\|_2^2` (unscaled under AMP; one host sync per step),

    .. math::
        \mu_t = \delta \mu_{t-1} + (1 - \delta) s_t, \qquad
        \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta)(s_t - \mu_t)^2,

    and the step is a SAM step iff :math:`s_t \ge \mu_t + c_t \sigma_t`, else a one-pass (SGD)
    step. The statistics start at :math:`\mu_1 = s_1, \sigma_1 = 0` (so the first step is a SAM
    step). :math:`c_t` is ``c``, or moves linearly from ``c`` to ``c_final`` over ``total_steps``
    (the paper's schedule, e.g. -1 to 1: more SAM early, less late). A step whose first pass
    overflowed under AMP is a one-pass step (the scaler skips it) and leaves the statistics alone.

    Args:
        c: the threshold :math:`c` in standard deviations (any finite number).
        delta: the decay δ of the moving averages (0 <= δ < 1).
        c_final, total_steps: optional linear schedule of :math:`c_t`.

    References:
        W. Jiang, H. Yang, Y. Zhang, J. Kwok. An Adaptive Policy to Employ Sharpness-Aware
        Minimization. ICLR 2023.
    """

    def __init__(
        self,
        c: float = 0.0,
        delta: float = 0.9,
        c_final: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        for name, value in (("c", c), ("c_final", c_final)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"Invalid {name}: {value!r} (allowed: a finite number)")
        check_non_negative("delta", delta)
        if delta >= 1:
            raise ValueError(f"Invalid delta: {delta!r} (allowed: 0 <= delta < 1)")
        _check_total(c_final, total_steps)
        self.c, self.delta, self.c_final, self.total_steps = c, delta, c_final, total_steps
        self.mean: float | None = None
        self.var = 0.0
        self.steps = 0  # steps decided
        self.sam_steps = 0  # of which two-pass

    def use_sam(self, optimizer, buckets: list[Bucket], scaler) -> bool:
        finite = optimizer._first_pass_finite
        if finite is not None and not bool(finite):
            self.steps += 1
            return False
        sq = float(kernels.global_sq_norm(b.grads for b in buckets))
        if scaler is not None:
            sq /= float(scaler.get_scale()) ** 2
        if self.mean is None:
            self.mean, self.var = sq, 0.0
        else:
            self.mean = self.delta * self.mean + (1 - self.delta) * sq
            self.var = self.delta * self.var + (1 - self.delta) * (sq - self.mean) ** 2
        c = _linear(self.c, self.c_final, self.steps, self.total_steps)
        use = sq >= self.mean + c * math.sqrt(self.var)
        self.steps += 1
        self.sam_steps += int(use)
        return use

    def state_dict(self) -> dict[str, Any]:
        keys = ("mean", "var", "steps", "sam_steps")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"AESchedule(c={self.c}, delta={self.delta}, c_final={self.c_final})"


class RandomSchedule:
    r"""RST's policy: a SAM step with probability :math:`p_t`, else a one-pass (SGD) step.

    At step t a seeded generator draws :math:`u_t \sim U[0, 1)` on the CPU (no device sync) and
    the step is a SAM step iff :math:`u_t < p_t`; :math:`p_t` is ``p``, or moves linearly from
    ``p`` to ``p_final`` over ``total_steps``. The expected cost is :math:`1 + p_t` passes per step.

    Args:
        p: the probability of a SAM step (0 <= p <= 1).
        p_final, total_steps: optional linear schedule of :math:`p_t`.
        seed: the seed of the generator (its state is saved by ``state_dict``).

    References:
        Y. Zhao, H. Zhang, X. Hu. Randomized Sharpness-Aware Training for Boosting
        Computational Efficiency in Deep Learning. arXiv:2203.09962, 2022.
    """

    def __init__(
        self,
        p: float = 0.5,
        p_final: float | None = None,
        total_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("p", p), ("p_final", p_final)):
            if value is not None:
                check_non_negative(name, value)
                if value > 1:
                    raise ValueError(f"Invalid {name}: {value!r} (allowed: 0 <= {name} <= 1)")
        _check_total(p_final, total_steps)
        self.p, self.p_final, self.total_steps = p, p_final, total_steps
        self.seed = check_seed("seed", seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0
        self.sam_steps = 0

    def use_sam(self, optimizer, buckets: list[Bucket], scaler) -> bool:
        p = _linear(self.p, self.p_final, self.steps, self.total_steps)
        use = float(torch.rand((), generator=self.generator)) < p
        self.steps += 1
        self.sam_steps += int(use)
        return use

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "sam_steps": self.sam_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.steps, self.sam_steps = int(state["steps"]), int(state["sam_steps"])

    def __repr__(self) -> str:
        return f"RandomSchedule(p={self.p}, p_final={self.p_final}, seed={self.seed})"


class PeriodicSchedule:
    r"""A SAM step every ``interval`` steps, a one-pass (base-optimizer) step in between.

    With the steps counted from 1, step :math:`t` is a SAM step iff
    :math:`t \equiv 0 \pmod k`, :math:`k` = ``interval``: the phase of MosaicML Composer's
    ``SAMOptimizer(interval=k)`` (its ``(global_step + 1) % interval == 0``), so the first
    :math:`k - 1` steps are base steps and ``interval=1`` is SAM at every step. The cost is
    :math:`1 + 1/k` passes per step, no host sync, no random draw. A step whose first pass
    overflowed under AMP counts like any other (the scaler skips it).

    Args:
        interval: :math:`k`, an integer >= 1 (default 2, the smallest that skips second passes;
            Composer's default is 1, i.e. SAM at every step).

    References:
        MosaicML Composer, ``composer.algorithms.sam.SAMOptimizer`` (``interval``), 2022;
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021.
    """

    def __init__(self, interval: int = 2) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Invalid interval: {interval!r} (allowed: an integer >= 1)")
        self.interval = interval
        self.steps = 0  # steps decided
        self.sam_steps = 0  # of which two-pass

    def use_sam(self, optimizer, buckets: list[Bucket], scaler) -> bool:
        self.steps += 1
        use = self.steps % self.interval == 0
        self.sam_steps += int(use)
        return use

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sam_steps": self.sam_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.sam_steps = int(state["steps"]), int(state["sam_steps"])

    def __repr__(self) -> str:
        return f"PeriodicSchedule(interval={self.interval})"


def with_schedule(optimizer: SharpnessAwareOptimizer, schedule) -> SharpnessAwareOptimizer:
    """Attach ``schedule`` (or ``None`` to remove it) to ``optimizer`` and return the optimizer.

    Raises ``ValueError`` for an optimizer that decides its steps itself (LookSAM).
    """
    if not isinstance(optimizer, DeclaresKind):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} (allowed: a sharpness-aware optimizer)"
        )
    if not optimizer.accepts_schedule:
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} schedules its own steps; a schedule "
            "would be ignored"
        )
    if schedule is not None and not all(
        callable(getattr(schedule, m, None)) for m in ("use_sam", "state_dict", "load_state_dict")
    ):
        raise ValueError(
            f"Invalid schedule: {schedule!r} (allowed: an object with use_sam(optimizer, "
            "buckets, scaler), state_dict() and load_state_dict(), e.g. AESchedule())"
        )
    optimizer.schedule = schedule
    return optimizer


SCHEDULES.update({"ae": AESchedule, "random": RandomSchedule, "rst": RandomSchedule,
                  "periodic": PeriodicSchedule})


def make_schedule(name: str, **options: Any):
    """The step schedule ``name`` (``"ae"``, ``"random"`` or its alias ``"rst"``,
    ``"periodic"``) built with ``options`` (its constructor's arguments)."""
    cls = SCHEDULES.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Invalid schedule: {name!r} (allowed: {', '.join(SCHEDULES)})")
    return cls(**options)


def _schedule_alias(name: str, base_optimizer, rho, ascent, ascent_options, schedule_options,
                    **common) -> SharpnessAwareOptimizer:  # fmt: skip
    from samkit.optim.registry import wrap_optimizer

    options = dict(ascent_options or {})
    if rho is not None:
        options["rho"] = rho
    return wrap_optimizer(
        name, base_optimizer, ascent=ascent, ascent_options=options,
        schedule_options={k: v for k, v in schedule_options.items() if v is not None}, **common,
    )  # fmt: skip


def ae_sam(
    base_optimizer,
    rho: float | None = None,
    c: float | None = None,
    delta: float | None = None,
    c_final: float | None = None,
    total_steps: int | None = None,
    ascent: str = "sam",
    *,
    ascent_options: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
    skip_non_finite: bool = False,
) -> SharpnessAwareOptimizer:
    """AE-SAM over a base optimizer you built: an alias of the registry's ``aesam`` entry,
    ``wrap_optimizer("aesam", base_optimizer, ...)`` (the one way AE-SAM is built; also
    ``create_optimizer("aesam", ...)`` and ``create_optimizer("sam", ..., schedule="ae")``).

    The ``ascent`` optimizer (SAM by default, any registered ascent with ``ascent_options`` such
    as ``{"eta": 0.01}``) with an :class:`AESchedule`; a None argument takes the declared default
    (the ascent's ρ, :class:`AESchedule`'s ``c``, ``delta``)."""
    return _schedule_alias(
        "aesam", base_optimizer, rho, ascent, ascent_options,
        dict(c=c, delta=delta, c_final=c_final, total_steps=total_steps),
        max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite,
    )  # fmt: skip


def rst_sam(
    base_optimizer,
    rho: float | None = None,
    p: float | None = None,
    p_final: float | None = None,
    total_steps: int | None = None,
    seed: int | None = None,
    ascent: str = "sam",
    *,
    ascent_options: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
    skip_non_finite: bool = False,
) -> SharpnessAwareOptimizer:
    """RST over a base optimizer you built: an alias of the registry's ``rst`` entry,
    ``wrap_optimizer("rst", base_optimizer, ...)``: the ``ascent`` optimizer (SAM by default)
    with a :class:`RandomSchedule`; a None argument takes the declared default."""
    return _schedule_alias(
        "rst", base_optimizer, rho, ascent, ascent_options,
        dict(p=p, p_final=p_final, total_steps=total_steps, seed=seed),
        max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite,
    )  # fmt: skip


def periodic_sam(
    base_optimizer,
    rho: float | None = None,
    interval: int | None = None,
    ascent: str = "sam",
    *,
    ascent_options: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
    skip_non_finite: bool = False,
) -> SharpnessAwareOptimizer:
    """SAM every ``interval`` steps over a base optimizer you built (Composer's
    ``SAMOptimizer(interval=k)``): an alias of the registry's ``periodicsam`` entry, the
    ``ascent`` optimizer (SAM by default) with a :class:`PeriodicSchedule`; also
    ``create_optimizer("sam", ..., schedule="periodic", interval=k)``."""
    return _schedule_alias(
        "periodicsam", base_optimizer, rho, ascent, ascent_options, dict(interval=interval),
        max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite,
    )  # fmt: skip


# davda54's form, ae_sam(params, torch.optim.SGD, c=0.5, lr=0.1), through the one adapter
ae_sam = accepts_base_class(ae_sam)
rst_sam = accepts_base_class(rst_sam)
periodic_sam = accepts_base_class(periodic_sam)
