"""Train a small MLP on scikit-learn's digits with Lightning and ASAM (automatic optimization).

    pip install 'samkit[lightning]'
    python examples/lightning_sam.py
"""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import samkit
from samkit.integrations.lightning import is_perturbed, running_stats


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        with running_stats(self):  # BatchNorm statistics only from the pass at w
            loss = F.cross_entropy(self.net(x), y)
        if not is_perturbed(self):  # the closure runs twice: log the loss at w
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        base = torch.optim.SGD(samkit.param_groups(self, weight_decay=5e-4), lr=0.05,
                               momentum=0.9)
        opt = samkit.ASAM(base, rho=0.5, eta=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


if __name__ == "__main__":
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    data = torch.utils.data.TensorDataset(x, torch.tensor(y))
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    trainer = L.Trainer(max_steps=200, accelerator="auto", logger=False,
                        enable_checkpointing=False)
    trainer.fit(Classifier(), loader)
