"""The Trainer's task (loss, metric, evaluation) and loader (minibatch, stream, full batch), and
a Trainer without a run folder (write=False, the runs of samkit eos)."""

import pytest
import torch
import torch.nn.functional as F

from samkit.data import DataSplit
from samkit.train import Callback, TrainConfig, Trainer
from samkit.train.loader import FullBatch, Minibatch
from samkit.train.task import (
    Classification,
    LanguageModel,
    SquareLoss,
    classification_loss,
    make_loss,
    task_for,
)


def split(n=40, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataSplit(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g),
                     classes, (d,), "random")


@pytest.mark.parametrize("kind", ["mse", "mse-mean"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4)])
def test_square_loss_matches_the_eos_loss_and_its_example_losses(kind, shape):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    task = SquareLoss(kind)
    target = F.one_hot(y, shape[-1]).double()
    want = (out - target).pow(2).mean() if kind == "mse-mean" else \
        0.5 * (out - target).pow(2).sum(-1).mean()
    assert torch.equal(task.loss(out, y), want)
    assert torch.equal(make_loss(kind)(out, y), want)
    assert torch.allclose(task.example_losses(out, y).mean(), want)


def test_language_model_and_classification_losses():
    out, y = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    assert torch.equal(LanguageModel().loss(out, y), classification_loss(out, y))
    assert torch.equal(Classification(0.1).loss(out, y), classification_loss(out, y, 0.1))
    assert isinstance(task_for("ce", text=True), LanguageModel)
    assert isinstance(task_for("mse"), SquareLoss)
    with pytest.raises(ValueError, match="Invalid loss"):
        task_for("l1")


def test_stream_loader_is_the_eos_order():
    """One seeded stream of permutations, the last short batch dropped (eos's cursor loop)."""
    data, size, seed = split(n=23), 5, 3
    order, perm, cursor, want = torch.Generator().manual_seed(seed), None, 23, []
    for _ in range(13):
        if cursor + size > 23:
            perm, cursor = torch.randperm(23, generator=order), 0
        want.append(perm[cursor: cursor + size])
        cursor += size
    loader = Minibatch(size, drop_last=True, seed=seed, stream=True)
    got = [idx for epoch in range(4)
           for _, _, idx in loader.batches(data, epoch, torch.Generator(), indices=True)]
    assert all(torch.equal(a, b) for a, b in zip(got[:13], want, strict=True))


def test_minibatch_order_depends_on_seed_and_epoch_only():
    data = split()
    loader = Minibatch(8, seed=0)
    a = [y for _, y, _ in loader.batches(data, 2, torch.Generator())]
    b = [y for _, y, _ in loader.batches(data, 2, torch.Generator().manual_seed(99))]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    (x, y, idx), = FullBatch().batches(data, 0, torch.Generator(), indices=True)
    assert x is data.x and y is data.y and torch.equal(idx, torch.arange(40))


class FirstPass(Callback):
    def __init__(self):
        self.steps = []

    def on_first_pass(self, state, step, loss):
        assert all(p.grad is not None for p in state.model.parameters())
        self.steps.append((step, float(loss)))


def test_trainer_without_a_folder_full_batch_square_loss(tmp_path):
    cfg = TrainConfig(dataset="digits", model="mlp", optimizer="sam", rho=0.05, lr=0.1,
                      momentum=0.0, weight_decay=0.0, steps=5, lr_schedule="constant",
                      out_dir=str(tmp_path / "runs"), threads=1, checkpoint=False)
    train, test = split(n=30, d=8, classes=4), split(n=10, d=8, classes=4, seed=1)
    seen = FirstPass()
    trainer = Trainer(cfg, [seen], data=(train, test), verbose=0, task=SquareLoss("mse"),
                      loader=FullBatch(), write=False)
    record = trainer.fit()
    assert not (tmp_path / "runs").exists()  # nothing written
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.num_epochs) == (1, 5, 5)
    assert [s for s, _ in seen.steps] == [0, 1, 2, 3, 4]
    assert record["test_loss"] == pytest.approx(SquareLoss("mse").evaluate(
        trainer.model, test, 100, torch.device("cpu"))[0])
    with pytest.raises(ValueError, match="resume"):
        Trainer(cfg, resume=True, write=False)


def test_trainer_without_test_split_skips_evaluation(tmp_path):
    cfg = TrainConfig(dataset="digits", model="mlp", epochs=1, batch_size=10, threads=1,
                      out_dir=str(tmp_path), checkpoint=False)
    record = Trainer(cfg, data=(split(), None), verbose=0, write=False).fit()
    assert "test_acc" not in record and record["epoch"] == 1
