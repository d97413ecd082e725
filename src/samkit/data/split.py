"""The in-memory data set: :class:`DataSplit`, subsets, label noise, standardization, batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from samkit.optim._validation import check_seed as _check_seed


@dataclass(frozen=True, eq=False)
class DataSplit:
    """One split (train or test) of a data set, held as tensors on one device.

    Attributes:
        x: inputs. float32 ``N×C×H×W`` for images, float32 ``N×D`` for vectors,
            int64 ``N×T`` token windows for text.
        y: int64 targets: ``N`` class labels, or ``N×T`` next tokens for text.
        num_classes: number of classes (the vocabulary size for text).
        input_shape: the shape of one example, ``x.shape[1:]``.
        name: the data set's name (``"fashion-mnist"``, ...).
        classes: optional names of the classes (the characters of the vocabulary for text).

    Two splits compare equal only if they are the same object (tensors have no single truth
    value); compare ``x`` and ``y`` with ``torch.equal``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"DataSplit {self.name!r}: x has {self.x.shape[0]} examples but y has "
                f"{self.y.shape[0]}"
            )
        if tuple(self.x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"DataSplit {self.name!r}: input_shape {tuple(self.input_shape)} does not match "
                f"x.shape[1:] = {tuple(self.x.shape[1:])}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.x.device

    @property
    def nbytes(self) -> int:
        """Memory held by ``x`` and ``y`` in bytes (to decide whether a split fits a device)."""
        return self.x.element_size() * self.x.nelement() + self.y.element_size() * self.y.nelement()

    def to(self, device: str | torch.device, non_blocking: bool = False) -> DataSplit:
        """A copy on ``device`` (the same object if it is already there)."""
        device = torch.device(device)
        if self.x.device == device and self.y.device == device:
            return self
        return replace(
            self,
            x=self.x.to(device, non_blocking=non_blocking),
            y=self.y.to(device, non_blocking=non_blocking),
        )


def check_seed(seed: int) -> int:
    """``seed`` as an int, or a ValueError naming it (:func:`samkit.optim._validation.check_seed`:
    an integer, 0 <= seed < 2**63)."""
    return _check_seed("seed", seed)


def subset_indices(
    labels: np.ndarray | Tensor, n: int, stratified: bool = True, seed: int = 0
) -> np.ndarray:
    """Indices of an ``n``-example subset, in increasing order.

    ``stratified=True``: each class keeps its share of ``n`` (largest-remainder rounding),
    the examples of a class drawn at random with ``seed``. ``stratified=False``: the first ``n``.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    total = len(labels)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= total:
        raise ValueError(f"Invalid subset: {n!r} (an integer from 1 to {total}, the train size)")
    n = int(n)
    if not stratified or n == total:
        return np.arange(n)
    rng = np.random.default_rng(check_seed(seed))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / total
    take = np.floor(exact).astype(np.int64)
    # Largest remainder: hand the leftover examples to the classes that lost the most by rounding
    # (ties go to the smaller class label, so the result is deterministic).
    leftover = n - int(take.sum())
    order = np.lexsort((classes, -(exact - take)))
    take[order[:leftover]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, take, strict=True)
        if k > 0
    ]
    return np.sort(np.concatenate(chosen))


def flip_labels(
    labels: Tensor, num_classes: int, fraction: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Symmetric label noise: exactly ``round(fraction * N)`` labels, chosen with ``seed``, each
    replaced by a different class drawn uniformly.

    Returns ``(noisy_labels, flipped_mask)``; the input is not modified.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
        0.0 <= fraction <= 1.0
    ):
        raise ValueError(f"Invalid label_noise: {fraction!r} (a fraction in [0, 1])")
    if fraction > 0 and num_classes < 2:
        raise ValueError(f"label_noise needs at least 2 classes, got num_classes={num_classes}")
    n = labels.shape[0]
    k = int(round(fraction * n))
    gen = torch.Generator().manual_seed(check_seed(seed))
    idx = torch.randperm(n, generator=gen)[:k]
    # Adding an offset in 1..C-1 modulo C gives every other class with equal probability.
    offset = torch.randint(1, max(num_classes, 2), (k,), generator=gen)
    noisy = labels.detach().cpu().clone()
    noisy[idx] = (noisy[idx] + offset) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return noisy.to(labels.device), mask.to(labels.device)


def standardization_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of ``x`` per channel (images ``N×C×H×W``) or per feature
    (vectors ``N×D``), shaped to broadcast against ``x``; a zero deviation becomes 1."""
    if x.ndim < 2:
        raise ValueError(f"standardization needs N×D or N×C×H×W inputs, got shape {tuple(x.shape)}")
    dims = (0, *range(2, x.ndim)) if x.ndim > 2 else (0,)
    xd = x.double()
    mean = xd.mean(dim=dims, keepdim=True)
    std = xd.std(dim=dims, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.to(x.dtype), std.to(x.dtype)


def iterate_batches(
    split: DataSplit,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    device: str | torch.device | None = None,
    indices: bool = False,
) -> Iterator[tuple[Tensor, Tensor]] | Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(x, y)`` mini-batches of ``split`` (one pass, an epoch); with ``indices``,
    ``(x, y, idx)`` where ``idx`` (int64, on the batch's device) holds the examples' positions in
    ``split`` (what SAF's per-example memory needs).

    The fast path: the split already lives on the training device, and a batch is an index into
    its tensors (no copies through a DataLoader). ``shuffle`` draws a permutation from
    ``generator`` (seed it for reproducible epochs; a CPU generator works for every device).

    Streaming: for a split too large for the accelerator, keep it on the CPU
    (``load_dataset(..., device="cpu")``) and pass ``device="cuda"``: each batch is then copied
    on its own (from pinned memory, asynchronously), so only one batch at a time is on the device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (a positive integer)")
    n = len(split)
    target = torch.device(device) if device is not None else split.x.device
    streaming = target != split.x.device
    pin = streaming and target.type == "cuda" and split.x.device.type == "cpu"
    x, y = split.x, split.y
    if shuffle:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            idx = None
        else:
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
        if pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        if streaming:
            xb = xb.to(target, non_blocking=pin)
            yb = yb.to(target, non_blocking=pin)
        if not indices:
            yield xb, yb
            continue
        if idx is None:
            idx = torch.arange(start, start + len(yb), device=target)
        yield xb, yb, idx.to(target, non_blocking=pin)
