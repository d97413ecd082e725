r"""The step engine: the one place where a training step's passes are written.

Everything in samkit that trains (the trainer, ``samkit eos``, :func:`samkit.accumulation_closure`,
:func:`samkit.m_sharpness_step`, the DDP helpers of :mod:`samkit.distributed`) builds its closure
here and calls ``optimizer.step(closure)``; the optimizer decides how often to call it (once for
SGD or a one-pass step, twice for a sharpness-aware step). One call of a :class:`StepClosure`:

1. zeroes the gradients;
2. runs forward and backward over the micro-batches :math:`B_1, \dots, B_k` of the batch
   :math:`B`, each loss weighted by its share of the examples, so the gradient is that of the
   mean loss over :math:`B`:

   .. math::
       \nabla L_B = \sum_i \frac{|B_i|}{|B|} \nabla L_{B_i}
       \qquad \text{(under DDP: } \frac{R\,|B_i|}{|B_{\mathrm{global}}|} \text{ per rank, }
       R \text{ ranks, so DDP's average is the global batch's mean)};

3. under DDP runs every micro-batch but the last under ``no_sync()`` (one all-reduce per
   pass), and in ``perturbation="local"`` the whole first pass (each replica perturbs with its
   own gradient; see :mod:`samkit.distributed`);
4. runs the forward passes under ``torch.autocast`` when asked and backpropagates the loss
   scaled by a ``GradScaler`` when one is given;
5. leaves BatchNorm running statistics alone when the optimizer is at ``w + ε``
   (``optimizer.is_perturbed``), so they are updated once per step;
6. returns the mean loss over the batch (detached).

A variant that needs more from the data asks the closure for it. ESAM's sharpness-sensitive
data selection needs per-example losses: when the optimizer has a ``selects_examples(n)``
method that says yes for the batch, and a per-example loss function was given, the closure
also has ``losses(indices, perturbed)`` (the protocol :meth:`samkit.ESAM.step` reads), and the
optimizer runs its passes through it. Nothing here names a variant.

A variant may also add a term to the loss of each pass (a trajectory loss: SAF, MESA). When the
optimizer has a ``loss_term(output, batch)`` method, the closure calls it for every micro-batch
with the outputs and a :class:`BatchInfo` (the model, ``x``, ``y``, and what the caller gave:
the examples' ``indices`` into the training set, the ``epoch``, the size of the training set),
and backpropagates ``loss + term``; the loss it returns stays the data loss. What the optimizer
needs from the caller it declares in ``batch_needs`` (e.g. ``{"indices", "epoch"}``):
:attr:`StepEngine.batch_needs` reads it, so a trainer gives the indices only when asked.

>>> engine = StepEngine(opt, model, loss_fn, grad_accum=2)
>>> loss = engine.step(x, y)          # the closure, opt.step(closure), scaler.update()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

LossFn = Callable[[Any, Tensor], Tensor]
Observer = Callable[[Tensor, Tensor], None]

PERTURBATIONS = ("local", "synced")

__all__ = [
    "PERTURBATIONS",
    "BatchInfo",
    "ExampleLossStepClosure",
    "StepClosure",
    "StepEngine",
    "check_micro_batches",
    "check_perturbation",
    "is_perturbed",
    "split_batch",
    "step_closure",
    "sync_context",
    "take_step",
]


# ---------------------------------------------------------------------- small pieces


def check_perturbation(perturbation: str) -> str:
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"Invalid perturbation: {perturbation!r} (allowed: {', '.join(PERTURBATIONS)})"
        )
    return perturbation


def check_micro_batches(micro_batches: Sequence[tuple[Any, Tensor]]) -> list[int]:
    """The sizes of ``micro_batches`` (a list of ``(x, y)`` pairs, read once per pass)."""
    if isinstance(micro_batches, (str, bytes)) or not isinstance(micro_batches, Sequence):
        raise ValueError("Invalid micro_batches: pass a list of (x, y) pairs (it is read twice)")
    sizes = [len(y) for _, y in micro_batches]
    if not sizes or sum(sizes) == 0:
        raise ValueError(f"Invalid micro_batches: no examples in {len(sizes)} micro-batch(es)")
    return sizes


def split_batch(x: Tensor, y: Tensor, parts: int) -> list[tuple[Tensor, Tensor]]:
    """``(x, y)`` cut into ``parts`` contiguous micro-batches (sizes differing by at most one;
    empty ones dropped)."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"Invalid grad_accum: {parts!r} (allowed: an integer >= 1)")
    if parts == 1:
        return [(x, y)]
    return [(xs, ys) for xs, ys in zip(x.tensor_split(parts), y.tensor_split(parts), strict=True)
            if len(ys)]


