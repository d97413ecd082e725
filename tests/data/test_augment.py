"""augment_batch: random crop with zero padding and horizontal flip, seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samkit.data import augment_batch


def _reference(x, oy, ox, flips, p):
    """Per-image loop: pad, cut the window at (oy, ox), mirror when flipped."""
    out = []
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[2:]
    for i in range(len(x)):
        crop = padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out)


def test_matches_a_per_image_reference():
    x = torch.randn(16, 3, 8, 8)
    gen = torch.Generator().manual_seed(7)
    out = augment_batch(x, gen, crop_padding=2)
    # Replay the same draws: offsets y, offsets x, then the flip coins.
    gen.manual_seed(7)
    oy = torch.randint(0, 5, (16,), generator=gen)
    ox = torch.randint(0, 5, (16,), generator=gen)
    flips = torch.rand(16, generator=gen) < 0.5
    torch.testing.assert_close(out, _reference(x, oy, ox, flips, 2), rtol=0, atol=0)
    assert 0 < int(flips.sum()) < 16


def test_same_seed_same_batch_other_seed_other_batch():
    x = torch.randn(32, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_flip_only_and_crop_only():
    x = torch.randn(20, 1, 5, 5)
    gen = torch.Generator().manual_seed(0)
    flipped = augment_batch(x, gen, crop_padding=0, flip=True)
    for i in range(20):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    assert torch.equal(augment_batch(x, gen, crop_padding=0, flip=False), x)
    gen.manual_seed(3)
    cropped = augment_batch(torch.ones(50, 1, 6, 6), gen, crop_padding=3, flip=False)
    gen.manual_seed(3)
    oy = torch.randint(0, 7, (50,), generator=gen)
    ox = torch.randint(0, 7, (50,), generator=gen)
    # A window shifted by (dy, dx) keeps (6 - |dy|) × (6 - |dx|) pixels of the image.
    kept = (6 - (oy - 3).abs()) * (6 - (ox - 3).abs())
    assert torch.equal(cropped.flatten(1).sum(1).long(), kept)
    assert int((kept < 36).sum()) > 0


def test_input_is_not_modified():
    x = torch.randn(4, 3, 8, 8)
    before = x.clone()
    augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


def test_bad_inputs():
    with pytest.raises(ValueError, match="B×C×H×W"):
        augment_batch(torch.randn(4, 10), torch.Generator())
    with pytest.raises(ValueError, match="Invalid crop_padding: -1"):
        augment_batch(torch.randn(2, 1, 4, 4), torch.Generator(), crop_padding=-1)
