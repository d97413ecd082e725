r"""The two-pass protocol shared by every sharpness-aware optimizer.

Names: ``lr`` (written :math:`\gamma` in the optimizers' math) is always the base optimizer's
learning rate; ``eta`` is always a hyperparameter of an ascent (ASAM's offset of :math:`T_w`,
Fisher SAM's Fisher scale), never a learning rate. A *step schedule*
(:mod:`samkit.optim.schedules`) decides which steps take two passes; a learning-rate schedule is
a ``torch.optim.lr_scheduler`` attached to the optimizer as usual.

A sharpness-aware step at weights :math:`w` with gradient :math:`g = \nabla L(w)` is

.. math::
    \epsilon = \mathrm{ascent}(w, g; \rho), \qquad
    w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big)

Presets only say how ε is found: an ascent record (:mod:`samkit.optim.ascents`, run by
:meth:`SharpnessAwareOptimizer._ascent_`); the loop, the weight backup, the AMP handling, the
state dict and the closure live here once. Descent rules are in :mod:`samkit.optim.descents`,
step schedules in :mod:`samkit.optim.schedules`, :class:`~samkit.optim.presets.SharpnessAware`
runs any registered ascent, and :mod:`samkit.optim.registry` names all four kinds.

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

The order of one step's base-step direction, on two-pass and one-pass steps alike:

1. the gradients, unscaled once under AMP (through the scaler's own record for the base
   optimizer; a ``scaler.unscale_`` by the user on this optimizer or the base is taken as is);
2. the variant's rewrite (:meth:`~SharpnessAwareOptimizer._descent_` or
   :meth:`~SharpnessAwareOptimizer._one_pass_descent_`), with ``g`` kept in the same units;
3. the clip to ``max_grad_norm`` (over every group);
4. ``scaler.step(base)``, which skips the step when either pass was non-finite (the first
   pass's flag is added to the scaler's found-inf record, never to a gradient), or the base
   step; without a scaler, ``skip_non_finite`` skips a non-finite step.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import kernels
from samkit.optim._validation import check_keyword_types, check_optimizer, check_positive

Closure = Callable[[], Any]

# Per-parameter state entries that only live between first_step and second_step; they are not
# saved by state_dict (a checkpoint is always taken between full steps).
_TRANSIENT_STATE = ("w_backup", "grad_first")

# Attributes of torch.optim.Optimizer that its own __getstate__ leaves out (hooks, profiler names).
_TORCH_INTERNAL_PREFIXES = ("_optimizer_", "_zero_grad_profile", "_warned_")


def picklable_state(optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``torch.optim.Optimizer.__getstate__``'s ``state`` plus the wrapper's own attributes,
    without torch.optim's hooks and an LR scheduler's patched ``step``: what a wrapping
    optimizer pickles, deep-copies and ``torch.save``-s."""
    for key, value in optimizer.__dict__.items():
        if key in state or key == "step" or key.startswith(_TORCH_INTERNAL_PREFIXES):
            continue
        state[key] = value
    return state


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


