"""The real Fashion-MNIST files (Debian's dataset-fashion-mnist, installed by .ci/run)."""

from __future__ import annotations

import pytest
import torch
from realdata import require_fashion_mnist

from samkit.data import load_dataset


@pytest.mark.slow
def test_fashion_mnist_real_files():
    require_fashion_mnist()
    train, test = load_dataset("fashion-mnist", standardize=False)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    # The published pixel statistics of Fashion-MNIST's training set (mean 0.2860, std 0.3530).
    assert abs(train.x.mean().item() - 0.2860) < 1e-3
    assert abs(train.x.std().item() - 0.3530) < 1e-3
    sub, _ = load_dataset("fashion-mnist", subset=5000, label_noise=0.4, seed=0)
    assert torch.bincount(sub.y).sum() == 5000
    assert abs(sub.x.mean().item()) < 1e-4
    # Nearest class mean already gets far above chance (about 68%) on real images.
    means = torch.stack([train.x[train.y == c].flatten(1).mean(0) for c in range(10)])
    acc = (torch.cdist(test.x.flatten(1), means).argmin(1) == test.y).float().mean().item()
    assert acc > 0.6
