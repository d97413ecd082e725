"""Subsets, label noise, standardization statistics and the batch iterator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samkit.data import (
    DataSplit,
    flip_labels,
    iterate_batches,
    load_dataset,
    standardization_stats,
    subset_indices,
)


def test_stratified_subset_keeps_class_shares():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])  # 100 examples, unbalanced
    idx = subset_indices(labels, 20, stratified=True, seed=3)
    assert len(idx) == 20 and len(set(idx)) == 20 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [10, 6, 3, 1]
    assert np.array_equal(idx, subset_indices(labels, 20, stratified=True, seed=3))
    assert not np.array_equal(idx, subset_indices(labels, 20, stratified=True, seed=4))


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=2, max_size=8), data=st.data())
def test_stratified_subset_size_and_rounding(counts, data):
    labels = np.repeat(np.arange(len(counts)), counts)
    n = data.draw(st.integers(1, len(labels)))
    idx = subset_indices(labels, n, seed=0)
    assert len(idx) == n and len(np.unique(idx)) == n
    got = np.bincount(labels[idx], minlength=len(counts))
    exact = np.array(counts) * n / len(labels)
    assert np.all(np.abs(got - exact) < 1)  # largest-remainder rounding: each within one


def test_first_n_subset():
    labels = np.arange(10) % 3
    assert subset_indices(labels, 4, stratified=False).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, -1, 101, 2.5, True])
def test_bad_subset_is_named(bad):
    with pytest.raises(ValueError, match=f"Invalid subset: {bad!r}"):
        subset_indices(np.zeros(100), bad)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300), k=st.integers(2, 12), fraction=st.floats(0, 1),
    seed=st.integers(0, 99),
)
def test_label_noise_flips_an_exact_fraction_to_other_classes(n, k, fraction, seed):
    labels = torch.arange(n) % k
    noisy, mask = flip_labels(labels, k, fraction, seed=seed)
    changed = noisy != labels
    assert int(changed.sum()) == round(fraction * n)  # exactly, and every flip changes the class
    assert torch.equal(changed, mask)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < k
    again, _ = flip_labels(labels, k, fraction, seed=seed)
    assert torch.equal(noisy, again)


def test_label_noise_is_symmetric():
    labels = torch.zeros(30000, dtype=torch.long)
    noisy, _ = flip_labels(labels, 10, 0.9, seed=0)
    counts = torch.bincount(noisy, minlength=10)[1:].double()
    assert counts.sum() == 27000
    assert (counts / 3000 - 1).abs().max() < 0.06  # uniform over the 9 other classes


def test_label_noise_seed_changes_the_choice():
    labels = torch.arange(1000) % 10
    a, _ = flip_labels(labels, 10, 0.4, seed=0)
    b, _ = flip_labels(labels, 10, 0.4, seed=1)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.2"])
def test_bad_label_noise_is_named(bad):
    with pytest.raises(ValueError, match="Invalid label_noise"):
        load_dataset("synthetic", label_noise=bad)


def test_load_dataset_noise_on_train_only_exact_and_seeded():
    clean, clean_test = load_dataset("synthetic", subset=1000)
    noisy, noisy_test = load_dataset("synthetic", subset=1000, label_noise=0.4, seed=0)
    assert int((noisy.y != clean.y).sum()) == 400
    assert torch.equal(noisy.x, clean.x)
    assert torch.equal(noisy_test.y, clean_test.y)
    again, _ = load_dataset("synthetic", subset=1000, label_noise=0.4, seed=0)
    other, _ = load_dataset("synthetic", subset=1000, label_noise=0.4, seed=1)
    assert torch.equal(again.y, noisy.y) and not torch.equal(other.y, noisy.y)


def test_standardization_stats_per_channel_and_per_feature():
    x = torch.randn(50, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5
    mean, std = standardization_stats(x)
    assert mean.shape == (1, 3, 1, 1)
    z = (x - mean) / std
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    v = torch.randn(50, 6)
    v[:, 2] = 7.0  # a constant feature must not divide by zero
    mean, std = standardization_stats(v)
    assert mean.shape == (1, 6) and std[0, 2] == 1
    assert torch.isfinite((v - mean) / std).all()


def _split(n=10):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return DataSplit(x, torch.arange(n), 10, (1,), "toy")


def test_iterate_batches_covers_every_example_once():
    split = _split(10)
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(split, 4, shuffle=True, generator=gen))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for x, y in batches:
        assert torch.equal(x[:, 0].long(), y)  # inputs stay paired with their labels
    assert [len(y) for _, y in iterate_batches(split, 4, shuffle=False, drop_last=True)] == [4, 4]
    in_order = torch.cat([y for _, y in iterate_batches(split, 3, shuffle=False)])
    assert in_order.tolist() == list(range(10))


def test_iterate_batches_is_seeded():
    split = _split(100)

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in iterate_batches(split, 16, True, gen)])

    assert torch.equal(order(5), order(5)) and not torch.equal(order(5), order(6))


def test_iterate_batches_streams_to_a_device():
    split = _split(8)
    batches = list(iterate_batches(split, 4, shuffle=False, device="meta"))
    assert all(x.device.type == "meta" and y.device.type == "meta" for x, y in batches)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        next(iterate_batches(_split(), 0))


def test_datasplit_checks_shapes():
    with pytest.raises(ValueError, match="input_shape"):
        DataSplit(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2, (3,), "bad")
    with pytest.raises(ValueError, match="examples"):
        DataSplit(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), 2, (2,), "bad")


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_bad_seed_is_named(bad):
    with pytest.raises(ValueError, match="Invalid seed"):
        load_dataset("synthetic", seed=bad)


def test_numpy_integer_seed_and_stratified_subset_of_a_real_loader():
    train, _ = load_dataset("digits", subset=100, seed=np.int64(3))
    assert torch.bincount(train.y).tolist() == [10] * 10
    first, _ = load_dataset("digits", subset=100, stratified=False)
    full, _ = load_dataset("digits")
    assert torch.equal(first.y, full.y[:100])


def test_datasplit_to_and_identity():
    split = _split(4)
    assert split.to("cpu") is split and split.device.type == "cpu"
    moved = split.to("meta")
    assert moved.x.device.type == "meta" and moved.name == "toy"
    assert split == split and split != moved  # identity, never an ambiguous tensor comparison
    assert split.nbytes == 4 * 4 + 4 * 8
