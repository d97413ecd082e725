r"""SAF and MESA: sharpness-aware training for free (Du et al., NeurIPS 2022).

Both replace SAM's ascent pass by a *trajectory loss*: a KL divergence between the model's
current outputs and reference outputs taken from its own past, added to the training loss. With
temperature :math:`\tau`, weight :math:`\lambda`, current logits :math:`z_i` and reference logits
:math:`\hat z_i` of the :math:`n` examples of a batch,

.. math::
    L_{\mathrm{tra}} = \frac{\lambda \tau^2}{n} \sum_{i=1}^{n}
        \mathrm{KL}\Big(\mathrm{softmax}(\hat z_i / \tau) \,\Big\|\,
                        \mathrm{softmax}(z_i / \tau)\Big),
    \qquad
    \frac{\partial L_{\mathrm{tra}}}{\partial z_i}
        = \frac{\lambda \tau}{n}\big(\mathrm{softmax}(z_i/\tau)
                                    - \mathrm{softmax}(\hat z_i/\tau)\big)

and each step descends with :math:`\nabla_w (L_B(w) + L_{\mathrm{tra}})`: **one** forward-backward
pass. The references are constants (no gradient flows into them):

* **SAF** keeps, for every training example, its logits of the last :math:`\tilde E` epochs
  (``lag``) and uses those recorded :math:`\tilde E` epochs ago. The paper shows that this KL term
  approximates the sharpness term :math:`\max_{\|\epsilon\|\le\rho} L(w+\epsilon) - L(w)` along the
  trajectory. It needs each example's index in the training set; the trainer gives it
  (``batch_needs``, see :mod:`samkit.step`).
* **MESA** takes the references from an exponential moving average of the weights,
  :math:`\bar w \leftarrow \beta \bar w + (1-\beta) w` after every step (buffers too, as timm's
  ``ModelEmaV2``), evaluated in eval mode: one extra forward pass (no backward) per step, and
  memory for one more copy of the model instead of the per-example logits.

The term is on in epoch :math:`e` (0-based) when :math:`e >` ``start_epoch``, as the official
code's ``epoch > kl_start_epoch``; SAF records the logits in every epoch. Both are torch
optimizers wrapping a base optimizer (they share its ``param_groups``), so LR schedulers,
``state_dict`` and checkpoints see one optimizer; between steps the model holds its own weights,
so evaluation needs nothing special.

In your own loop, add the term in the closure::

    opt = samkit.SAF(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     num_examples=len(train_set))
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        (loss + opt.trajectory_loss(out, indices=idx, epoch=epoch)).backward()
        return loss
    opt.step(closure)

    # MESA: opt.trajectory_loss(out, x=x, model=model, epoch=epoch)

Through :class:`samkit.step.StepEngine` (the trainer, ``samkit train``, ``samkit compare``) the
closure calls :meth:`TrajectoryLossOptimizer.loss_term` itself.

Defaults and departures (checked against the official code, AngusDujw/SAF, ``SAF_train.py``,
``MESA_train.py``, ``run.sh`` and its README):

* :math:`\tau = 5` (``--temperature``), ``start_epoch = 5`` (``--kl_start_epoch``) for both.
* SAF: :math:`\lambda = 0.3` and :math:`\tilde E = 2`, the README's and ``run.sh``'s values
  (``SAF_train.py``'s argparse defaults are 0.16 and 3).
* MESA: :math:`\lambda = 0.8` (README, ``run.sh``; argparse default 0.3),
  :math:`\beta = 0.9998` (timm's ``--model-ema-decay``, which ``run.sh`` uses). That decay
  averages over about 5000 steps, one ImageNet epoch at batch 256; on a small data set with few
  steps per epoch choose a smaller one (``samkit compare`` sets it per run).
* The official SAF stores :math:`\tilde E + 1` logit slots per example; samkit reads the record
  of :math:`\tilde E` epochs ago before overwriting it, so :math:`\tilde E` slots suffice.
  Examples without a record in the slot (never seen, or skipped by ``drop_last``) add nothing,
  where the official code compares them with zero logits (a uniform target); the sum is still
  divided by the whole batch's :math:`n`.
* The official scripts end the term at ``kl_end_epoch`` (300/360, i.e. never in their runs);
  samkit has no end epoch.
* With ``--model-ema`` (used in ``run.sh`` for both) the official scripts *report* the EMA
  model's accuracy. samkit reports the trained model's; MESA's EMA model is a reference only.
* MESA runs the EMA forward only while the term is on (the official code runs it every step).
  Its EMA copy is made at the first call of the term, after the first forward pass, so its
  BatchNorm buffers include that batch (timm copies before training);
  ``opt.track(model)`` before the first step gives timm's start exactly.
* SAF's logits must be 2-d (``N x C``); MESA's may have more dimensions (the KL is over the
  last one, the mean over the rest).
* Under DDP each process keeps its own SAF memory, as in the official code: an example has a
  reference only if the same process saw it :math:`\tilde E` epochs before.

Memory: SAF :math:`N \tilde E (4C + 1)` bytes (float32 logits, float64 for a float64 model,
and a flag per slot; 10 classes, :math:`\tilde E = 2`: 82 bytes per example, 4.1 MB for
CIFAR-10's 50 000 images), on the device of the outputs unless ``memory_device`` says
otherwise. MESA: one copy of the model's parameters and buffers.

References:
    Du, Zhou, Feng, Tan, Zhou, Goh. "Sharpness-Aware Training for Free", NeurIPS 2022
    (arXiv:2205.14083); official code: github.com/AngusDujw/SAF.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.optim import Optimizer

from samkit.optim._validation import check_non_negative, check_positive
from samkit.optim.lossterm import LossTermOptimizer

Closure = Callable[[], Any]

__all__ = ["MESA", "SAF", "TrajectoryLossOptimizer", "trajectory_kl"]


def trajectory_kl(output: Tensor, reference: Tensor, temperature: float,
                  mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
    r""":math:`\frac{s\,\tau^2}{n} \sum_i m_i \mathrm{KL}(\mathrm{softmax}(\hat z_i/\tau) \|
    \mathrm{softmax}(z_i/\tau))` over the last dimension, the sum over the other positions
    divided by their number ``n``; ``reference`` is a constant, ``mask`` (bool, the leading
    shape) drops terms, ``s`` = ``scale`` (SAF's and MESA's λ).

    The gradient is the closed form :math:`\frac{s\tau}{n} m_i (\mathrm{softmax}(z_i/\tau) -
    \mathrm{softmax}(\hat z_i/\tau))`, computed with the value in one pass over the logits and
    saved for the backward pass (a custom autograd function; differentiable once, so a
    double backward through the term raises). Computed in float32 at least (under autocast the
    logits may be bfloat16); the gradient has the logits' dtype.

    This runs at every step of a one-pass method on a ``(batch, classes)`` tensor, where each
    kernel is a visible share of the step: on the CPU with few classes (<= 32) the softmaxes run
    with the classes on the first dimension, where torch's CPU kernel is ~10x faster than over
    a short last dimension (22 µs against 2 µs for 128 x 10 on one thread).
    """
    return _TrajectoryKL.apply(output, reference, mask, float(temperature), float(scale))


# up to this many classes the CPU softmaxes run classes-first (see trajectory_kl)
_FEW_CLASSES = 32


def _scaled_log_softmax(logits: Tensor, temperature: float, dtype: torch.dtype,
                        classes_first: bool) -> Tensor:
    """log softmax(logits / τ) of ``(rows, C)`` logits, in ``dtype``; ``(C, rows)`` when
    ``classes_first``. A new tensor (never a view of ``logits``)."""
    if classes_first:
        z = torch.empty((logits.shape[1], logits.shape[0]), dtype=dtype, device=logits.device)
        if logits.dtype == dtype:
            torch.mul(logits.t(), 1.0 / temperature, out=z)  # transposed and scaled in one pass
        else:  # bfloat16/float16 logits: scaled in ``dtype``, not rounded to their own first
            z.copy_(logits.t()).mul_(1.0 / temperature)
        return torch.log_softmax(z, dim=0)
    z = logits.to(dtype, copy=True)
    if temperature != 1:
        z.div_(temperature)
    return torch.log_softmax(z, dim=1)


class _TrajectoryKL(torch.autograd.Function):
    """The value of :func:`trajectory_kl` and its closed-form gradient, in one forward pass."""

    @staticmethod
    def forward(ctx, output: Tensor, reference: Tensor, mask: Tensor | None,
                temperature: float, scale: float) -> Tensor:
        classes = output.shape[-1]
        z, ref = output.detach(), reference.detach()
        if z.dim() != 2:
            z, ref = z.reshape(-1, classes), ref.reshape(-1, classes)
        rows = z.shape[0]
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        classes_first = z.device.type == "cpu" and classes <= _FEW_CLASSES
        log_p = _scaled_log_softmax(z, temperature, dtype, classes_first)
        log_q = _scaled_log_softmax(ref, temperature, dtype, classes_first)
        if mask is not None:  # a dropped row's reference is its own output: log q = log p bit
            # for bit, so it adds exactly zero to the value and the gradient
            keep = mask.reshape((1, rows) if classes_first else (rows, 1))
            log_q = torch.where(keep, log_q, log_p)
        value = F.kl_div(log_p, log_q, reduction="sum", log_target=True)  # Σ q (log q - log p)
        q = log_q.exp_()
        grad = log_p.exp_()  # p = softmax(z / τ)
        grad.sub_(q).mul_(scale * temperature / rows)  # d value / d z = s τ m (p - q) / n
        if classes_first:
            grad = grad.t().contiguous()
        if grad.shape != output.shape:
            grad = grad.reshape(output.shape)
        ctx.save_for_backward(grad if grad.dtype == output.dtype else grad.to(output.dtype))
        return value * (scale * temperature**2 / rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_value, None, None, None, None


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer >= {low})")
    return value


def _plain_module(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class TrajectoryLossOptimizer(LossTermOptimizer):
    """Loss-term optimizers whose term is a trajectory loss (the base of SAF and MESA).

    Wraps ``base_optimizer`` and shares its ``param_groups`` (the one base,
    :class:`~samkit.optim.wrapper.WrappingOptimizer`). ``step(closure)`` runs the closure once,
    clips to ``max_grad_norm`` (a per-group key, the norm over every group), takes the base step
    and then :meth:`_after_step_` (MESA's EMA update). Under AMP pass the scaler,
    ``opt.step(closure, scaler=scaler)`` (as :func:`samkit.step.take_step` does), or use the
    usual ``scaler.step(opt)``: either way the clip sees true gradients and a step with inf/NaN
    is skipped.

    A step whose closure did not compute the trajectory loss (neither :meth:`loss_term` nor
    :meth:`trajectory_loss` was called since the last step) raises ``RuntimeError``: without it
    the optimizer would silently be its base optimizer.

    Args:
        base_optimizer: the optimizer that takes the step (SGD, AdamW, ...).
        lam: the weight λ of the trajectory loss (>= 0; 0 is the base optimizer bit for bit).
        temperature: the softmax temperature τ (> 0).
        start_epoch: the term is on in epochs ``e > start_epoch`` (0-based; >= -1).
        max_grad_norm: clip the step direction to this norm (None: no clipping).
        skip_non_finite: without a GradScaler, skip a step whose gradient is not finite (one
            host sync per step) and count it in :attr:`skipped_steps`.
    """

    batch_needs: frozenset[str] = frozenset({"epoch"})

    def __init__(
        self,
        base_optimizer: Optimizer,
        lam: float,
        temperature: float,
        start_epoch: int,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("lam", lam)
        check_positive("temperature", temperature)
        _check_int("start_epoch", start_epoch, -1)
        super().__init__(base_optimizer, {}, max_grad_norm, skip_non_finite)
        self.lam = float(lam)
        self.temperature = float(temperature)
        self.start_epoch = start_epoch

    @property
    def last_trajectory_loss(self) -> Tensor | None:
        """The last trajectory loss computed (detached), for logs."""
        return self.last_term

    def active(self, epoch: int) -> bool:
        """Is the trajectory loss on in ``epoch`` (0-based)?"""
        return self.lam > 0 and epoch > self.start_epoch

    def _require(self, what: str, value: Any, how: str) -> None:
        if value is None:
            raise ValueError(
                f"{type(self).__name__} needs {what} with every batch: {how}. The trainer gives "
                "it (samkit train / compare); a StepEngine takes it as engine.step(x, y, "
                f"{what}=...)"
            )

    def _term_missing(self) -> str:
        return (
            f"{type(self).__name__}.step(): the closure did not compute the trajectory loss, "
            "so this step would be a plain base-optimizer step. Add "
            "opt.trajectory_loss(output, ...) to the loss in the closure, or train through "
            "samkit.step.StepEngine / the Trainer, which call opt.loss_term for you"
        )

    def _repr_args(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}, start_epoch={self.start_epoch}"


class SAF(TrajectoryLossOptimizer):
    r"""SAF: the trajectory loss against each example's own logits of ``lag`` epochs ago.

    In epoch :math:`e`, for the examples :math:`i \in B` with recorded logits
    :math:`z_i^{(e - \tilde E)}`:

    .. math::
        w \leftarrow \mathrm{base\_step}\Big(w, \nabla_w \big[L_B(w) +
            \frac{\lambda\tau^2}{|B|} \sum_{i\in B}
            \mathrm{KL}(\mathrm{softmax}(z_i^{(e-\tilde E)}/\tau) \,\|\,
                        \mathrm{softmax}(z_i(w)/\tau))\big]\Big)

    when :math:`e >` ``start_epoch``; every step records :math:`z_i(w)` (detached; float32, or
    float64 for a float64 model) as example :math:`i`'s logits of epoch :math:`e`. One
    forward-backward pass per step. See
    :mod:`samkit.optim.trajectory` for the defaults, the departures from the official code and
    the memory (:math:`N \tilde E (4C + 1)` bytes).

    Args:
        base_optimizer: the optimizer that takes the step.
        lam: λ, the weight of the trajectory loss (``--reinforce``; 0.3).
        temperature: τ (5).
        lag: :math:`\tilde E`, the epochs between a record and its use (``--minus_epoch``; 2).
        start_epoch: the term is on in epochs ``e > start_epoch`` (``--kl_start_epoch``; 5).
        num_examples: the size of the training set (the memory's rows); the trainer gives it
            with each batch, so it is needed only in your own loop.
        memory_device: where the logits are kept (default: the outputs' device; ``"cpu"``
            saves accelerator memory at a copy per step).
        max_grad_norm, skip_non_finite: see :class:`TrajectoryLossOptimizer`.

    References:
        Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022; github.com/AngusDujw/SAF.
    """

    batch_needs = frozenset({"indices", "epoch", "num_examples"})

    def __init__(
        self,
        base_optimizer: Optimizer,
        lam: float = 0.3,
        temperature: float = 5.0,
        lag: int = 2,
        start_epoch: int = 5,
        num_examples: int | None = None,
        memory_device: str | torch.device | None = None,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        super().__init__(base_optimizer, lam, temperature, start_epoch, max_grad_norm,
                         skip_non_finite)
        self.lag = _check_int("lag", lag, 1)
        if num_examples is not None:
            _check_int("num_examples", num_examples, 1)
        self.num_examples = num_examples
        self.memory_device = torch.device(memory_device) if memory_device is not None else None
        # the memory, slot-major: lag x N x C logits (float32) and lag x N flags (does the slot
        # hold a record of the example?); `logits` and `recorded` show them example-major
        self._slots: Tensor | None = None
        self._flags: Tensor | None = None
        self._complete: list[bool] = [False] * self.lag  # every example recorded in the slot
        self._checked_epoch: int | None = None  # when _complete was last updated

    def memory_bytes(self) -> int:
        """The bytes of the logit memory (0 before the first step)."""
        if self._slots is None:
            return 0
        return self._slots.nelement() * self._slots.element_size() + self._flags.nelement()

    @property
    def logits(self) -> Tensor | None:
        """The recorded logits, ``N x lag x C`` (a view; slot ``e % lag`` holds epoch ``e``)."""
        return None if self._slots is None else self._slots.permute(1, 0, 2)

    @property
    def recorded(self) -> Tensor | None:
        """``N x lag`` bool (a view): does the slot hold a record of the example?"""
        return None if self._flags is None else self._flags.t()

    def _allocate(self, rows: int, classes: int, device: torch.device, dtype: torch.dtype) -> None:
        device = self.memory_device or device
        self._slots = torch.zeros(self.lag, rows, classes, dtype=dtype, device=device)
        self._flags = torch.zeros(self.lag, rows, dtype=torch.bool, device=device)
        self._complete = [False] * self.lag

    def trajectory_loss(
        self, output: Tensor, indices: Tensor, epoch: int, num_examples: int | None = None
    ) -> Tensor:
        """Record ``output`` (the logits of the examples ``indices`` of the training set, at the
        current weights) for epoch ``epoch`` and return the term (a 0-d tensor; zero while it is
        off). Call it once per example per epoch, inside the closure."""
        term = self._term(output, indices, epoch, num_examples)
        return term if term is not None else output.new_zeros(())

    def loss_term(self, output: Tensor, batch: Any) -> Tensor | None:
        self._require("indices", batch.indices, "the examples' positions in the training set")
        self._require("epoch", batch.epoch, "the current epoch (0-based)")
        return self._term(output, batch.indices, batch.epoch, batch.num_examples)

    def _term(self, output: Tensor, indices: Tensor, epoch: int,
              num_examples: int | None) -> Tensor | None:
        if output.dim() != 2:
            raise ValueError(
                f"Invalid output for SAF: shape {tuple(output.shape)} (allowed: N x C logits; "
                "SAF keeps C logits per example: use MESA for sequence outputs)"
            )
        if not isinstance(indices, Tensor) or indices.dim() != 1 or len(indices) != len(output):
            raise ValueError(
                f"Invalid indices for SAF: {type(indices).__name__} (allowed: a 1-d tensor of "
                f"{len(output)} example positions, one per row of the output)"
            )
        if self._slots is None:
            rows = num_examples if num_examples is not None else self.num_examples
            if rows is None:
                raise ValueError(
                    "SAF needs the size of the training set for its memory: "
                    "SAF(base, num_examples=len(train_set)) or trajectory_loss(..., "
                    "num_examples=...)"
                )
            self.num_examples = _check_int("num_examples", rows, 1)
            # float32 logits (float64 for a float64 model; bfloat16/float16 ones are widened)
            dtype = torch.promote_types(output.dtype, torch.float32)
            self._allocate(rows, output.shape[1], output.device, dtype)
        elif output.shape[1] != self._slots.shape[2]:
            raise ValueError(
                f"Invalid output for SAF: {output.shape[1]} classes, the memory has "
                f"{self._slots.shape[2]}"
            )
        slot = epoch % self.lag
        memory, flags = self._slots[slot], self._flags[slot]
        rows = indices.to(memory.device)
        if epoch != self._checked_epoch:  # once an epoch (a host sync): slots now complete
            self._checked_epoch = epoch
            self._complete = [done or bool(f.all()) for done, f in zip(self._complete,
                                                                       self._flags, strict=True)]
        complete = self._complete[slot]
        term = None
        if self.active(epoch):  # read the record of epoch - lag before overwriting it
            reference = memory.index_select(0, rows).to(output.device)
            have = None if complete else flags.index_select(0, rows).to(output.device)
            term = trajectory_kl(output, reference, self.temperature, have, self.lam)
        memory.index_copy_(0, rows, output.detach().to(memory.device, memory.dtype))
        if not complete:
            flags.index_fill_(0, rows, True)
        return self._counted(term)

    def _global_state_dict(self) -> dict[str, Any]:
        state = super()._global_state_dict()
        state.update(logits=self.logits, recorded=self.recorded, num_examples=self.num_examples)
        return state

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        if state.get("logits") is not None:  # N x lag x C and N x lag, as every version saved
            device = self.memory_device or state["logits"].device
            # a copy: the state may be another optimizer's live memory (its state_dict())
            dense = torch.contiguous_format
            self._slots = state["logits"].to(device).permute(1, 0, 2).clone(memory_format=dense)
            self._flags = state["recorded"].to(device).t().clone(memory_format=dense)
            self._complete = [False] * self.lag
            self._checked_epoch = None
            self.num_examples = state.get("num_examples", self._slots.shape[1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # an SAF pickled by an older samkit kept its memory example-major, as attributes
        logits, recorded = state.pop("logits", None), state.pop("recorded", None)
        super().__setstate__(state)
        if "_slots" not in self.__dict__:
            self._slots = None if logits is None else logits.permute(1, 0, 2).contiguous()
            self._flags = None if recorded is None else recorded.t().contiguous()
        self.__dict__.setdefault("_complete", [False] * self.lag)
        self.__dict__.setdefault("_checked_epoch", None)


class MESA(TrajectoryLossOptimizer):
    r"""MESA: the trajectory loss against an exponential moving average of the model.

    After every step :math:`\bar w \leftarrow \beta \bar w + (1 - \beta) w` (every floating-point
    parameter and buffer; integer buffers are copied), starting from the initial weights. In
    epochs :math:`e >` ``start_epoch``:

    .. math::
        w \leftarrow \mathrm{base\_step}\Big(w, \nabla_w \big[L_B(w) +
            \frac{\lambda\tau^2}{|B|} \sum_{i\in B}
            \mathrm{KL}(\mathrm{softmax}(f(x_i; \bar w)/\tau) \,\|\,
                        \mathrm{softmax}(f(x_i; w)/\tau))\big]\Big)

    with :math:`f(\cdot; \bar w)` run in eval mode without gradient (BatchNorm uses the averaged
    running statistics, dropout is off), under the closure's autocast. One forward-backward
    pass of the model and one forward pass of the EMA model per step. The EMA model is a copy of
    the first model :meth:`loss_term` sees (made at the first step, before any update); it is
    saved by ``state_dict``.

    Args:
        base_optimizer: the optimizer that takes the step.
        lam: λ (``--reinforce``; 0.8).
        temperature: τ (5).
        ema_decay: β (``--model-ema-decay``; 0.9998, in [0, 1)).
        start_epoch: the term is on in epochs ``e > start_epoch`` (5).
        max_grad_norm, skip_non_finite: see :class:`TrajectoryLossOptimizer`.

    References:
        Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022; github.com/AngusDujw/SAF.
    """

    batch_needs = frozenset({"epoch"})

    def __init__(
        self,
        base_optimizer: Optimizer,
        lam: float = 0.8,
        temperature: float = 5.0,
        ema_decay: float = 0.9998,
        start_epoch: int = 5,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        super().__init__(base_optimizer, lam, temperature, start_epoch, max_grad_norm,
                         skip_non_finite)
        try:
            ok = 0.0 <= float(ema_decay) < 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok or isinstance(ema_decay, bool) or not math.isfinite(float(ema_decay)):
            raise ValueError(f"Invalid ema_decay: {ema_decay!r} (allowed: a number in [0, 1))")
        self.ema_decay = float(ema_decay)
        self.ema_model: nn.Module | None = None
        self._model: nn.Module | None = None  # the model the EMA follows
        self._pending_ema: dict[str, Tensor] | None = None  # loaded before the EMA was built

    def memory_bytes(self) -> int:
        """The bytes of the EMA model's parameters and buffers (0 before the first step)."""
        if self.ema_model is None:
            return 0
        return sum(t.nelement() * t.element_size() for t in self.ema_model.state_dict().values())

    def track(self, model: nn.Module) -> nn.Module:
        """Follow ``model`` (its EMA copy is made now, if there is none yet); returns the copy."""
        model = _plain_module(model)
        if self._model is not None and self._model is not model:
            raise ValueError("Invalid model: MESA already follows another model")
        if self.ema_model is None:
            mine = {p for g in self.param_groups for p in g["params"]}
            if not any(p in mine for p in model.parameters()):
                raise ValueError(
                    f"Invalid model: {type(model).__name__}'s parameters are not the ones this "
                    "MESA optimizer steps"
                )
            ema = copy.deepcopy(model)
            for p in ema.parameters():
                p.grad = None
                p.requires_grad_(False)
            if self._pending_ema is not None:
                ema.load_state_dict(self._pending_ema)
                self._pending_ema = None
            self.ema_model = ema.eval()
        self._model = model
        return self.ema_model

    def trajectory_loss(self, output: Tensor, x: Any, model: nn.Module, epoch: int) -> Tensor:
        """The term for the batch ``x`` whose outputs under ``model`` are ``output`` (a 0-d
        tensor; zero while it is off). Call it inside the closure."""
        term = self._term(output, x, model, epoch)
        return term if term is not None else output.new_zeros(())

    def loss_term(self, output: Tensor, batch: Any) -> Tensor | None:
        self._require("epoch", batch.epoch, "the current epoch (0-based)")
        return self._term(output, batch.x, batch.model, batch.epoch)

    def _term(self, output: Tensor, x: Any, model: nn.Module, epoch: int) -> Tensor | None:
        ema = self.track(model)
        term = None
        if self.active(epoch):
            with torch.no_grad():
                reference = ema(x)
            if reference.shape != output.shape:
                raise ValueError(
                    f"Invalid output for MESA: shape {tuple(output.shape)}, the EMA model gives "
                    f"{tuple(reference.shape)} (pass the outputs of model(x))"
                )
            term = trajectory_kl(output, reference, self.temperature, scale=self.lam)
        return self._counted(term)

    @torch.no_grad()
    def _after_step_(self) -> None:
        if self._model is None:
            return
        ema_state, state = self.ema_model.state_dict(), self._model.state_dict()
        floats, targets = [], []
        for key, e in ema_state.items():
            m = state[key]
            if e.is_floating_point():
                floats.append(e)
                targets.append(m.to(e.dtype))
            else:
                e.copy_(m)
        if floats:  # e <- e + (1 - beta) (m - e) = beta e + (1 - beta) m
            torch._foreach_lerp_(floats, targets, 1.0 - self.ema_decay)

    def _global_state_dict(self) -> dict[str, Any]:
        state = super()._global_state_dict()
        if self.ema_model is not None:
            state["ema"] = {k: v.clone() for k, v in self.ema_model.state_dict().items()}
        elif self._pending_ema is not None:
            state["ema"] = self._pending_ema
        return state

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        if state.get("ema") is not None:
            if self.ema_model is not None:
                self.ema_model.load_state_dict(state["ema"])
            else:
                self._pending_ema = dict(state["ema"])