def sync_context(model: nn.Module, sync: bool):
    """``model.no_sync()`` when ``sync`` is False and the model has it (DDP), else a no-op."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def is_perturbed(optimizer: Any) -> bool:
    """Is the optimizer at ``w + ε`` (between a sharpness-aware optimizer's two passes)?"""
    return bool(getattr(optimizer, "is_perturbed", False))


def _form(optimizer: Any):
    """The optimizer's declared step form (:func:`samkit.optim.kind.form_of`)."""
    from samkit.optim.kind import form_of

    return form_of(optimizer)


def pass_syncs(optimizer: Any, perturbation: str) -> bool:
    """Does the coming pass all-reduce its gradients? Always, except the first pass of a step
    with an extra pass at ``w + ε`` (two-pass, example-selecting) in ``"local"`` mode."""
    return (perturbation == "synced" or is_perturbed(optimizer)
            or not _form(optimizer).has_extra_pass)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _scaled(loss: Tensor, scaler: torch.amp.GradScaler | None) -> Tensor:
    return scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss


# ---------------------------------------------------------------------- what a loss term sees


@dataclass(frozen=True)
class BatchInfo:
    """What an optimizer's ``loss_term(output, batch)`` sees of one micro-batch.

    Attributes:
        model: the module the forward pass called (a ``DistributedDataParallel`` module too).
        x, y: the micro-batch.
        indices: the examples' positions in the training set (1-d, aligned with ``y``), when
            the caller gave them (a trainer does when ``"indices"`` is in ``batch_needs``).
        epoch: the current epoch (0-based), when given.
        num_examples: the number of examples of the training set, when given.
    """

    model: nn.Module
    x: Any
    y: Tensor
    indices: Tensor | None = None
    epoch: int | None = None
    num_examples: int | None = None


def batch_needs(optimizer: Any) -> frozenset[str]:
    """What the optimizer asks the caller to give with each batch (its ``batch_needs``: names of
    :class:`BatchInfo` fields such as ``"indices"``, ``"epoch"``); empty for most optimizers."""
    return frozenset(getattr(optimizer, "batch_needs", ()) or ())


def _split_indices(indices: Tensor | Sequence[Tensor] | None, sizes: list[int]):
    """``indices`` per micro-batch: a tensor for the whole batch is cut at the micro-batch sizes
    (micro-batches are contiguous parts of the batch); a list is taken as given."""
    if indices is None:
        return [None] * len(sizes)
    if isinstance(indices, Tensor):
        if indices.dim() != 1 or len(indices) != sum(sizes):
            raise ValueError(
                f"Invalid indices: shape {tuple(indices.shape)} (allowed: a 1-d tensor with one "
                f"index per example of the batch, {sum(sizes)})"
            )
        return list(indices.split(sizes))
    parts = list(indices)
    if len(parts) != len(sizes) or any(len(i) != n for i, n in zip(parts, sizes, strict=True)):
        raise ValueError("Invalid indices: one 1-d tensor per micro-batch, of its size")
    return parts


# ---------------------------------------------------------------------- the closure


def _share(loss: Tensor, n: int, total: int) -> Tensor:
    """``loss`` weighted by its micro-batch's share ``n / total`` of the step's examples (itself,
    not multiplied by 1, for a single micro-batch)."""
    return loss if n == total else loss * (n / total)


class StepClosure:
    """The closure for ``optimizer.step``: one pass over weighted micro-batches (see the module
    docstring). Build it with :func:`step_closure` or :meth:`StepEngine.closure`."""

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        micro_batches: Sequence[tuple[Any, Tensor]],
        *,
        scaler: torch.amp.GradScaler | None = None,
        perturbation: str = "synced",
        global_examples: int | None = None,
        autocast: torch.dtype | None = None,
        observe: Observer | None = None,
        after_first_pass: Callable[[Tensor], None] | None = None,
        indices: Tensor | Sequence[Tensor] | None = None,
        epoch: int | None = None,
        num_examples: int | None = None,
    ) -> None:
        self.optimizer, self.model, self.loss_fn = optimizer, model, loss_fn
        self.micro_batches = micro_batches
        self.sizes = check_micro_batches(micro_batches)
        self.indices = _split_indices(indices, self.sizes)
        self.epoch, self.num_examples = epoch, num_examples
        term = getattr(optimizer, "loss_term", None)
        self.loss_term = term if callable(term) else None
        self.total = sum(self.sizes)
        self.scaler = scaler
        self.perturbation = check_perturbation(perturbation)
        if global_examples is not None and global_examples < 1:
            raise ValueError(f"Invalid global_examples: {global_examples!r} (allowed: >= 1)")
        self.global_examples = global_examples
        self.autocast = autocast
        self.observe = observe
        self.after_first_pass = after_first_pass

    def autocast_context(self, device: torch.device):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def _device(self) -> torch.device:
        return self.micro_batches[0][1].device

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad()
        perturbed = is_perturbed(self.optimizer)
        sync = pass_syncs(self.optimizer, self.perturbation)
        # DDP averages the ranks' gradients: weigh each rank by its share of the global batch
        replicas = _world_size() if sync and self.global_examples is not None else 1
        last = len(self.sizes) - 1
        mean = None
        with _running_stats_left_alone(self.model, perturbed), torch.enable_grad():
            for i, ((x, y), n) in enumerate(zip(self.micro_batches, self.sizes, strict=True)):
                with sync_context(self.model, sync and i == last):
                    with self.autocast_context(self._device()):
                        output = self.model(x)
                        loss = self.loss_fn(output, y)
                        part = _share(loss, n, self.total)
                        # the loss that is backpropagated: plus the optimizer's term, if any
                        trained = loss if self.loss_term is None else self._with_term(
                            loss, output, x, y, i)
                        if replicas > 1:
                            weighted = trained * (n * replicas / self.global_examples)
                        else:
                            weighted = part if trained is loss else _share(trained, n, self.total)
                    _scaled(weighted, self.scaler).backward()
                mean = part.detach() if mean is None else mean + part.detach()
                if not perturbed and self.observe is not None:
                    self.observe(output.detach(), y)
        if not perturbed and self.after_first_pass is not None:
            self.after_first_pass(mean)
        return mean

    def _with_term(self, loss: Tensor, output: Tensor, x: Any, y: Tensor, i: int) -> Tensor:
        """``loss`` plus the optimizer's ``loss_term`` for micro-batch ``i`` (when it has one)."""
        info = BatchInfo(self.model, x, y, self.indices[i], self.epoch, self.num_examples)
        term = self.loss_term(output, info)
        return loss if term is None else loss + term


