"""Lightning automatic optimization with a samkit optimizer: the closure runs twice and the
step equals samkit's own, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samkit

L = pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")
from samkit.integrations.lightning import is_perturbed, running_stats  # noqa: E402


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _optimizer(params, kind):
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return samkit.SAM(base, rho=0.1) if kind == "sam" else samkit.ASAM(base, rho=0.5)


class Tiny(L.LightningModule):
    def __init__(self, kind):
        super().__init__()
        self.net = _net()
        self.kind = kind
        self.passes = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.passes.append(is_perturbed(self))
        with running_stats(self):
            loss = nn.functional.cross_entropy(self.net(x), y)
        return loss

    def configure_optimizers(self):
        return _optimizer(self.parameters(), self.kind)


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_automatic_optimization_runs_the_closure_twice(kind, tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Tiny(kind)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert module.passes == [False, True] * 3

    net = _net()
    opt = _optimizer(net.parameters(), kind)
    for _ in range(3):

        def closure():
            opt.zero_grad()
            with samkit.disable_running_stats(net) if opt.is_perturbed else _Null():
                loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert int(module.net[1].num_batches_tracked) == 3  # running stats once per step


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
