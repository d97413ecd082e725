r"""The one base of every samkit optimizer that wraps a torch optimizer.

:class:`WrappingOptimizer` holds what all of them share, once:

* the wrapping: validation of the base optimizer (an instance, not already wrapped, real float
  parameters, no hyperparameter name clash), the shared ``param_groups`` (LR schedulers,
  ``state_dict``, Lightning and Hugging Face see one optimizer), defaults filled into every group
  (also groups added later or loaded from an older checkpoint), ``add_param_group``;
* the tail of every step (:meth:`WrappingOptimizer._finish_step_`): the gradients unscaled once
  under AMP (through :mod:`samkit.optim.amp`, the only module that touches GradScaler internals),
  the variant's rewrite, the clip to ``max_grad_norm`` (one numerics for every optimizer), the
  non-finite skip, the base step (through ``scaler.step``; over a plain ``torch.optim.SGD``
  samkit takes it itself with foreach kernels, torch's result bit for bit), the variant's
  after-step hook;
* the state: the per-parameter state and the optimizer-level state in one namespace of the base
  optimizer's state dict, pickling (``copy.deepcopy``, ``torch.save(opt)``), ``__setstate__``
  that fills new attributes so old pickles load;
* the declarations (:mod:`samkit.optim.kind`): :attr:`~WrappingOptimizer.step_form`, the ascent
  (if any), the descent rewrites, :attr:`~WrappingOptimizer.batch_needs`, ``is_perturbed``: what
  the step engine, :mod:`samkit.stability`, the edge tracker and the integrations read, instead
  of testing classes.

On it stand four small families (:class:`~samkit.optim.kind.StepForm`): two-pass
(:class:`~samkit.optim.base.SharpnessAwareOptimizer`: SAM, ASAM, GSAM, LookSAM, ...),
example-selecting on the two-pass one (:class:`~samkit.optim.selecting.ExampleSelectingOptimizer`:
ESAM), one-pass (:class:`~samkit.optim.onepass.OnePassOptimizer`: MSAM) and loss-term
(:class:`~samkit.optim.lossterm.LossTermOptimizer`: SAF, MESA). A new method of any family is a
subclass with its own hooks only (``tests/optim/test_new_methods.py`` writes two in < 40 lines).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from samkit.optim import amp, kernels
from samkit.optim._validation import check_optimizer, check_positive
from samkit.optim.davda54 import accepts_base_class
from samkit.optim.kind import OptimizerKind, StepForm, wrapper_kind

Closure = Callable[[], Any]

#: one bucket of a base step samkit takes itself (see WrappingOptimizer._plain_sgd_buckets):
#: its param group, parameters, gradients and momentum buffers (None without momentum)
SGDBucket = tuple[dict[str, Any], list[Tensor], list[Tensor], "list[Tensor] | None"]

# Per-parameter state entries that only live within a step; they are not saved by state_dict
# (a checkpoint is always taken between full steps).
_TRANSIENT_STATE = ("w_backup", "grad_first")

# descent_rewrites() per class (hooks are class attributes: looked up once)
_REWRITES: dict[type, tuple[str, ...]] = {}

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


class WrappingOptimizer(Optimizer):
    """Base class: wraps a ``torch.optim.Optimizer`` instance and shares its ``param_groups``.

    Args:
        base_optimizer: the optimizer that takes the descent step (SGD, AdamW, ...), already
            built over the model's parameters.
        defaults: this optimizer's own per-group hyperparameters (``rho`` and friends). They
            are added to every param group that lacks them, so a group may override them and a
            schedule may change them between steps.
        max_grad_norm: clip the direction the base optimizer steps with (after the variant's
            rewrite of the gradient, after unscaling under AMP, on every kind of step) to this
            Euclidean norm, as ``torch.nn.utils.clip_grad_norm_`` would. The norm spans every
            param group; the limit is a per-group key (``group["max_grad_norm"]``, None: that
            group is not clipped). Default None: no clipping.
        skip_non_finite: without a GradScaler, check each pass for inf/NaN (one host sync per
            pass): a non-finite step is skipped, ``w`` is kept and :attr:`skipped_steps` counts
            it. With a scaler the scaler decides, as always. Default False.
    """

    # ------------------------------------------------------------------ declarations

    #: How a step runs its passes (see :class:`samkit.optim.kind.StepForm`).
    step_form: StepForm = StepForm.TWO_PASS
    #: What the caller must give with each batch (names of :class:`samkit.step.BatchInfo` fields).
    batch_needs: frozenset[str] = frozenset()
    #: The ascent record (:class:`samkit.optim.ascents.Ascent`) when ε comes from one.
    ascent: Any = None
    #: The key of this optimizer's own state in the base optimizer's state dict.
    _state_namespace = "sharpness_aware"
    #: Can a step schedule (AE-SAM, RST) decide which steps take two passes?
    accepts_schedule = False
    # Hooks that rewrite the step direction (their names, when overridden, make step_rewrites).
    _rewrite_hooks: tuple[str, ...] = ("_descent_",)

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
        if isinstance(base_optimizer, WrappingOptimizer) or hasattr(
            base_optimizer, "base_optimizer"
        ):
            raise ValueError(
                f"Invalid base_optimizer: {type(base_optimizer).__name__} already wraps an "
                "optimizer: it is already sharpness-aware (allowed: a plain torch.optim optimizer)"
            )
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
        self._wrapping = True  # add_param_group goes to the base optimizer from now on
        self._perturbed: list[Bucket] | None = None
        self._first_pass_finite: Tensor | None = None
        self._zero_grad_calls = 0
        self.skip_non_finite = skip_non_finite
        self.skipped_steps = 0  # steps skipped by skip_non_finite

    # ------------------------------------------------------------------ what callers read

    @property
    def kind(self) -> OptimizerKind:
        """What this optimizer is, as the step engine, the edges and the integrations need it
        (:class:`samkit.optim.kind.OptimizerKind`), from its declarations."""
        return wrapper_kind(self)

    @property
    def is_perturbed(self) -> bool:
        """True while the coming pass is an *extra* pass at ``w + ε`` (between a two-pass
        optimizer's :meth:`first_step` and :meth:`second_step`): closures run it under
        :func:`samkit.disable_running_stats`. False for the step's own pass, even when the
        weights are moved for it (a one-pass optimizer: see :attr:`weights_perturbed`)."""
        return False

    @property
    def weights_perturbed(self) -> bool:
        """True while the weights are away from ``w`` (restored by :meth:`restore`)."""
        return self._perturbed is not None

    def at_weights(self):
        """A context manager in which the model is at its weights ``w`` (to evaluate, measure or
        save). Between steps every optimizer but a one-pass one already holds ``w`` (this is
        then a no-op); a one-pass optimizer holds ``w + ε`` and moves to ``w`` and back (see
        :meth:`samkit.optim.onepass.OnePassOptimizer.at_weights`). Refused between the two
        passes of a step."""
        if self._perturbed is not None:
            raise RuntimeError("at_weights() between the passes of a step: use it between steps")
        return contextlib.nullcontext()

    def descent_rewrites(self) -> list[str]:
        """The hooks this optimizer overrides that rewrite its step direction (empty: it descends
        with the gradient of its (last) pass)."""
        cls = type(self)
        found = _REWRITES.get(cls)
        if found is None:  # the class's hooks are fixed: found once per class
            found = _REWRITES[cls] = tuple(
                h for h in cls._rewrite_hooks if getattr(cls, h) is not _default_hook(cls, h))
        return list(found)

    def edge_note(self) -> str:
        """Why no closed-form edge applies to this optimizer whatever its ascent, or ''
        (a loss-term optimizer says so; :attr:`kind` adds the ascent's and the base's reasons)."""
        return ""

    def step_rewrites(self) -> str | None:
        """Why a step is more than "descend with the gradient of the pass at ``w + ε``", or
        None: per-micro-batch (:meth:`m_sharpness_step`) and per-replica perturbation
        (``perturbation="local"``) cannot take such optimizers."""
        return self.kind.descent.note or None

    # ------------------------------------------------------------------ hooks

    def _descent_(self, buckets: list[Bucket]) -> None:
        """Rewrite the step direction (``bucket.grads``) in place before the clip and the base
        step; ``w`` is restored, so ``bucket.backups`` is scratch space. Default: unchanged."""

    def _before_base_step_(self, buckets: list[Bucket]) -> None:
        """Called with the final (clipped) direction just before the base step is attempted."""

    def _after_step_(self) -> None:
        """Called after every base step that was taken (not after a skipped one)."""

    def _global_state_dict(self) -> dict[str, Any]:
        """Optimizer-level state saved by :meth:`state_dict` (counters, running statistics,
        generator states). Subclasses extend the dict returned by ``super()``."""
        return {"skipped_steps": self.skipped_steps} if self.skipped_steps else {}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # ------------------------------------------------------------------ buckets

    _keeps_first_grads = False  # keep a copy of the first-pass gradient (GSAM, LookSAM)

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
            lists = [params, grads, [self._state_tensor(p, "w_backup", empty=True)
                                     for p in params]]
            if self._keeps_first_grads:  # zero: a parameter without a first-pass gradient
                lists.append([self._state_tensor(p, "grad_first") for p in params])
            # FSDP2 (DTensor) parameters: the kernels work on the local shards, and the norms
            # are all-reduced once (kernels.ShardedTensors); plain tensors pass through as is.
            for info, parts in kernels.split_sharded(*lists):
                for bucket_lists in kernels.group_by_device_and_dtype(*parts):
                    if info is not None:
                        bucket_lists = [kernels.ShardedTensors(t, *info) for t in bucket_lists]
                    buckets.append(Bucket(group, *bucket_lists))
        return _replicated_with_shards(buckets)

    def _state_tensor(self, p: Tensor, key: str, empty: bool = False) -> Tensor:
        """``self.state[p][key]``, allocated once like ``p`` (uninitialised or zero)."""
        state = self.state[p]
        if key not in state:
            make = torch.empty_like if empty else torch.zeros_like
            state[key] = make(p, memory_format=torch.preserve_format)
        return state[key]

    # ------------------------------------------------------------------ the step's tail

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

    def _unscale_(self, scaler) -> None:
        """Unscale the gradients once (see :func:`samkit.optim.amp.unscale_once`)."""
        amp.unscale_once(scaler, self, self.base_optimizer)

    def _finish_step_(
        self,
        scaler: torch.amp.GradScaler | None,
        buckets: list[Bucket] | None = None,
        rewrite: Callable[[list[Bucket]], None] | None = None,
        check_finite: bool = True,
    ) -> bool:
        """The tail of every step, with ``w`` in place and the direction in the gradients:
        unscale once (``scaler``), ``rewrite`` (default :meth:`_descent_`), the clip to
        ``max_grad_norm``, the non-finite skip (``skip_non_finite`` without a scaler, when
        ``check_finite``), :meth:`_before_base_step_`, the base step (through the scaler) and
        :meth:`_after_step_`. Returns whether the base step was taken (under a scaler: was not
        skipped for inf/NaN; only computed, at one host sync, when :meth:`_after_step_` is
        overridden, else assumed)."""
        use_scaler = amp.enabled(scaler)
        if buckets is None and rewrite is None and not self._tail_needs_buckets(check_finite):
            # nothing to rewrite, clip or check (SAF, MESA, MSAM over a momentum base): the
            # base step straight away, without building the buckets
            if use_scaler:
                self._unscale_(scaler)
            stepped = self._base_step(scaler)
            if stepped:
                self._after_step_()
            return stepped
        if buckets is None:
            buckets = self._buckets()
        if use_scaler:
            self._unscale_(scaler)
        if buckets:
            (rewrite or self._descent_)(buckets)
        self._clip_(buckets)
        if (check_finite and not use_scaler and self.skip_non_finite and buckets
                and not self._all_finite(buckets)):
            self.skipped_steps += 1  # w is in place: keep it
            self._first_pass_finite = None
            return False
        self._before_base_step_(buckets)
        stepped = self._base_step(scaler)
        if stepped:
            self._after_step_()
        return stepped

    def _tail_needs_buckets(self, check_finite: bool) -> bool:
        """Does the tail of a step need the gradients in buckets: a rewrite of the direction,
        a clip, a non-finite check or a :meth:`_before_base_step_` that does something?"""
        if self.descent_rewrites() or self._before_base_step_needed():
            return True
        if check_finite and self.skip_non_finite:
            return True
        return any(g.get("max_grad_norm") is not None for g in self.param_groups)

    def _before_base_step_needed(self) -> bool:
        """Has :meth:`_before_base_step_` work to do in this step (default: when overridden)?"""
        return type(self)._before_base_step_ is not WrappingOptimizer._before_base_step_

    def _base_step(self, scaler: torch.amp.GradScaler | None) -> bool:
        """The base optimizer's step with the gradients as they are (through the scaler, with
        the earlier pass's non-finite flag added to its record). Over a plain SGD without a
        scaler samkit takes it itself (:meth:`_plain_sgd_buckets`)."""
        stepped = True
        sgd = None if amp.enabled(scaler) else self._plain_sgd_buckets()
        if sgd is not None:
            for group, params, grads, bufs in sgd:
                direction = kernels.sgd_direction_(params, grads, bufs, group["momentum"],
                                                   group["dampening"], group["weight_decay"])
                torch._foreach_add_(params, direction, alpha=-group["lr"])
            self.base_optimizer._opt_called = True
        elif amp.enabled(scaler):
            self._unscale_(scaler)  # a no-op when already unscaled
            amp.record_non_finite(scaler, self.base_optimizer, self._first_pass_finite)
            if type(self)._after_step_ is not WrappingOptimizer._after_step_:
                stepped = not amp.found_inf(scaler, self.base_optimizer)
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._first_pass_finite = None
        self._opt_called = True  # tells LR schedulers that the optimizer stepped
        return stepped

    def _plain_sgd_buckets(self) -> list[SGDBucket] | None:
        """The base step's tensors, per param group and bucket, when samkit takes the step of
        a plain ``torch.optim.SGD`` itself: foreach kernels in torch's order (so its result bit
        for bit, without its per-parameter loop; see :func:`samkit.optim.kernels.sgd_direction_`).

        Only for the exact class ``torch.optim.SGD`` without step hooks or a patched ``step``
        (but an LR scheduler's, which only records the call), float hyperparameters, no Nesterov,
        ``maximize``, ``fused`` or ``differentiable``, dense non-distributed tensors, and the
        momentum buffers present (torch's SGD makes them in its first step). Else None: the
        base optimizer's own ``step``. (The step then does not appear as ``Optimizer.step#SGD``
        in a profiler's trace.)"""
        base = self.base_optimizer
        if type(base) is not torch.optim.SGD:
            return None
        patched = base.__dict__.get("step")
        if ((patched is not None and not hasattr(patched, "_wrapped_by_lr_sched"))
                or base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks
                or _torch_optimizer._global_optimizer_post_hooks):
            return None
        out: list[SGDBucket] = []
        state = base.state
        for group in self.param_groups:
            if (type(group["lr"]) is not float
                    or not all(type(group[k]) in (float, int)
                               for k in ("momentum", "dampening", "weight_decay"))
                    or group["nesterov"] or group["maximize"] or group.get("fused")
                    or group.get("differentiable")):
                return None
            with_momentum = group["momentum"] != 0
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or kernels.is_dtensor(p):
                    return None
                params.append(p)
                grads.append(p.grad)
                if with_momentum:
                    buf = state[p].get("momentum_buffer") if p in state else None
                    if buf is None:
                        return None
                    bufs.append(buf)
            if not params:
                continue
            lists = (params, grads, bufs) if with_momentum else (params, grads)
            for bucket in kernels.group_by_device_and_dtype(*lists):
                out.append((group, bucket[0], bucket[1], bucket[2] if with_momentum else None))
        return out

    @_not_compiled
    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved before the perturbed pass, bit for bit, without stepping."""
        if self._perturbed is None:
            raise RuntimeError(self._restore_error())
        for b in self._perturbed:
            kernels.restore_(b.params, b.backups)
        self._perturbed = None

    def _restore_error(self) -> str:
        return "restore() needs perturbed weights before it"

    # ------------------------------------------------------------------ the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._zero_grad_calls = getattr(self, "_zero_grad_calls", 0) + 1
        super().zero_grad(set_to_none=set_to_none)

    def step(self, closure: Closure | None = None, scaler: torch.amp.GradScaler | None = None):
        raise NotImplementedError

    @staticmethod
    def _checked_loss(loss: Any) -> Any:
        if loss is None:
            raise ValueError(
                "Invalid closure: it returned None (allowed: the loss, as a tensor or a number)"
            )
        return loss

    def accumulation_closure(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        micro_batches: Sequence[tuple[Tensor, Tensor]],
        scaler: torch.amp.GradScaler | None = None,
    ) -> Callable[[], Tensor]:
        """A closure for ``self.step`` that accumulates the gradient over ``micro_batches``
        (each loss weighted by its share of the examples; the mean loss is returned, detached;
        an extra perturbed pass leaves BatchNorm statistics alone): see :mod:`samkit.step`."""
        from samkit.step import step_closure

        return step_closure(self, model, loss_fn, micro_batches, scaler=scaler)

    # ------------------------------------------------------------------ state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (its defaults), with this optimizer's keys."""
        if not self.__dict__.get("_wrapping", False):  # from torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._fill_defaults()

    def _fill_defaults(self) -> None:
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _pack_own_state(self, params: dict[int, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """This optimizer's entry in the state dict: per-parameter state (by index) and the
        optimizer-level state."""
        own: dict[str, Any] = {"state": params}
        if extra:
            own["global"] = extra
        return own

    def _unpack_own_state(self, own: dict[str, Any]) -> tuple[dict[int, Any], dict[str, Any]]:
        return own.get("state", {}), own.get("global", {})

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (whose groups hold our keys too) plus our own state
        under :attr:`_state_namespace`."""
        state = self.base_optimizer.state_dict()
        own = super().state_dict()["state"]
        own = {i: {k: v for k, v in s.items() if k not in _TRANSIENT_STATE} for i, s in own.items()}
        params = {i: s for i, s in own.items() if s}
        state[self._state_namespace] = self._pack_own_state(params, self._global_state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        params, extra = self._unpack_own_state(state_dict.pop(self._state_namespace, {}))
        self.base_optimizer.load_state_dict(state_dict)
        super().load_state_dict({"state": params, "param_groups": state_dict["param_groups"]})
        # Loading gives the base optimizer new group dicts: share them again and fill our
        # keys into groups saved by an older version or by the plain base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self._fill_defaults()
        self._perturbed = None
        self._load_global_state_dict(extra)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but torch.optim's hooks and an LR scheduler's patched ``step``: so that
        ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` keep the base optimizer (which
        shares the very same group dicts) and our own attributes."""
        return picklable_state(self, super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in (("_perturbed", None), ("_first_pass_finite", None),
                           ("_zero_grad_calls", 0), ("skip_non_finite", False),
                           ("skipped_steps", 0), ("_wrapping", True)):
            self.__dict__.setdefault(key, value)
        if "base_optimizer" in self.__dict__:
            self.param_groups = self.base_optimizer.param_groups
        self._fill_defaults()

    def _repr_args(self) -> str:
        own = {k: v for k, v in self.defaults.items() if k not in self.base_optimizer.defaults}
        return ", ".join(f"{k}={v!r}" for k, v in own.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_optimizer!r}, {self._repr_args()})"


def _default_hook(cls: type, name: str) -> Any:
    """The do-nothing default of hook ``name``: its definition highest in ``cls``'s MRO."""
    return next(c.__dict__[name] for c in reversed(cls.__mro__) if name in c.__dict__)
