"""Batches, parameters and model-state guards shared by the curvature operators and sharpness.

A *data* argument is either one ``(x, y)`` batch or a re-iterable collection of such batches (a
list, a ``DataLoader``). Every loss is ``loss_fn(model(x), y)``, assumed to be the **mean** over
the batch; over several batches the loss is the mean over all examples, so batch ``b`` of ``n_b``
examples gets the weight ``n_b / N``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim.batchnorm import disable_running_stats

LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]


def is_single_batch(data: Any) -> bool:
    """``(x, y)`` with a tensor ``x`` (a list of two batches has a tuple first, not a tensor)."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def batch_size(x: Any, y: Any) -> int:
    """The number of examples in a batch: the leading size of ``y`` (or of ``x``)."""
    for t in (y, x):
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise ValueError(
        f"Invalid batch: cannot tell its size from x of type {type(x).__name__} and y of type "
        f"{type(y).__name__} (allowed: y or x a tensor with a leading batch dimension)"
    )


class Batches:
    """A re-iterable view of ``data`` that checks it once and yields ``(x, y, n)`` on ``device``.

    Raises ``ValueError`` for a one-shot iterator (the data are read at every product), for an
    empty collection, and (when iterated) for a pass that yields no example.
    """

    def __init__(self, data: Any, device: torch.device) -> None:
        self.device = device
        if is_single_batch(data):
            x, y = data
            self.single: Batch | None = (x, y)
            self.source: Iterable[Batch] = [(x, y)]
            if batch_size(x, y) == 0:
                raise ValueError("Invalid data: the batch holds 0 examples (allowed: at least 1)")
            return
        self.single = None
        if (
            isinstance(data, (tuple, list))
            and len(data) == 1
            and is_single_batch(data[0])
            and batch_size(*data[0]) > 0
        ):
            self.single = tuple(data[0])  # [(x, y)] is one batch: its graph can be cached
            self.source = [self.single]
            return
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise ValueError(
                f"Invalid data: {type(data).__name__} (allowed: one (x, y) batch or a list / "
                "DataLoader of (x, y) batches)"
            )
        if isinstance(data, Iterator):
            raise ValueError(
                f"Invalid data: {type(data).__name__} is a one-shot iterator, but the data are "
                "read at every product (allowed: a list or a DataLoader, which can be read again)"
            )
        if isinstance(data, Sized) and len(data) == 0:
            raise ValueError("Invalid data: no batches (allowed: at least one (x, y) batch)")
        self.source = data

    def __iter__(self) -> Iterator[tuple[Any, Any, int]]:
        total = 0
        for i, batch in enumerate(self.source):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(
                    f"Invalid data: batch {i} is a {type(batch).__name__} of length "
                    f"{len(batch) if isinstance(batch, Sized) else '?'} (allowed: an (x, y) pair)"
                )
            x, y = batch
            n = batch_size(x, y)
            if n == 0:
                continue
            total += n
            yield to_device(x, self.device), to_device(y, self.device), n
        if total == 0:
            raise ValueError("Invalid data: the batches hold 0 examples (allowed: at least 1)")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move a tensor (or the tensors of a tuple, list or dict) to ``device``, asynchronously."""
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def resolve_params(
    model: nn.Module, params: Iterable[Tensor] | None
) -> tuple[list[str], list[Tensor]]:
    """The parameters to differentiate, with their names in ``model``.

    ``None`` means every parameter that requires a gradient. Given parameters must belong to
    ``model``, share one device and one dtype, and hold at least one entry in all.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        wanted = list(params)
        index = {id(p): (n, p) for n, p in named}
        missing = [i for i, p in enumerate(wanted) if id(p) not in index]
        if missing:
            raise ValueError(
                f"Invalid params: entries {missing} are not parameters of the model (allowed: "
                "a subset of model.parameters())"
            )
        seen: set[int] = set()
        chosen = []
        for p in wanted:
            if id(p) not in seen:
                seen.add(id(p))
                chosen.append(index[id(p)])
    if not chosen or sum(p.numel() for _, p in chosen) == 0:
        raise ValueError(
            f"Invalid params: {type(model).__name__} has no parameter to differentiate (allowed: "
            "at least one parameter with requires_grad=True, or pass params=...)"
        )
    devices = {p.device for _, p in chosen}
    dtypes = {p.dtype for _, p in chosen}
    if len(devices) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"Invalid params: they span devices {sorted(map(str, devices))} and dtypes "
            f"{sorted(map(str, dtypes))} (allowed: one device and one floating dtype)"
        )
    if not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"Invalid params: dtype {next(iter(dtypes))} (allowed: a floating dtype)")
    return [n for n, _ in chosen], [p for _, p in chosen]


@contextmanager
def fixed_rng(device: torch.device, seed: int, enabled: bool = True) -> Iterator[None]:
    """Run the block with the random generator of ``device`` (and the CPU's) seeded to ``seed``,
    then put the caller's generator states back.

    Used in training mode so that dropout draws the same masks at every product: the loss is then
    one fixed function of the weights and its Hessian a fixed symmetric matrix.
    """
    if not enabled:
        yield
        return
    accel = device.type not in ("cpu", "meta")
    devices: Sequence[Any] = [device] if accel else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accel else "cuda"):
        torch.default_generator.manual_seed(seed)
        if accel:
            module = torch.get_device_module(device.type)
            with module.device(device):
                module.manual_seed(seed)
        yield


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics stay as they are inside the block (layers in training mode
    normalize with the batch statistics, as they would in a training step; layers in eval mode
    use the running statistics)."""
    with disable_running_stats(model):
        yield


@contextmanager
def differentiable(params: Sequence[Tensor]) -> Iterator[None]:
    """Autograd on, and every parameter in ``params`` differentiable inside the block, frozen ones
    (``requires_grad=False``) included; they are frozen again on the way out, also on error."""
    frozen = [p for p in params if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def batch_mean(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any, int]],
    seed: int,
    device: torch.device,
    fn: Callable[[Any, Any], Sequence[Tensor]],
) -> list[Tensor]:
    r""":math:`\sum_b \frac{n_b}{N}\,` ``fn(x_b, y_b)`` over ``batches`` of ``(x, y, n)``: the one
    size-weighted mean of samkit's measurements (the losses, gradients and curvature products of
    the operators and of :func:`samkit.sharpness`).

    Batch ``b`` runs with BatchNorm's running statistics untouched and, in training mode, the
    random generator seeded to ``seed + b`` (fixed dropout masks). ``fn`` returns a list of
    tensors (the same shapes for every batch); one batch is returned as it came, unscaled.
    """
    out: list[Tensor] | None = None
    first = total = 0
    several = False
    for b, (x, y, n) in enumerate(batches):
        with untouched(model), fixed_rng(device, seed + b, model.training):
            part = list(fn(x, y))
        if out is None:
            out, first = part, n
        else:
            if not several:  # a second batch: weigh the first one by its size
                torch._foreach_mul_(out, float(first))
                several = True
            torch._foreach_add_(out, part, alpha=float(n))
        total += n
    if out is None or total == 0:
        raise ValueError("Invalid data: the batches hold 0 examples (allowed: at least 1)")
    if several:
        torch._foreach_div_(out, float(total))
    return out
