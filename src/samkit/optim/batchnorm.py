"""Keep BatchNorm's running statistics out of the perturbed pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, BatchNorm layers in training mode normalize with the batch statistics
    but leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    Use it around SAM's second forward pass, at ``w + ε``: the running statistics then follow
    the weights the model actually has, whatever the BatchNorm ``momentum`` (``None``, the
    cumulative average, included). It works by turning ``track_running_stats`` off for the
    block, which makes ``F.batch_norm`` get no running buffers; layers in eval mode still use
    their running statistics. The previous flags are restored even if the block raises.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            saved.append(module)
            module.track_running_stats = False
    try:
        yield model
    finally:
        for module in saved:
            module.track_running_stats = True
