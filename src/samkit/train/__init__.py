"""The experiment runner's trainer: config, loop (with a task and a loader), callbacks, the run
folder (checkpoints, logs).

>>> from samkit.train import TrainConfig, Trainer, load_config
>>> cfg = load_config("configs/fashion-mnist-mlp.yaml", ["optimizer=asam", "rho=0.5"])
>>> record = Trainer(cfg).fit()
"""

from samkit.config import (
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from samkit.train.callbacks import Callback, TrainState
from samkit.train.checkpoint import load_checkpoint, save_checkpoint
from samkit.train.edge import EdgeTracker, edge_for, read_edge_rows
from samkit.train.loader import FullBatch, Minibatch
from samkit.train.loadrun import load_run
from samkit.train.logs import read_metrics
from samkit.train.schedule import LRSchedule
from samkit.train.task import Classification, LanguageModel, SquareLoss, Task, classification_loss
from samkit.train.trainer import Trainer, train

__all__ = [
    "Callback",
    "Classification",
    "FullBatch",
    "LanguageModel",
    "Minibatch",
    "SquareLoss",
    "Task",
    "EdgeTracker",
    "LRSchedule",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "apply_overrides",
    "classification_loss",
    "edge_for",
    "from_dict",
    "load_checkpoint",
    "load_config",
    "load_run",
    "read_edge_rows",
    "read_metrics",
    "save_checkpoint",
    "save_config",
    "to_dict",
    "train",
]
