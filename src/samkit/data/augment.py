"""Tensor-side augmentation on the device: random crop with zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def augment_batch(
    x: Tensor, generator: torch.Generator | None = None, crop_padding: int = 4, flip: bool = True
) -> Tensor:
    """Random-crop and flip a batch of images ``B×C×H×W`` on its own device, seeded.

    Each image is zero-padded by ``crop_padding`` pixels on every side, a random ``H×W`` window
    is cut from it (offsets uniform in ``0..2*crop_padding``), and with probability 1/2 it is
    mirrored left-right (the standard CIFAR augmentation of He et al. 2016). All images are done
    in one gather, with no Python loop over the batch.

    The random numbers come from ``generator`` (a CPU generator works for every device; the
    same seed gives the same batch). Padding is with zeros of the *input*: on standardized data
    that is the mean pixel, which is what the reference implementations do in effect.

    Returns a new tensor; ``x`` is not modified.
    """
    if x.ndim != 4:
        raise ValueError(
            f"augment_batch needs images B×C×H×W, got shape {tuple(x.shape)} "
            "(vectors and text are not augmented)"
        )
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
        raise ValueError(f"Invalid crop_padding: {crop_padding!r} (a non-negative integer)")
    b, _, h, w = x.shape
    if crop_padding == 0 and not flip:
        return x.clone()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    p = crop_padding
    oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gen_device)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gen_device)
    if flip:
        flips = torch.rand(b, generator=generator, device=gen_device) < 0.5
    oy, ox = oy.to(x.device), ox.to(x.device)
    padded = F.pad(x, (p, p, p, p)) if p > 0 else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h  # B×H
    cols = ox[:, None] + ar_w  # B×W
    if flip:
        # A flipped crop reads its columns right to left.
        cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # B×H×W×C
    return out.permute(0, 3, 1, 2).contiguous()