class ExampleLossStepClosure(StepClosure):
    """A :class:`StepClosure` over one batch that also gives per-example losses to an optimizer
    that asks for them: ``losses(indices, perturbed)``, the 1-d losses of ``batch[indices]`` (all
    when None), BatchNorm statistics left alone when ``perturbed``; no backward."""

    def __init__(self, *args: Any, example_loss_fn: LossFn, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(self.micro_batches) != 1:
            raise ValueError("Invalid micro_batches: per-example losses need one micro-batch")
        self.example_loss_fn = example_loss_fn

    def losses(self, indices: Tensor | None, perturbed: bool) -> Tensor:
        x, y = self.micro_batches[0]
        if indices is not None:
            x, y = x[indices], y[indices]
        with _running_stats_left_alone(self.model, perturbed):
            with self.autocast_context(self._device()):
                output = self.model(x)
                losses = self.example_loss_fn(output, y)
        if not perturbed and indices is None and self.observe is not None:
            self.observe(output.detach(), y)
        return losses


def _running_stats_left_alone(model: nn.Module, perturbed: bool):
    from samkit.optim.batchnorm import disable_running_stats

    return disable_running_stats(model) if perturbed else nullcontext()


def asks_for_example_losses(optimizer: Any, batch_size: int) -> bool:
    """Does the optimizer want per-example losses for a batch of ``batch_size`` (it has a
    ``selects_examples(n)`` method that says so: ESAM's data selection)?"""
    selects = getattr(optimizer, "selects_examples", None)
    return callable(selects) and bool(selects(batch_size))


def step_closure(
    optimizer: Optimizer,
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[Any, Tensor]],
    *,
    example_loss_fn: LossFn | None = None,
    **options: Any,
) -> StepClosure:
    """The closure for ``optimizer.step`` over ``micro_batches``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; a sharpness-aware one calls the closure twice.
        model: the module the forward passes call (a ``DistributedDataParallel`` module too).
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a micro-batch.
        micro_batches: a list of ``(x, y)`` pairs.
        example_loss_fn: the per-example loss ``(output, y) -> 1-d tensor``; when given, the
            batch is one micro-batch, the model is not DDP and the optimizer asks for example
            losses (:func:`asks_for_example_losses`), the closure also has ``losses()``.
        scaler: a ``torch.amp.GradScaler`` that scales each backward (pass it to the step too).
        perturbation: ``"synced"`` or ``"local"`` (DDP: the first pass of a sharpness-aware
            step runs under ``no_sync()``).
        global_examples: under DDP, the examples of the global batch; synced passes then weigh
            this rank's losses by its share of them (exact with uneven shards). Default: the
            rank's own mean (DDP averages the ranks).
        autocast: a dtype for ``torch.autocast`` (mixed precision), or None.
        observe: ``observe(output, y)`` for every micro-batch of the first pass (outputs
            detached), e.g. to count correct predictions.
        after_first_pass: ``f(mean_loss)`` once the first pass's gradient is in ``.grad``,
            before the optimizer uses it (it may raise to abandon the step).
        indices, epoch, num_examples: what the optimizer's ``loss_term`` may ask for (its
            ``batch_needs``): the examples' positions in the training set (a 1-d tensor for
            the whole batch, cut at the micro-batches), the epoch, the training set's size.
    """
    if (
        example_loss_fn is not None
        and len(micro_batches) == 1
        and not hasattr(model, "no_sync")
        and asks_for_example_losses(optimizer, len(micro_batches[0][1]))
    ):
        return ExampleLossStepClosure(
            optimizer, model, loss_fn, micro_batches, example_loss_fn=example_loss_fn, **options
        )
    return StepClosure(optimizer, model, loss_fn, micro_batches, **options)


