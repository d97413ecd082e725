"""iterate_batches: the example indices it yields when asked."""

import pytest
import torch

from samkit.data import iterate_batches
from samkit.data.split import DataSplit


def toy(n=10):
    x = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
    return DataSplit(x, torch.arange(n) % 4, 4, (3,), "toy")


@pytest.mark.parametrize("shuffle, drop_last", [(True, False), (True, True), (False, False)])
def test_indices_point_at_the_batch_rows_and_cover_the_epoch(shuffle, drop_last):
    data = toy()
    gen = torch.Generator().manual_seed(3)
    seen, batches = [], 0
    for x, y, idx in iterate_batches(data, 4, shuffle, gen, drop_last, indices=True):
        assert idx.dtype == torch.int64 and idx.device == x.device
        assert torch.equal(data.x[idx], x) and torch.equal(data.y[idx], y)
        seen += idx.tolist()
        batches += 1
    assert batches == (2 if drop_last else 3)
    assert len(set(seen)) == len(seen) == (8 if drop_last else 10)
    if not shuffle:
        assert seen == list(range(10))


def test_the_same_order_with_and_without_indices():
    data = toy()
    plain = list(iterate_batches(data, 3, True, torch.Generator().manual_seed(5)))
    withi = list(iterate_batches(data, 3, True, torch.Generator().manual_seed(5), indices=True))
    assert len(plain) == len(withi)
    for (x, y), (x2, y2, _) in zip(plain, withi, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