def _not_compiled(fn: Callable) -> Callable:
    """Run ``fn`` eagerly even inside a region compiled by ``torch.compile`` (a graph break).

    The protocol methods move weights between ``w`` and ``w + ε`` and keep Python state between
    calls; traced by Dynamo, that state is replayed wrongly (finding 8 of issue 12). Dynamo is
    imported lazily: ``torch._dynamo.disable`` is applied on the first call made while compiling,
    so importing samkit stays fast.
    """
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        compiler = getattr(torch, "compiler", None)
        if compiler is not None and compiler.is_compiling():
            if not disabled:  # pragma: no cover - only under torch.compile
                from torch import _dynamo

                disabled.append(_dynamo.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _found_inf_stage(scaler, optimizer) -> Any:
    """The GradScaler's stage for ``optimizer`` (READY, UNSCALED, STEPPED), or None."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None or id(optimizer) not in states:
        return None
    return states[id(optimizer)]["stage"]


def _reset_scaler_state(scaler, optimizer) -> None:
    from torch.amp.grad_scaler import OptState

    states = scaler._per_optimizer_states
    if id(optimizer) in states:
        states[id(optimizer)] = {"stage": OptState.READY, "found_inf_per_device": {}}


def accepts_base_class(fn: Callable) -> Callable:
    """Let ``fn(base_optimizer, ...)`` (an ``__init__`` or a factory) also be called as davda54/sam
    and pytorch_optimizer spell it: ``fn(params, torch.optim.SGD, rho=0.05, lr=0.1, ...)``.

    The keyword arguments that ``fn`` names go to ``fn``; the others build the base optimizer,
    ``base_class(params, **others)``. Both forms give the same optimizer, step for step.
    """
    signature = inspect.signature(fn)
    names = list(signature.parameters)
    is_method = bool(names) and names[0] == "self"
    own = set(names[2 if is_method else 1 :])

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        head, rest = (args[:1], args[1:]) if is_method else ((), args)
        if "base_optimizer" in kwargs and not rest:
            rest = (kwargs.pop("base_optimizer"),)
        if not rest or isinstance(rest[0], Optimizer):
            return fn(*head, *rest, **kwargs)
        params, tail = rest[0], rest[1:]
        base_class = kwargs.pop("base_optimizer_class", None)
        if base_class is None and tail and isinstance(tail[0], type):
            base_class, tail = tail[0], tail[1:]
        if base_class is None:
            return fn(*head, *rest, **kwargs)  # the usual "Invalid base_optimizer" error
        if not (isinstance(base_class, type) and issubclass(base_class, Optimizer)):
            raise ValueError(
                f"Invalid base_optimizer_class: {base_class!r} (allowed: a torch.optim.Optimizer "
                "subclass such as torch.optim.SGD)"
            )
        if "adaptive" in kwargs and "adaptive" not in own:
            raise ValueError(
                "Invalid argument adaptive: samkit has a class for adaptive SAM; use "
                "samkit.ASAM(params, torch.optim.SGD, rho=0.5, ...) instead of adaptive=True"
            )
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        check_keyword_types(base_class.__name__, base_class, kwargs)  # nesterov="maybe"
        base = base_class(params, **kwargs)
        return fn(*head, base, *tail, **mine)

    return wrapper


class SharpnessAwareOptimizer(Optimizer):
    """Base class: wraps a ``torch.optim.Optimizer`` instance and shares its ``param_groups``.

    Args:
        base_optimizer: the optimizer that takes the descent step (SGD, AdamW, ...), already
            built over the model's parameters.
        defaults: this optimizer's own per-group hyperparameters (``rho`` and friends). They
            are added to every param group that lacks them, so a group may override them and a
            schedule may change them between steps.
        max_grad_norm: clip the direction the base optimizer steps with (after the variant's
            rewrite of the gradient, after unscaling under AMP, on two-pass and one-pass steps
            alike) to this Euclidean norm, as ``torch.nn.utils.clip_grad_norm_`` would. The norm
            spans every param group; the limit is a per-group key (``group["max_grad_norm"]``,
            None: that group is not clipped). Default None: no clipping.
        skip_non_finite: without a GradScaler, check each pass for inf/NaN (one host sync per
            pass): a non-finite step is skipped, ``w`` is kept and :attr:`skipped_steps` counts
            it. With a scaler the scaler decides, as always. Default False.

    Use either ``loss = opt.step(closure)`` (the closure zeroes the gradients, runs the forward
    and backward pass and returns the loss; it is called twice) or the explicit form
    ``first_step()`` / ``second_step()``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # SAM(params, torch.optim.SGD, rho=..., lr=...)
            cls.__init__ = accepts_base_class(cls.__dict__["__init__"])

    def __init__(
        self,
        base_optimizer: Optimizer,
        defaults: dict[str, Any],
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        if not isinstance(skip_non_finite, bool):
            raise ValueError(f"Invalid skip_non_finite: {skip_non_finite!r} (allowed: True, False)")
        defaults = {**defaults, "max_grad_norm": max_grad_norm}
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
        check_optimizer(base_optimizer, type(self).__name__)  # real float params, finite lr, ...
        self.base_optimizer = base_optimizer
        # Optimizer.__init__ adds our defaults to the base optimizer's group dicts in place
        # (add_param_group keeps the dict); then both objects share the very same list.
        super().__init__(base_optimizer.param_groups, defaults)
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **defaults}
        self._perturbed: list[Bucket] | None = None
        self._first_pass_finite: Tensor | None = None
        self._one_pass_done = False  # the last first_step() took a one-pass step
        self._zero_grad_calls = 0
        self._left_grads: list[tuple[Tensor, Any]] | None = None  # see second_step(zero_grad)
        self.skip_non_finite = skip_non_finite
        self.skipped_steps = 0  # steps skipped by skip_non_finite
        # An optional step schedule (AE-SAM, RST, see samkit.optim.schedules): an object with
        # use_sam(optimizer, buckets, scaler) -> bool, state_dict() and load_state_dict().
        self.schedule = None

    # ------------------------------------------------------------------ the ascent direction

    # The ascent rule (a samkit.optim.ascents.Ascent record: its direction and what it declares:
    # edge, effective-Hessian form) and its construction-time options. Presets set the class
    # attribute; a composed optimizer (GSAM or LookSAM over another ascent) an instance one.
    ascent: Any = None
    ascent_options: dict[str, Any] = {}

    def _ascent_(self, buckets: list[Bucket]) -> None:
        """Overwrite each bucket's gradients in place with the perturbation ε.

        ``bucket.backups`` may be used as scratch space (it is refilled with ``w`` afterwards);
        the parameters must not be changed. The default runs :attr:`ascent`'s direction; a
        subclass without an ascent record implements the algorithm here.
        """
        if self.ascent is None:
            raise NotImplementedError(f"{type(self).__name__} declares no ascent")
        self.ascent.direction(self, buckets, self.ascent_options)

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
        state: dict[str, Any] = {}
        if self.schedule is not None:
            state["schedule"] = self.schedule.state_dict()
        if self.skipped_steps:
            state["skipped_steps"] = self.skipped_steps
        return state

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

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

    # ------------------------------------------------------------------ buckets

    def _buckets(self) -> list[Bucket]:
        self._fill_defaults()  # groups added to the base optimizer after wrapping
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
                    if "grad_first" not in state:  # zero: a parameter without a first-pass grad
                        state["grad_first"] = torch.zeros_like(
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

    def _zero_stale_first_grads(self, buckets: list[Bucket]) -> None:
        """A parameter with no gradient at ``w`` but one at ``w + ε`` (mixture-of-experts
        routing) must see g = 0 in the descent rule, not last step's g."""
        fresh = {p for b in buckets for p in b.params}
        stale = [
            self.state[p]["grad_first"]
            for group in self.param_groups
            for p in group["params"]
            if p not in fresh and "grad_first" in self.state.get(p, {})
        ]
        if stale:
            torch._foreach_zero_(stale)

    # ------------------------------------------------------------------ AMP and clipping

    def _unscaled_by_user(self, scaler) -> bool:
        """Did the user call ``scaler.unscale_`` on this optimizer or on the base since the
        last ``scaler.update()`` (the gradients are then unscaled)?"""
        return any(
            getattr(_found_inf_stage(scaler, opt), "name", None) == "UNSCALED"
            for opt in (self, self.base_optimizer)
        )

    def _clear_first_pass_unscale(self, scaler) -> None:
        """Before a second pass: forget a ``scaler.unscale_`` of the first pass, so that the
        second pass may be unscaled again (its non-finite flag is kept by first_step)."""
        for opt in (self, self.base_optimizer):
            _reset_scaler_state(scaler, opt)

    def _unscale_(self, scaler) -> None:
        """Unscale the gradients once, through the scaler's own record for the base optimizer
        (so ``scaler.step`` will not unscale them again), unless the user already called
        ``scaler.unscale_`` on this optimizer or on the base optimizer."""
        from torch.amp.grad_scaler import OptState

        states = scaler._per_optimizer_states
        base = states[id(self.base_optimizer)]
        if _found_inf_stage(scaler, self) == OptState.UNSCALED:
            # scaler.unscale_(opt) on the wrapper: the gradients are unscaled, and its found-inf
            # record becomes the base optimizer's (update() reads both; counting twice is fine)
            if base["stage"] is OptState.READY:
                base["stage"] = OptState.UNSCALED
                base["found_inf_per_device"] = dict(states[id(self)]["found_inf_per_device"])
        elif base["stage"] is OptState.READY:
            scaler.unscale_(self.base_optimizer)

    def _record_first_pass_non_finite(self, scaler) -> None:
        """Add the first pass's non-finite flag to the scaler's found-inf record of the base
        optimizer, so that ``scaler.step`` skips the step and ``update()`` lowers the scale
        (no host sync, no gradient touched)."""
        finite = self._first_pass_finite
        if finite is None:
            return
        found = scaler._per_optimizer_states[id(self.base_optimizer)]["found_inf_per_device"]
        flag = (~finite).to(torch.float32)
        device = flag.device
        # a maximum, not a sum: fused optimizers (Adam(fused=True)) skip only on found_inf == 1
        found[device] = torch.maximum(found[device], flag) if device in found else flag

    def _clip_(self, buckets: list[Bucket]) -> None:
        r"""Clip the step direction: :math:`d \leftarrow d \min(1, c / (\|d\|_2 + 10^{-6}))` with
        :math:`c` = ``group["max_grad_norm"]``, :math:`\|d\|` over every group (no host sync)."""
        if not buckets or all(b.group.get("max_grad_norm") is None for b in buckets):
            return
        norm = kernels.global_sq_norm(b.grads for b in buckets).sqrt()
        for b in buckets:
            limit = b.group.get("max_grad_norm")
            if limit is None:
                continue
            check_positive("max_grad_norm", limit)
            coef = (float(limit) / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(b.grads, coef.to(b.grads[0].device))

    def _all_finite(self, buckets: list[Bucket]) -> bool:
        total = kernels.global_sq_norm(b.grads for b in buckets)
        return total is None or bool(torch.isfinite(total))  # one host sync

    # ------------------------------------------------------------------ the protocol

    @_not_compiled
    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        """Move every parameter with a gradient from ``w`` to ``w + ε`` and clear the gradients.

        Args:
            zero_grad: clear the gradients afterwards (they hold ε at this point).
            scaler: the ``torch.amp.GradScaler`` that scaled the loss, if any. The gradients
                are then checked for inf/NaN (no host sync): if any is non-finite, ε = 0 and
                the flag reaches ``scaler.step`` through the scaler's found-inf record, so the
                base step is skipped and ``scaler.update()`` lowers the scale. A
                ``scaler.unscale_(opt)`` before ``first_step`` is allowed (it is taken into
                account, and the second pass may be unscaled again).

        Returns:
            True when the weights were perturbed and a second pass and :meth:`second_step` must
            follow (always, for SAM, ASAM and USAM). False when the step is already over: the
            optimizer chose a one-pass step (:meth:`_two_pass_`: LookSAM between full steps, a
            schedule) and the base optimizer has stepped with the first-pass gradient, or
            ``skip_non_finite`` skipped a non-finite step. The explicit form is therefore
            ``if opt.first_step(): <second pass>; opt.second_step()``.

        Raises:
            RuntimeError: the gradients that ``second_step(zero_grad=False)`` kept are still
                there, uncleared (no ``opt.zero_grad()`` since, the same gradient tensors): the
                backward pass of this step added to the last step's second-pass gradient.
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice without second_step() in between")
        self._check_grads_cleared()
        self._one_pass_done = False
        buckets = self._buckets()
        use_scaler = scaler is not None and scaler.is_enabled()
        scaled = use_scaler and not self._unscaled_by_user(scaler)
        self._first_pass_finite = None
        if use_scaler:
            self._first_pass_finite = self._sanitize_non_finite_(buckets)
        elif self.skip_non_finite and buckets and not self._all_finite(buckets):
            self.skipped_steps += 1
            if zero_grad:
                self.zero_grad()
            self._one_pass_done = True
            return False
        if buckets and not self._two_pass_(buckets, scaler if scaled else None):
            if scaled:
                self._unscale_(scaler)
            self._one_pass_descent_(buckets)
            self._clip_(buckets)
            self._base_step(scaler, buckets)
            if zero_grad:
                self.zero_grad()
            self._one_pass_done = True
            return False
        if use_scaler and not scaled:
            self._clear_first_pass_unscale(scaler)
        needs_unscaled = self._ascent_needs_unscaled_grads or bool(
            getattr(self.ascent, "needs_unscaled_grads", False)
        )
        if scaled and (self._keeps_first_grads or needs_unscaled):
            # the descent rule mixes g with the (unscaled) g_p: keep g in the same units;
            # the reciprocal in float64 as GradScaler.unscale_ does, no host sync
            inv_scale = scaler._scale.double().reciprocal().float()
            for b in buckets:
                torch._foreach_mul_(b.grads, inv_scale.to(b.grads[0].device))
        if self._keeps_first_grads:
            self._zero_stale_first_grads(buckets)
            for b in buckets:
                torch._foreach_copy_(b.first_grads, b.grads)
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

    @_not_compiled
    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step`, bit for bit, without stepping."""
        if self._perturbed is None:
            if self._one_pass_done:
                raise RuntimeError(
                    "restore()/second_step() needs a first_step() before it that perturbed the "
                    "weights, but the last first_step() returned False: it took a one-pass step "
                    "(the base optimizer has already stepped) or skipped a non-finite step. Run "
                    "the second pass and second_step() only when first_step() returns True: "
                    "`if opt.first_step(): loss_fn(model(x), y).backward(); opt.second_step()`"
                )
            raise RuntimeError("restore()/second_step() needs a first_step() before it")
        for b in self._perturbed:
            kernels.restore_(b.params, b.backups)
        self._perturbed = None

    @_not_compiled
    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient at ``w + ε``.

        With a ``scaler``, the gradients are unscaled once (or taken as they are when
        ``scaler.unscale_(opt)`` was called on this optimizer or its base after the second
        backward pass), rewritten by the variant's descent rule, clipped to ``max_grad_norm``,
        and the step goes through ``scaler.step(base_optimizer)``: it is skipped when the
        gradients of either pass were non-finite. Call ``scaler.update()`` afterwards, as in
        any AMP loop.

        Args:
            zero_grad: clear the gradients after the step (default True). They hold the
                gradient at ``w + ε``, which must not enter the next step's first pass: with
                them cleared, the explicit form in a loop (``backward(); first_step();
                backward(); second_step()``, no ``zero_grad()`` of its own) equals the closure
                form step for step, as :meth:`first_step` already clears ``ε``. ``False`` keeps
                them (to read or log them after the step, as ``step(closure)`` does); the next
                :meth:`first_step` then refuses to run until they are cleared
                (``opt.zero_grad()``, or new gradient tensors), rather than mixing two steps'
                gradients silently. Gradient accumulation over micro-batches within a pass is
                unaffected: nothing is cleared between the backward calls of one pass.
            scaler: the ``torch.amp.GradScaler`` that scaled the loss, if any (see above).
        """
        self.restore()
        self._descend_(scaler)
        if zero_grad:
            self.zero_grad()
        else:
            self._keep_grads()

    def _descend_(self, scaler: torch.amp.GradScaler | None) -> None:
        """The tail of :meth:`second_step` with ``w`` restored and the step's direction in the
        gradients: unscale once, the variant's descent rule, the clip to ``max_grad_norm``, the
        base step (through the scaler; skipped as ``skip_non_finite`` says). Also used by
        :func:`samkit.m_sharpness_step` with the averaged per-micro-batch gradients."""
        use_scaler = scaler is not None and scaler.is_enabled()
        buckets = self._buckets()  # the second pass's gradient tensors
        if use_scaler:
            self._unscale_(scaler)
        if buckets and type(self)._descent_ is not SharpnessAwareOptimizer._descent_:
            self._descent_(buckets)
        self._clip_(buckets)
        if not use_scaler and self.skip_non_finite and buckets and not self._all_finite(buckets):
            self.skipped_steps += 1  # w is already restored: keep it
            self._first_pass_finite = None
        else:
            self._base_step(scaler, buckets)

    def _keep_grads(self) -> None:
        """Remember the gradients ``second_step(zero_grad=False)`` leaves (weak references: no
        memory is held) for :meth:`_check_grads_cleared`."""
        self._left_grads = [
            (p, weakref.ref(p.grad))
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        self._left_calls = self._zero_grad_calls

    def _check_grads_cleared(self) -> None:
        """Refuse a first pass that added to the gradients a ``second_step(zero_grad=False)``
        kept (no ``zero_grad()`` since, the very same tensors)."""
        left = self._left_grads
        if not left or self._zero_grad_calls != self._left_calls:
            self._left_grads = None
            return
        if any(p.grad is not None and ref() is p.grad for p, ref in left):
            raise RuntimeError(
                f"{type(self).__name__}.first_step(): the gradients kept by the last "
                "second_step(zero_grad=False) were not cleared, so this step's first-pass "
                "gradient includes the last step's gradient at w + eps. Call opt.zero_grad() "
                "before the first backward pass of each step, or use second_step() (it clears "
                "the gradients by default)"
            )
        self._left_grads = None

    def _base_step(self, scaler: torch.amp.GradScaler | None, buckets=None) -> None:
        """The base optimizer's step with the gradients as they are (through the scaler)."""
        if scaler is not None and scaler.is_enabled():
            self._unscale_(scaler)  # a no-op when already unscaled
            self._record_first_pass_non_finite(scaler)
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._first_pass_finite = None
        self._opt_called = True  # tells LR schedulers that the optimizer stepped

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._zero_grad_calls = getattr(self, "_zero_grad_calls", 0) + 1
        self._left_grads = None
        super().zero_grad(set_to_none=set_to_none)

    @_not_compiled
    def step(self, closure: Closure | None = None, scaler: torch.amp.GradScaler | None = None):
        """One full sharpness-aware step: runs ``closure`` at ``w``, then at ``w + ε``.

        The closure must zero the gradients, compute the loss, call ``backward()`` and return
        the loss (scaled backward with a ``scaler``). Returns the loss of the first pass, at
        ``w``, so closure-driven trainers (Lightning's automatic optimization) log the usual loss.

        A closure that does not zero the gradients while gradients are present when ``step``
        is called (davda54/sam's pattern: the first backward outside the closure) is refused
        with a ``ValueError``: it would silently add the old gradients into the first pass.
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss (it is called twice); or call "
                "first_step() and second_step() yourself"
            )
        present = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}
        entry_norm = None
        if present:  # no host sync here; read only for a closure that did not zero
            local = [g.to_local() if kernels._is_dtensor(g) else g for g in present.values()]
            entry_norm = kernels.global_sq_norm(
                b[0] for b in kernels.group_by_device_and_dtype(local)
            )
        calls = self._zero_grad_calls
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError(
                "Invalid closure: it returned None (allowed: the loss, as a tensor or a number)"
            )
        if (
            present
            and self._zero_grad_calls == calls
            and any(p.grad is grad for p, grad in present.items())
            and bool(entry_norm > 0)  # one host sync, only for a closure that did not zero
        ):
            self.zero_grad()
            raise ValueError(
                f"Invalid closure: gradients were already present at w when "
                f"{type(self).__name__}.step(closure) was called, and the closure added to them "
                "without zeroing them (davda54/sam's pattern, with the first backward outside the "
                "closure, would run three passes and mix two gradients). step() runs the first "
                "pass itself: call opt.zero_grad() at the start of the closure and drop the "
                "backward before step(); or keep your first backward and call opt.first_step(), "
                "the second pass, then opt.second_step()"
            )
        if self.first_step(zero_grad=True, scaler=scaler):  # False: a one-pass step, done
            with torch.enable_grad():
                closure()
            # the gradients at w + eps stay after step(), as torch.optim leaves them (the
            # next closure zeroes them; trainers log their norm)
            self.second_step(zero_grad=False, scaler=scaler)
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (whose groups hold our keys too) plus our own state."""
        state = self.base_optimizer.state_dict()
        own = super().state_dict()["state"]
        own = {i: {k: v for k, v in s.items() if k not in _TRANSIENT_STATE} for i, s in own.items()}
        state["sharpness_aware"] = {"state": {i: s for i, s in own.items() if s}}
        extra = self._global_state_dict()
        if extra:
            state["sharpness_aware"]["global"] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("sharpness_aware", {"state": {}})
        self.base_optimizer.load_state_dict(state_dict)
        super().load_state_dict({"state": own["state"], "param_groups": state_dict["param_groups"]})
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

    def __getstate__(self) -> dict[str, Any]:
        """Everything but torch.optim's hooks and an LR scheduler's patched ``step``: so that
        ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` keep the base optimizer (which
        shares the very same group dicts) and our own attributes."""
        state = picklable_state(self, super().__getstate__())
        state.pop("_left_grads", None)  # weak references to this step's gradients
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_perturbed", None)
        self.__dict__.setdefault("_first_pass_finite", None)
        self.__dict__.setdefault("_one_pass_done", False)
        self.__dict__.setdefault("_zero_grad_calls", 0)
        self.__dict__.setdefault("_left_grads", None)
        self.__dict__.setdefault("skip_non_finite", False)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("schedule", None)
        if "base_optimizer" in self.__dict__:
            self.param_groups = self.base_optimizer.param_groups
        self._fill_defaults()

    def __repr__(self) -> str:
        own = {k: v for k, v in self.defaults.items() if k not in self.base_optimizer.defaults}
        args = ", ".join(f"{k}={v!r}" for k, v in own.items())
        return f"{type(self).__name__}({self.base_optimizer!r}, {args})"
