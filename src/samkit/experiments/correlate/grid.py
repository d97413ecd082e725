"""The study's grid: one :class:`ModelSpec` (hyperparameters + training config) per point."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.config import TrainConfig, from_dict, to_dict
from samkit.experiments.correlate.config import CorrelateConfig

HYPERPARAMETERS = ("batch_size", "lr", "weight_decay", "dropout")


def _fmt_num(value: float) -> str:
    return f"{value:g}"


def model_key(hp: dict[str, Any]) -> str:
    """The folder name of one grid point, e.g. ``bs32-lr0.1-wd0.0005-do0``."""
    return (f"bs{hp['batch_size']}-lr{_fmt_num(hp['lr'])}-wd{_fmt_num(hp['weight_decay'])}"
            f"-do{_fmt_num(hp['dropout'])}")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: its hyperparameters and its full training config."""

    key: str
    hparams: dict
    train: TrainConfig

    @property
    def run_dir(self) -> Path:
        return self.train.run_dir


def grid(config: CorrelateConfig, run_dir: Path) -> list[ModelSpec]:
    """Every grid point's :class:`ModelSpec`, checked before anything trains."""
    specs = []
    for bs, lr, wd, do in itertools.product(
        config.batch_sizes, config.lrs, config.weight_decays, config.dropouts
    ):
        hp = {"batch_size": int(bs), "lr": float(lr), "weight_decay": float(wd),
              "dropout": float(do)}
        key = model_key(hp)
        values = to_dict(config.train)
        values.update(batch_size=hp["batch_size"], lr=hp["lr"], weight_decay=hp["weight_decay"],
                      model_kwargs={**values["model_kwargs"], "dropout": hp["dropout"]},
                      name=key, out_dir=str(run_dir / "models"))
        specs.append(ModelSpec(key, hp, from_dict(values, f"grid point {key}")))
    return specs
