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

:class:`SharpnessAwareOptimizer` is the two-pass family on the one base of every wrapping
optimizer, :class:`samkit.optim.wrapper.WrappingOptimizer` (validation, group sharing, clipping,
non-finite skip, AMP through :mod:`samkit.optim.amp`, the state namespace, pickling).

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

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim import amp, kernels
from samkit.optim.kind import StepForm
from samkit.optim.wrapper import (  # noqa: F401  (re-exported: the names' old home)
    _TRANSIENT_STATE,
    Bucket,
    Closure,
    WrappingOptimizer,
    _not_compiled,
    _replicated_with_shards,
    accepts_base_class,
    picklable_state,
)


class SharpnessAwareOptimizer(WrappingOptimizer):
    """The two-pass family: wraps a ``torch.optim.Optimizer`` instance and shares its
    ``param_groups``; each step runs a pass at ``w`` and, after the ascent, one at ``w + ε``.

    Args:
        base_optimizer, defaults, max_grad_norm, skip_non_finite: see
            :class:`~samkit.optim.wrapper.WrappingOptimizer`.

    Use either ``loss = opt.step(closure)`` (the closure zeroes the gradients, runs the forward
    and backward pass and returns the loss; it is called twice) or the explicit form
    ``first_step()`` / ``second_step()``.
    """

    step_form = StepForm.TWO_PASS
    _rewrite_hooks = ("_two_pass_", "_descent_", "_one_pass_descent_")

    def __init__(
        self,
        base_optimizer,
        defaults: dict[str, Any],
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        super().__init__(base_optimizer, defaults, max_grad_norm, skip_non_finite)
        self._one_pass_done = False  # the last first_step() took a one-pass step
        self._left_grads: list[tuple[Tensor, Any]] | None = None  # see second_step(zero_grad)
        # An optional step schedule (AE-SAM, RST, see samkit.optim.schedules): an object with
        # use_sam(optimizer, buckets, scaler) -> bool, state_dict() and load_state_dict().
        self.schedule = None

    @property
    def accepts_schedule(self) -> bool:
        """Can a step schedule decide this optimizer's steps (it does not decide them itself,
        as LookSAM does)?"""
        return "_two_pass_" not in self.descent_rewrites()

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

    def _two_pass_(self, buckets: list[Bucket], scaler: torch.amp.GradScaler | None) -> bool:
        """After the first pass: is this a sharpness-aware (two-pass) step?

        ``buckets`` hold the first-pass gradients (scaled by ``scaler`` when one is given; the
        non-finite ones already zeroed). Returning False makes :meth:`first_step` descend with
        the first-pass gradient at once (after :meth:`_one_pass_descent_`), so the step costs
        one forward-backward pass. The default asks :attr:`schedule`, if one is set.
        """
        return self.schedule is None or bool(self.schedule.use_sam(self, buckets, scaler))

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
        return {**state, **super()._global_state_dict()}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        super()._load_global_state_dict(state)

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` (two-pass) and :meth:`second_step`/:meth:`restore`:
        the weights are at ``w + ε``. Closures use it to tell the passes apart, e.g. to run the
        perturbed pass under :func:`samkit.disable_running_stats`."""
        return self._perturbed is not None

    # ------------------------------------------------------------------ the protocol

    def before_first_pass(self) -> None:
        """Called before the first forward pass of a step (``step(closure)`` calls it; the
        explicit form calls it before its first forward pass). A no-op for every optimizer
        whose first pass is at ``w``; bSAM moves the weights to a posterior sample here
        (:meth:`samkit.optim.BSAM.add_noise`), and :meth:`first_step` moves them back."""

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
        use_scaler = amp.enabled(scaler)
        scaled = use_scaler and not amp.unscaled_by_user(scaler, self, self.base_optimizer)
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
            # a one-pass step: descend with the first-pass gradient now (finite, or the scaler
            # skips the step)
            self._finish_step_(scaler, buckets, self._one_pass_descent_, check_finite=False)
            if zero_grad:
                self.zero_grad()
            self._one_pass_done = True
            return False
        if use_scaler and not scaled:  # the second pass may be unscaled again
            amp.clear_unscale(scaler, self, self.base_optimizer)
        needs_unscaled = self._ascent_needs_unscaled_grads or bool(
            getattr(self.ascent, "needs_unscaled_grads", False)
        )
        if scaled and (self._keeps_first_grads or needs_unscaled):
            # the descent rule mixes g with the (unscaled) g_p: keep g in the same units;
            # the reciprocal in float64 as GradScaler.unscale_ does, no host sync
            inv_scale = amp.inv_scale(scaler)
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

    def _restore_error(self) -> str:
        if self._one_pass_done:
            return (
                "restore()/second_step() needs a first_step() before it that perturbed the "
                "weights, but the last first_step() returned False: it took a one-pass step "
                "(the base optimizer has already stepped) or skipped a non-finite step. Run "
                "the second pass and second_step() only when first_step() returns True: "
                "`if opt.first_step(): loss_fn(model(x), y).backward(); opt.second_step()`"
            )
        return "restore()/second_step() needs a first_step() before it"

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
        gradients (:meth:`~samkit.optim.wrapper.WrappingOptimizer._finish_step_`): unscale once,
        the variant's descent rule, the clip to ``max_grad_norm``, the base step (through the
        scaler; skipped as ``skip_non_finite`` says). Also used by :meth:`m_sharpness_step`
        with the averaged per-micro-batch gradients."""
        self._finish_step_(scaler)

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


    def zero_grad(self, set_to_none: bool = True) -> None:
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
            local = [g.to_local() if kernels.is_dtensor(g) else g for g in present.values()]
            entry_norm = kernels.global_sq_norm(
                b[0] for b in kernels.group_by_device_and_dtype(local)
            )
        calls = self._zero_grad_calls
        self.before_first_pass()
        with torch.enable_grad():
            loss = closure()
        self._checked_loss(loss)
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

    def m_sharpness_step(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        micro_batches: Sequence[tuple[Tensor, Tensor]],
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        r"""One step with a separate perturbation per micro-batch; returns the mean loss at ``w``.

        .. math::
            \epsilon_k = \mathrm{ascent}(w, \nabla L_{B_k}(w); \rho), \qquad
            d = \sum_k \tfrac{|B_k|}{|B|} \nabla L_{B_k}(w + \epsilon_k), \qquad
            w \leftarrow \mathrm{base\_step}\big(w, \mathrm{clip}(d)\big)

        Each micro-batch takes the first half of the protocol (gradient at ``w``,
        :meth:`first_step`, gradient at ``w + ε_k`` with BatchNorm running statistics untouched,
        back to ``w`` bit for bit); its weighted second-pass gradient is added to one
        accumulator. Then the descent tail runs once on the average: unscaled once
        (``scaler``), clipped once to ``max_grad_norm`` (the step's direction, not each
        micro-batch's), one base step (``scaler.step(base)`` with a scaler; skipped when any
        pass of any micro-batch was non-finite, as :meth:`second_step` does). The gradients
        are cleared afterwards. See :func:`samkit.m_sharpness_step`.
        """
        from samkit.step import check_micro_batches, step_closure

        why = self.step_rewrites()
        if why is not None:
            raise ValueError(
                f"Invalid optimizer: {type(self).__name__} {why}"
                "; m_sharpness_step takes optimizers that always run two passes and descend with "
                "the perturbed gradient (SAM, ASAM, USAM, FisherSAM, FriendlySAM, ...)"
            )
        sizes = check_micro_batches(micro_batches)
        total = sum(sizes)
        scaler = scaler if amp.enabled(scaler) else None
        sums: dict[Tensor, Tensor] = {}
        first_finite: list[Tensor] = []
        mean = None
        self.zero_grad()
        for (x, y), n in zip(micro_batches, sizes, strict=True):
            weight = n / total
            closure = step_closure(self, model, loss_fn, [(x, y)], scaler=scaler)
            with torch.enable_grad():
                loss = closure()  # zeroes the gradients: the gradient of this micro-batch at w
            loss = torch.as_tensor(loss).detach()
            mean = loss * weight if mean is None else mean + loss * weight
            if not self.first_step(zero_grad=True, scaler=scaler):
                # only skip_non_finite says False here (step_rewrites is None): skipped
                self.zero_grad()
                return mean
            if self._first_pass_finite is not None:  # under a scaler: kept for the base step
                first_finite.append(self._first_pass_finite)
                self._first_pass_finite = None
            with torch.enable_grad():
                closure()  # at w + eps_k, BatchNorm statistics untouched
            self.restore()
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        if p in sums:
                            sums[p].add_(p.grad, alpha=weight)
                        else:
                            sums[p] = p.grad.mul(weight)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = sums.get(p)
        if first_finite:
            device = first_finite[0].device
            self._first_pass_finite = torch.stack([f.to(device) for f in first_finite]).all()
        with torch.no_grad():
            self._descend_(scaler)
        self.zero_grad()
        return mean

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_left_grads", None)  # weak references to this step's gradients
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_one_pass_done", False)
        self.__dict__.setdefault("_left_grads", None)
        self.__dict__.setdefault("schedule", None)