def take_step(
    optimizer: Optimizer, closure: Callable[[], Any], scaler: torch.amp.GradScaler | None = None
) -> Any:
    """``optimizer.step(closure)``, the scaler passed the way the optimizer takes it, then
    ``scaler.update()``; returns the closure's (first) loss.

    A samkit optimizer (its step form says it wraps a base optimizer) takes
    ``step(closure, scaler=scaler)``; a plain optimizer with an enabled scaler runs the closure
    and ``scaler.step(optimizer)`` (``GradScaler.step`` takes no closure).
    """
    use_scaler = scaler is not None and scaler.is_enabled()
    if _form(optimizer).wraps:
        loss = optimizer.step(closure, scaler=scaler if use_scaler else None)
    elif use_scaler:
        with torch.enable_grad():
            loss = closure()
        scaler.step(optimizer)
    else:
        loss = optimizer.step(closure)
    if use_scaler:
        scaler.update()
    return loss


# ---------------------------------------------------------------------- the engine


@dataclass
class StepEngine:
    """How every step of a run is taken: built once, then ``engine.step(x, y)`` per batch.

    Args:
        optimizer, model, loss_fn, example_loss_fn, scaler, perturbation, autocast: as in
            :func:`step_closure`.
        grad_accum: micro-batches per batch (:func:`split_batch`).
    """

    optimizer: Optimizer
    model: nn.Module
    loss_fn: LossFn
    grad_accum: int = 1
    scaler: torch.amp.GradScaler | None = None
    autocast: torch.dtype | None = None
    perturbation: str = "synced"
    example_loss_fn: LossFn | None = None

    def __post_init__(self) -> None:
        check_perturbation(self.perturbation)
        split_batch(torch.zeros(1), torch.zeros(1), self.grad_accum)  # validates grad_accum
        if self.perturbation == "local" and _form(self.optimizer).perturbs:
            from samkit.distributed import check_local_optimizer

            check_local_optimizer(self.optimizer)

    @property
    def batch_needs(self) -> frozenset[str]:
        """What the optimizer asks to be given with each batch (``"indices"``, ``"epoch"``,
        ``"num_examples"``: the keywords of :meth:`step`); see :func:`batch_needs`."""
        return batch_needs(self.optimizer)

    def example_losses_unavailable(self, batch_size: int) -> str | None:
        """Why an optimizer that asks for per-example losses cannot have them, or None."""
        if not asks_for_example_losses(self.optimizer, batch_size):
            return None
        if self.example_loss_fn is None:
            return "no per-example loss function was given"
        if self.grad_accum > 1 or hasattr(self.model, "no_sync"):
            return "they need grad_accum=1 and one process"
        return None

    def closure(self, x: Any, y: Tensor, **options: Any) -> StepClosure:
        """The closure for the batch ``(x, y)`` (``options``: ``global_examples``, ``observe``,
        ``after_first_pass``, ``indices``, ``epoch``, ``num_examples`` of :func:`step_closure`)."""
        return step_closure(
            self.optimizer, self.model, self.loss_fn, split_batch(x, y, self.grad_accum),
            example_loss_fn=self.example_loss_fn, scaler=self.scaler,
            perturbation=self.perturbation, autocast=self.autocast, **options,
        )

    def step(self, x: Any, y: Tensor, **options: Any) -> Tensor:
        """One optimizer step on the batch ``(x, y)``; returns the mean loss at ``w``."""
        return take_step(self.optimizer, self.closure(x, y, **options), self.scaler)

    def autocast_context(self, device: torch.device):
        """``torch.autocast`` as the steps use it (for evaluation passes), or a no-op."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)
