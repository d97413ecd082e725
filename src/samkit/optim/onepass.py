r"""One-pass optimizers: one forward-backward pass per step, at weights moved by an ε that comes
from the optimizer's state (MSAM: its momentum), not from this step's gradient.

A step of a :class:`OnePassOptimizer` is

.. math::
    g_t = \nabla L(w_t + \epsilon_t), \qquad
    w_{t+1} = \mathrm{base\_step}(w_t, g_t), \qquad
    \epsilon_{t+1} = \rho\, s\, \frac{d_{t+1}}{\|d_{t+1}\|_2}

with the direction :math:`d` of :meth:`OnePassOptimizer._direction` (per parameter, read after
the base step; None: not perturbed), the sign :math:`s` = :attr:`OnePassOptimizer.direction_sign`
and the norm over every param group (a zero :math:`d` gives ε = 0; a group with ``rho=0`` is not
moved at all).

**The model holds the perturbed point between steps**, as the official MSAM code does: a step
runs the closure at :math:`\tilde w_t = w_t + \epsilon_t`, moves back to :math:`w_t`
(:math:`\tilde w_t - \epsilon_t`), takes the base step (unscaled once under AMP, clipped to
``max_grad_norm``, non-finite steps skipped: the one base's tail) and moves on to
:math:`\tilde w_{t+1}`. That is two parameter-sized updates and one norm per step, with no copy
of the weights. So between steps ``model.parameters()`` are at :math:`\tilde w`, not :math:`w`:

* evaluate, measure and save inside ``with opt.at_weights():`` (or :func:`at_weights`, which
  takes any optimizer): it moves to :math:`w` and, on leaving, back to :math:`\tilde w` bit for
  bit, so evaluating never changes the trajectory. The trainer, its callbacks, the edge tracker
  and the Lightning and Hugging Face integrations do this for you;
* ``opt.restore()`` moves to :math:`w` for good (the end of training); the next step moves to
  :math:`\tilde w` again;
* ``state_dict()`` also saves the perturbed point, so a run resumed from a checkpoint takes the
  very same steps, whether the model was saved at :math:`w` (inside ``at_weights``) or at
  :math:`\tilde w`: the first step after ``load_state_dict`` recognises either and continues
  exactly; weights that match neither (a model loaded from elsewhere) are taken as :math:`w`.

The first step (no direction yet), a step after ``restore()`` and the first step after loading
weights that match neither point move to :math:`w + \epsilon` first. The explicit form is
``perturb()`` (a no-op while the model holds :math:`\tilde w`), the pass, ``descend()``.

The one pass is the step's own pass: ``is_perturbed`` stays False during it (BatchNorm running
statistics are updated there); :attr:`~OnePassOptimizer.weights_perturbed` says the weights are
at :math:`\tilde w`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from samkit.optim import amp, kernels
from samkit.optim._validation import check_non_negative
from samkit.optim.kind import StepForm
from samkit.optim.wrapper import SGDBucket, WrappingOptimizer, _not_compiled

__all__ = ["OnePassOptimizer", "at_weights"]


def at_weights(optimizer: Any):
    """A context manager in which the model is at its weights :math:`w`: ``optimizer.at_weights()``
    for a samkit optimizer (a one-pass one holds :math:`w + \\epsilon` between steps), a no-op
    for any other optimizer (a ``LightningOptimizer`` is unwrapped)::

        with samkit.at_weights(opt):
            accuracy = evaluate(model)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    """
    method = getattr(optimizer, "at_weights", None)
    if method is None:
        inner = getattr(optimizer, "optimizer", None)  # LightningOptimizer
        method = getattr(inner, "at_weights", None)
    return method() if callable(method) else nullcontext()


def _is_zero(rho: Any) -> bool:
    return isinstance(rho, (int, float)) and rho == 0


class _Held:
    """The tensors one group moves: params, their directions, and the 0-d coefficient of ε."""

    __slots__ = ("params", "dirs", "coef")

    def __init__(self, params: list[Tensor], dirs: list[Tensor], coef: Tensor) -> None:
        self.params, self.dirs, self.coef = params, dirs, coef

    def move_(self, sign: float) -> None:
        r""":math:`w \leftarrow w + \mathrm{sign}\cdot c\, d` (the same kernel both ways)."""
        scale = kernels.scale_for(self.coef if sign > 0 else -self.coef, self.params[0])
        torch._foreach_addcmul_(self.params, self.dirs, [scale] * len(self.params))


class OnePassOptimizer(WrappingOptimizer):
    """Base of one-pass optimizers (see the module docstring). Subclasses give
    :meth:`_direction` and, if they keep state for it, :meth:`_before_base_step_`; ``rho`` must
    be one of their per-group defaults."""

    step_form = StepForm.ONE_PASS
    #: the sign s of ε = ρ s d / ‖d‖ (MSAM: -1, against the momentum)
    direction_sign = 1.0
    #: what ``step_rewrites()`` says (the ε is not from this step's gradient)
    _step_note = "perturbs before its one pass (the perturbation is not from its gradient)"

    def __init__(self, base_optimizer, defaults: dict[str, Any], max_grad_norm=None,
                 skip_non_finite: bool = False) -> None:
        super().__init__(base_optimizer, defaults, max_grad_norm, skip_non_finite)
        self.passes = 0  # forward-backward passes run by step()
        # per param group: the 0-d coefficient c of ε = c d the weights are moved by (None: the
        # group is not moved); None: the weights are at w
        self._held: list[Tensor | None] | None = None
        self._held_lists: list[_Held] | None = None  # what _held moved (see _groups_held)
        self._at_w = False  # inside at_weights()
        self._pending: dict[str, Any] | None = None  # a loaded perturbed point, not yet used

    def _direction(self, p: Tensor) -> Tensor | None:
        """The direction :math:`d` for parameter ``p`` (not modified), or None."""
        raise NotImplementedError

    # ------------------------------------------------------------------ where the weights are

    @property
    def weights_perturbed(self) -> bool:
        """True while the model holds :math:`w + \\epsilon` (between steps, outside
        :meth:`at_weights`)."""
        return self._held is not None and not self._at_w

    def _groups_held(self) -> list[_Held]:
        """The tensors moved by ε, per group and bucket: found when the model moves out and kept
        until it moves back (the directions change only in the base step, at :math:`w`)."""
        if self._held_lists is None:
            self._held_lists = list(self._find_held())
        return self._held_lists

    def _find_held(self) -> Iterator[_Held]:
        for group, coef in zip(self.param_groups, self._held or (), strict=False):
            if coef is None:
                continue
            ps, ds = [], []
            for p in group["params"]:
                d = self._direction(p) if p.requires_grad else None
                if d is not None:
                    ps.append(p)
                    ds.append(d)
            for params, dirs in kernels.group_by_device_and_dtype(ps, ds) if ps else ():
                yield _Held(params, dirs, coef)

    def _coefficients(self) -> list[Tensor | None]:
        """Per group, :math:`c = s\\rho / \\|d\\|` (the norm over every group; None for
        ``rho=0`` or no direction)."""
        self._fill_defaults()
        per_group: list[list[Tensor]] = []
        for group in self.param_groups:
            rho = group["rho"]
            if type(rho) is not float or not rho >= 0:  # noqa: E721 - the common case, fast
                check_non_negative("rho", rho)
            per_group.append([d for p in group["params"] if p.requires_grad
                              and (d := self._direction(p)) is not None])
        dirs_all = [d for dirs in per_group for d in dirs]
        if not dirs_all:
            return [None] * len(self.param_groups)
        first = dirs_all[0]
        if all(d.device == first.device and d.dtype == first.dtype for d in dirs_all):
            sq = kernels.sq_norm(dirs_all)  # one bucket: the common case
        else:
            sq = kernels.global_sq_norm(
                b[0] for b in kernels.group_by_device_and_dtype(dirs_all))
        # 1/||d||; a zero d (all entries zero) gets a finite coefficient, so ε = 0 exactly
        inv = sq.clamp_min(torch.finfo(sq.dtype).tiny).rsqrt()
        return [None if not dirs or _is_zero(g["rho"]) else inv * (self.direction_sign * g["rho"])
                for g, dirs in zip(self.param_groups, per_group, strict=True)]

    def _move_to_perturbed(self) -> None:  # callers run it under no_grad
        self._held = self._coefficients()
        self._held_lists = None
        for held in self._groups_held():
            held.move_(+1.0)

    def _move_to_weights(self) -> None:  # callers run it under no_grad
        for held in self._groups_held():
            held.move_(-1.0)
        self._held = None
        self._held_lists = None

    def _check_not_at_w(self, what: str) -> None:
        if self._at_w:
            raise RuntimeError(f"{what} inside at_weights(): step after leaving it")

    @_not_compiled
    @torch.no_grad()
    def perturb(self) -> None:
        r"""Move to :math:`w + \epsilon` (a no-op while the model holds it)."""
        self._check_not_at_w("perturb()")
        if self._held is not None:
            return
        if self._pending is not None and self._resume_pending():
            return
        self._move_to_perturbed()

    @_not_compiled
    @torch.no_grad()
    def restore(self) -> None:
        """Move the model to its weights :math:`w` and keep it there (e.g. at the end of
        training); the next step moves to :math:`w + \\epsilon` again. A no-op at :math:`w`."""
        self._check_not_at_w("restore()")
        self._pending = None
        if self._held is not None:
            self._move_to_weights()

    @contextmanager
    def at_weights(self) -> Iterator[None]:
        r"""Within the block the model is at its weights :math:`w`; on leaving it is back at
        :math:`w + \epsilon`, bit for bit (through a scratch copy of the weights, allocated once),
        so evaluating, measuring or saving in the block leaves the trajectory unchanged::

            with opt.at_weights():
                test_acc = evaluate(model)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

        Steps are refused inside the block. Nested blocks and a model already at :math:`w`
        need nothing."""
        if self._held is None or self._at_w:
            yield
            return
        saved = []
        with torch.no_grad():
            for held in self._groups_held():
                scratch = [self._state_tensor(p, "w_backup", empty=True) for p in held.params]
                torch._foreach_copy_(scratch, held.params)
                held.move_(-1.0)
                saved.append((held.params, scratch))
        self._at_w = True
        try:
            yield
        finally:
            self._at_w = False
            with torch.no_grad():
                for params, scratch in saved:
                    torch._foreach_copy_(params, scratch)

    # ------------------------------------------------------------------ the step

    @_not_compiled
    @torch.no_grad()
    def descend(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Move back to ``w``, take the base step with the gradient of the pass at
        :math:`w + \\epsilon` (unscaled, clipped, through ``scaler.step`` when a scaler is
        given) and move on to the next :math:`w + \\epsilon`."""
        self._check_not_at_w("descend()")
        if self._held is None:
            raise RuntimeError("descend() needs a perturb() before it")
        self._descend(scaler)

    def _descend(self, scaler: torch.amp.GradScaler | None) -> None:
        self._move_to_weights()
        self._first_pass_finite = None
        fused = None if amp.enabled(scaler) else self._fused_sgd_lists()
        if fused is not None:
            self._fused_sgd_step(fused)
            return
        self._finish_step_(scaler)
        self._move_to_perturbed()

    def _fused_sgd_lists(self) -> list[SGDBucket] | None:
        r"""The plain-SGD base step's buckets (:meth:`_plain_sgd_buckets`) when it may also be
        fused with the move to the next :math:`w + \epsilon`: no tail work (rewrite, clip,
        non-finite check), momentum in every group, and the parameters with a buffer that are
        stepped are those perturbed (a gradient exactly when ``requires_grad``). None: the
        general path."""
        if self._tail_needs_buckets(True):
            return None
        buckets = self._plain_sgd_buckets()
        if buckets is None or any(bufs is None for _, _, _, bufs in buckets):
            return None
        state = self.base_optimizer.state
        if any((p.grad is not None) != p.requires_grad and "momentum_buffer" in state.get(p, ())
               for group in self.param_groups for p in group["params"]):
            return None
        return buckets

    def _fused_sgd_step(self, buckets: list[SGDBucket]) -> None:
        r"""SGD's step fused with the move out: the buffers :math:`v \leftarrow \mu v +
        (1 - \text{dampening})(g + \lambda w)` in place (no parameter-sized temporary), then
        :math:`\tilde w \leftarrow w + (c - \gamma) v` with the new coefficient
        :math:`c = s\rho/\|v\|` in one update instead of two. A group with ``rho=0`` is not
        moved and takes torch's SGD step bit for bit: :math:`w - \gamma v` with torch's
        rounding of :math:`v`."""
        for group, params, grads, bufs in buckets:
            update = (kernels.sgd_direction_ if _is_zero(group["rho"])
                      else kernels.sgd_momentum_in_place_)
            update(params, grads, bufs, group["momentum"], group["dampening"],
                   group["weight_decay"])
        self._held = self._coefficients()
        coef_of = {id(g): c for g, c in zip(self.param_groups, self._held, strict=True)}
        held = []
        for group, params, _, bufs in buckets:
            coef = coef_of[id(group)]
            if coef is None:
                torch._foreach_add_(params, bufs, alpha=-group["lr"])
                continue
            scale = kernels.scale_for(coef - group["lr"], params[0])
            torch._foreach_addcmul_(params, bufs, [scale] * len(params))
            held.append(_Held(params, bufs, coef))
        self._held_lists = held
        self._opt_called = True
        self.base_optimizer._opt_called = True

    def first_step(self, zero_grad: bool = True, scaler=None) -> bool:
        raise RuntimeError(
            f"{type(self).__name__} takes one pass per step: call opt.step(closure), or "
            "opt.perturb(), the forward and backward pass, then opt.descend()"
        )

    def second_step(self, zero_grad: bool = False, scaler=None) -> None:
        self.first_step()

    @_not_compiled
    def step(self, closure=None, scaler: torch.amp.GradScaler | None = None):
        """One step: ``closure`` (zero_grad, forward, backward, return the loss) runs once, at
        :math:`w + \\epsilon`; returns its loss. The model is left at the next
        :math:`w + \\epsilon` (see :meth:`at_weights`)."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss (it is called once); or call "
                "perturb(), the pass, then descend()"
            )
        if self._held is None or self._at_w:  # the first step, after restore() or a load
            self.perturb()
        with torch.enable_grad():
            loss = self._checked_loss(closure())
        self.passes += 1
        if self._held is None or self._at_w:
            self.descend(scaler)  # the closure called restore() or opened at_weights(): raises
        else:
            with torch.no_grad():
                self._descend(scaler)
        return loss

    # ------------------------------------------------------------------ state

    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base's and our state; while the model holds :math:`w + \\epsilon` also that
        point and its coefficients (so a resumed run continues bit for bit)."""
        state = super().state_dict()
        if self._held is not None:
            index = {id(p): i for i, p in enumerate(self._flat_params())}
            points = {}
            for held in self._groups_held():
                for p in held.params:
                    src = self.state[p]["w_backup"] if self._at_w else p
                    points[index[id(p)]] = src.detach().clone()
            state[self._state_namespace].setdefault("global", {})["held"] = {
                "coefs": [None if c is None else c.clone() for c in self._held],
                "points": points,
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; the model may then be loaded at :math:`w` or at
        :math:`w + \\epsilon` (the first step tells them apart, see the module docstring)."""
        self._check_not_at_w("load_state_dict()")
        self.restore()  # the held point belongs to the state being replaced
        super().load_state_dict(state_dict)

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        self._held = None
        self._held_lists = None
        self._pending = state.get("held")

    def _resume_pending(self) -> bool:
        """Use the loaded perturbed point if the model is at it, or at the :math:`w` it was
        saved with (moved there by :meth:`at_weights`'s kernel: the very same bits); False if
        the weights are neither (they are then taken as :math:`w`)."""
        pending, self._pending = self._pending, None
        coefs = [None if c is None else c.to(self._device()) for c in pending["coefs"]]
        coefs += [None] * (len(self.param_groups) - len(coefs))
        points = pending["points"]
        self._held = coefs
        self._held_lists = None
        ids = {id(p): i for i, p in enumerate(self._flat_params())}
        moves = []
        for held in self._groups_held():
            keys = [ids[id(p)] for p in held.params]
            if any(k not in points for k in keys):
                break
            targets = [points[k].to(p.device, p.dtype) for k, p in zip(keys, held.params,
                                                                         strict=True)]
            moves.append((held, targets))
        else:
            at_point = all(torch.equal(p, t) for h, ts in moves
                           for p, t in zip(h.params, ts, strict=True))
            if at_point:
                return True
            saved_w = [[t.clone() for t in ts] for _, ts in moves]
            for (h, _), w in zip(moves, saved_w, strict=True):
                _Held(w, h.dirs, h.coef).move_(-1.0)
            if all(torch.equal(p, t) for (h, _), ws in zip(moves, saved_w, strict=True)
                   for p, t in zip(h.params, ws, strict=True)):
                with torch.no_grad():
                    for h, ts in moves:
                        torch._foreach_copy_(h.params, ts)
                return True
        self._held = None
        self._held_lists = None
        return False

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in (("passes", 0), ("_held", None), ("_at_w", False), ("_pending", None),
                           ("_held_lists", None)):
            self.__dict__.setdefault(key, value)
