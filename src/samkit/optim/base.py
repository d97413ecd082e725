r"""The two-pass protocol shared by every sharpness-aware optimizer.

A sharpness-aware step at weights :math:`w` with gradient :math:`g = \nabla L(w)` is

.. math::
    \epsilon = \mathrm{ascent}(w, g; \rho), \qquad
    w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big)

Subclasses only say how ε is found (:meth:`SharpnessAwareOptimizer._ascent_`); the loop, the
weight backup, the AMP handling, the state dict and the closure live here once.

Variants that need more than an ascent direction compose these hooks (each has a default that
does nothing special, so SAM, ASAM and USAM never see them):

* :meth:`~SharpnessAwareOptimizer._two_pass_`: after the first pass, decide whether this step is
  a sharpness-aware step (two passes) or a one-pass step that descends with the first-pass
  gradient right away (LookSAM between its full steps; AE-SAM and RST through a
  :attr:`~SharpnessAwareOptimizer.schedule`). ``first_step`` returns the decision.
* :meth:`~SharpnessAwareOptimizer._descent_`: rewrite the second-pass gradient before the base
  step (GSAM's surrogate-gap term, LookSAM's orthogonal component);
  :meth:`~SharpnessAwareOptimizer._one_pass_descent_` does the same for a one-pass step.
* ``_keeps_first_grads``: keep a copy of the first-pass gradient ``g`` for the descent rule
  (``bucket.first_grads``; allocated once, not saved by ``state_dict``).
* :meth:`~SharpnessAwareOptimizer._global_state_dict`: optimizer-level state (step counters,
  running statistics, random generators) saved next to the per-parameter state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import kernels

Closure = Callable[[], Any]

# Per-parameter state entries that only live between first_step and second_step; they are not
# saved by state_dict (a checkpoint is always taken between full steps).
_TRANSIENT_STATE = ("w_backup", "grad_first")


class Bucket:
    """The tensors of one param group on one device with one dtype, for the foreach kernels."""

    __slots__ = ("group", "params", "grads", "backups", "first_grads")

    def __init__(
        self, group: dict, params: list[Tensor], grads: list[Tensor], backups, first_grads=None
    ):
        self.group = group
        self.params = params
        self.grads = grads
        self.backups = backups
        # the first-pass gradient g, kept only for optimizers with _keeps_first_grads
        self.first_grads = first_grads


def _replicated_with_shards(buckets: list[Bucket]) -> list[Bucket]:
    """When some buckets hold local shards (FSDP2) and others plain tensors, the plain ones are
    copies on every rank: tag them so the all-reduced norms count them once."""
    sharded = [b for b in buckets if isinstance(b.grads, kernels.ShardedTensors)]
    if not sharded or len(sharded) == len(buckets):
        return buckets
    import torch.distributed as dist

    group = sharded[0].grads.group
    replicas = dist.get_world_size(group)
    for b in buckets:
        if not isinstance(b.grads, kernels.ShardedTensors):
            for name in ("params", "grads", "backups", "first_grads"):
                value = getattr(b, name)
                if value is not None:
                    setattr(b, name, kernels.ShardedTensors(value, group, replicas))
    return buckets


class SharpnessAwareOptimizer(Optimizer):
    """Base class: wraps a ``torch.optim.Optimizer`` instance and shares its ``param_groups``.

    Args:
        base_optimizer: the optimizer that takes the descent step (SGD, AdamW, ...), already
            built over the model's parameters.
        defaults: this optimizer's own per-group hyperparameters (``rho`` and friends). They
            are added to every param group that lacks them, so a group may override them and a
            schedule may change them between steps.

    Use either ``loss = opt.step(closure)`` (the closure zeroes the gradients, runs the forward
    and backward pass and returns the loss; it is called twice) or the explicit form
    ``first_step()`` / ``second_step()``.
    """

    def __init__(self, base_optimizer: Optimizer, defaults: dict[str, Any]) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError(
                f"Invalid base_optimizer: {type(base_optimizer).__name__} (allowed: an instance "
                "of torch.optim.Optimizer, e.g. torch.optim.SGD(model.parameters(), lr=0.1))"
            )
        if isinstance(base_optimizer, SharpnessAwareOptimizer):
            raise ValueError("Invalid base_optimizer: it is already sharpness-aware")
        clash = sorted(set(defaults) & set(base_optimizer.defaults))
        if clash:
            raise ValueError(
                f"Invalid base_optimizer: {type(base_optimizer).__name__} already uses the "
                f"hyperparameter name(s) {clash}, which {type(self).__name__} needs"
            )
        if not any(len(g["params"]) for g in base_optimizer.param_groups):
            raise ValueError("Invalid base_optimizer: it has no parameters")
        self.base_optimizer = base_optimizer
        # Optimizer.__init__ adds our defaults to the base optimizer's group dicts in place
        # (add_param_group keeps the dict); then both objects share the very same list.
        super().__init__(base_optimizer.param_groups, defaults)
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **defaults}
        self._perturbed: list[Bucket] | None = None
        self._first_pass_finite: Tensor | None = None
        # An optional step schedule (AE-SAM, RST, see samkit.optim.schedules): an object with
        # use_sam(optimizer, buckets, scaler) -> bool, state_dict() and load_state_dict().
        self.schedule = None

    # ------------------------------------------------------------------ the ascent direction

    def _ascent_(self, buckets: list[Bucket]) -> None:
        """Overwrite each bucket's gradients in place with the perturbation ε.

        ``bucket.backups`` may be used as scratch space (it is refilled with ``w`` afterwards);
        the parameters must not be changed. Subclasses implement the algorithm here.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ composition hooks

    # Keep a copy of the first-pass gradient g in bucket.first_grads (GSAM, LookSAM).
    _keeps_first_grads = False

    def _two_pass_(self, buckets: list[Bucket], scaler: torch.amp.GradScaler | None) -> bool:
        """After the first pass: is this a sharpness-aware (two-pass) step?

        ``buckets`` hold the first-pass gradients (scaled by ``scaler`` when one is given; the
        non-finite ones already zeroed). Returning False makes :meth:`first_step` descend with
        the first-pass gradient at once (after :meth:`_one_pass_descent_`), so the step costs
        one forward-backward pass. The default asks :attr:`schedule`, if one is set.
        """
        return self.schedule is None or bool(self.schedule.use_sam(self, buckets, scaler))

    def _descent_(self, buckets: list[Bucket]) -> None:
        """Rewrite the second-pass gradients (``bucket.grads``, at ``w + ε``) in place before the
        base step; ``w`` is already restored, so ``bucket.backups`` is scratch space. Default:
        descend with the second-pass gradient unchanged."""

    def _one_pass_descent_(self, buckets: list[Bucket]) -> None:
        """Rewrite the first-pass gradients in place before a one-pass step's base step; the
        weights are unperturbed and ``bucket.backups`` is scratch space. Default: descend with
        ``g`` unchanged (an SGD/base-optimizer step)."""

    def _global_state_dict(self) -> dict[str, Any]:
        """Optimizer-level state saved by :meth:`state_dict` (counters, running statistics,
        generator states). Subclasses extend the dict returned by ``super()``."""
        return {} if self.schedule is None else {"schedule": self.schedule.state_dict()}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` (two-pass) and :meth:`second_step`/:meth:`restore`:
        the weights are at ``w + ε``. Closures use it to tell the passes apart, e.g. to run the
        perturbed pass under :func:`samkit.disable_running_stats`."""
        return self._perturbed is not None

    def step_rewrites(self) -> str | None:
        """Why a step is more than "descend with the gradient at ``w + ε``", or None.

        Not None for variants that override :meth:`_two_pass_`, :meth:`_descent_` or
        :meth:`_one_pass_descent_`, or carry a :attr:`schedule` (they use the first-pass gradient
        or skip passes): per-micro-batch and per-replica perturbation cannot take them.
        """
        base = SharpnessAwareOptimizer
        custom = [
            hook
            for hook in ("_two_pass_", "_descent_", "_one_pass_descent_")
            if getattr(type(self), hook) is not getattr(base, hook)
        ]
        if custom:
            return f"rewrites its steps ({', '.join(custom)})"
        return "has a step schedule" if self.schedule is not None else None

    # ------------------------------------------------------------------ the protocol

    def _buckets(self) -> list[Bucket]:
        buckets = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = []
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                grads.append(p.grad)
            backups = []
            for p in params:
                state = self.state[p]
                if "w_backup" not in state:  # allocated once, reused every step
                    state["w_backup"] = torch.empty_like(p, memory_format=torch.preserve_format)
                backups.append(state["w_backup"])
            lists = [params, grads, backups]
            if self._keeps_first_grads:
                firsts = []
                for p in params:
                    state = self.state[p]
                    if "grad_first" not in state:
                        state["grad_first"] = torch.empty_like(
                            p, memory_format=torch.preserve_format
                        )
                    firsts.append(state["grad_first"])
                lists.append(firsts)
            # FSDP2 (DTensor) parameters: the kernels work on the local shards, and the norms
            # are all-reduced once (kernels.ShardedTensors); plain tensors pass through as is.
            for info, parts in kernels.split_sharded(*lists):
                for bucket_lists in kernels.group_by_device_and_dtype(*parts):
                    if info is not None:
                        bucket_lists = [kernels.ShardedTensors(t, *info) for t in bucket_lists]
                    buckets.append(Bucket(group, *bucket_lists))
        return _replicated_with_shards(buckets)

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        """Move every parameter with a gradient from ``w`` to ``w + ε`` and clear the gradients.

        Args:
            zero_grad: clear the gradients afterwards (they hold ε at this point).
            scaler: the ``torch.amp.GradScaler`` that scaled the loss, if any. The gradients
                are then checked for inf/NaN (no host sync): if any is non-finite, ε = 0 and
                :meth:`second_step` skips the base step and lets the scaler lower its scale.

        Returns:
            True when the weights were perturbed and a second pass and :meth:`second_step` must
            follow (always, for SAM, ASAM and USAM). False when the optimizer chose a one-pass
            step (:meth:`_two_pass_`: LookSAM between full steps, a schedule): the base
            optimizer has then already stepped with the first-pass gradient and the step is
            over. The explicit form is therefore ``if opt.first_step(): <second pass>;
            opt.second_step()``.
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice without second_step() in between")
        buckets = self._buckets()
        use_scaler = scaler is not None and scaler.is_enabled()
        if use_scaler:
            self._first_pass_finite = self._sanitize_non_finite_(buckets)
        if buckets and not self._two_pass_(buckets, scaler if use_scaler else None):
            self._one_pass_descent_(buckets)
            self._base_step(scaler)
            if zero_grad:
                self.zero_grad()
            return False
        if self._keeps_first_grads:  # g as the second pass sees it (scaled, like g_p)
            for b in buckets:
                torch._foreach_copy_(b.first_grads, b.grads)
        if use_scaler:
            if self._ascent_needs_unscaled_grads:
                inv_scale = 1.0 / scaler.get_scale()  # one host sync per step, not per tensor
                for b in buckets:
                    torch._foreach_mul_(b.grads, inv_scale)
        if buckets:
            self._ascent_(buckets)
        for b in buckets:
            kernels.perturb_(b.params, b.grads, b.backups)
        self._perturbed = buckets
        if zero_grad:
            self.zero_grad()
        return True

    # Set by ascents that are not invariant to the loss scale (unnormalized SAM).
    _ascent_needs_unscaled_grads = False

    @staticmethod
    def _sanitize_non_finite_(buckets: list[Bucket]) -> Tensor | None:
        """0-d bool: are all gradients finite? If not, zero them all so that ε = 0."""
        total = kernels.global_sq_norm(b.grads for b in buckets)
        if total is None:
            return None
        finite = torch.isfinite(total)
        for b in buckets:
            for g in b.grads:
                g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            flag = finite.to(device=b.grads[0].device, dtype=b.grads[0].dtype)
            torch._foreach_mul_(b.grads, flag)
        return finite

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step`, bit for bit, without stepping."""
        if self._perturbed is None:
            raise RuntimeError("restore()/second_step() needs a first_step() before it")
        for b in self._perturbed:
            kernels.restore_(b.params, b.backups)
        self._perturbed = None

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient at ``w + ε``.

        With a ``scaler``, the step goes through ``scaler.step(base_optimizer)``: it is skipped
        when the gradients of either pass were non-finite. Call ``scaler.update()`` afterwards,
        as in any AMP loop.
        """
        self.restore()
        if type(self)._descent_ is not SharpnessAwareOptimizer._descent_:
            buckets = self._buckets()  # the second pass's gradient tensors
            if buckets:
                self._descent_(buckets)
        self._base_step(scaler)
        if zero_grad:
            self.zero_grad()

    def _base_step(self, scaler: torch.amp.GradScaler | None) -> None:
        """The base optimizer's step with the gradients as they are (through the scaler)."""
        if scaler is not None and scaler.is_enabled():
            self._poison_if_first_pass_non_finite()
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True  # tells LR schedulers that the optimizer stepped

    def _poison_if_first_pass_non_finite(self) -> None:
        """Make the scaler see an inf when the first pass had one (no host sync)."""
        finite, self._first_pass_finite = self._first_pass_finite, None
        if finite is None:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    poison = torch.where(finite, 0.0, float("inf")).to(p.grad)
                    p.grad.view(-1)[:1].add_(poison)
                    return

    def step(self, closure: Closure | None = None, scaler: torch.amp.GradScaler | None = None):
        """One full sharpness-aware step: runs ``closure`` at ``w``, then at ``w + ε``.

        The closure must zero the gradients, compute the loss, call ``backward()`` and return
        the loss (scaled backward with a ``scaler``). Returns the loss of the first pass, at
        ``w``, so closure-driven trainers (Lightning's automatic optimization) log the usual loss.
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss (it is called twice); or call "
                "first_step() and second_step() yourself"
            )
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError(
                "Invalid closure: it returned None (allowed: the loss, as a tensor or a number)"
            )
        if self.first_step(zero_grad=True, scaler=scaler):  # False: a one-pass step, done
            with torch.enable_grad():
                closure()
            self.second_step(scaler=scaler)
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (whose groups hold our keys too) plus our own state."""
        state = self.base_optimizer.state_dict()
        own = super().state_dict()["state"]
        own = {
            i: {k: v for k, v in s.items() if k not in _TRANSIENT_STATE} for i, s in own.items()
        }
        state["sharpness_aware"] = {"state": {i: s for i, s in own.items() if s}}
        extra = self._global_state_dict()
        if extra:
            state["sharpness_aware"]["global"] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("sharpness_aware", {"state": {}})
        self.base_optimizer.load_state_dict(state_dict)
        super().load_state_dict(
            {"state": own["state"], "param_groups": state_dict["param_groups"]}
        )
        # Loading gives the base optimizer new group dicts: share them again and fill our
        # keys into groups saved by an older version or by the plain base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self._fill_defaults()
        self._perturbed = None
        self._load_global_state_dict(own.get("global", {}))

    def _fill_defaults(self) -> None:
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_perturbed", None)
        self.__dict__.setdefault("_first_pass_finite", None)
        self.__dict__.setdefault("schedule", None)
        self._fill_defaults()

    def __repr__(self) -> str:
        own = {k: v for k, v in self.defaults.items() if k not in self.base_optimizer.defaults}
        args = ", ".join(f"{k}={v!r}" for k, v in own.items())
        return f"{type(self).__name__}({self.base_optimizer!r}, {args})"
