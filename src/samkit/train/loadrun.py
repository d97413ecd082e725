"""Reading a finished (or running) training run back: :func:`load_run` (``samkit.load_run``)
-> config, metrics, model; the config of a checkpoint, and how ``config.yaml`` differs from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from samkit.config import RESUMABLE_CHANGES, TrainConfig, from_dict, legacy_values, upgrade_keys
from samkit.train.checkpoint import load_checkpoint
from samkit.train.logs import read_metrics
from samkit.train.runfiles import CHECKPOINT


class Run(tuple):
    """What :func:`load_run` returns: ``config, metrics, model = samkit.load_run(path)``."""

    __slots__ = ()

    def __new__(cls, config: TrainConfig, metrics: list[dict[str, Any]], model: nn.Module | None):
        return super().__new__(cls, (config, metrics, model))

    config = property(lambda self: self[0])
    metrics = property(lambda self: self[1])
    model = property(lambda self: self[2])


def config_of_checkpoint(saved: dict[str, Any], source: str = "checkpoint") -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint was written with (its ``config``: older key names
    upgraded, the keys an older samkit lacked with the values they had then)."""
    values = upgrade_keys(dict(saved), source=source)
    values = {**legacy_values(values), **values}
    return from_dict(values, source)


def config_yaml_differs(path: Path, saved: dict[str, Any],
                        ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """The keys in which the ``config.yaml`` at ``path`` differs from a checkpoint's config
    (``saved``), but ``ignore`` (a resume that extends the budget writes config.yaml before its
    first checkpoint); an unreadable or empty file differs in ``config.yaml``; no file: none."""
    from samkit.config import read_yaml

    if not path.is_file():
        return []
    try:
        text = read_yaml(path)
    except (OSError, ValueError):
        return ["config.yaml (unreadable)"]
    if not isinstance(text, dict) or not text:
        return ["config.yaml (empty)"]
    try:
        written = upgrade_keys(text)
    except ValueError:
        return ["config.yaml (unreadable)"]
    saved = upgrade_keys(dict(saved))
    keys = sorted(set(written) | set(saved))
    return [k for k in keys
            if k not in ignore and _plain(written.get(k)) != _plain(saved.get(k))]


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (YAML and checkpoints spell sequences differently)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load_run(run_dir, map_location: Any = "cpu") -> Run:
    """The config, the metrics records and the model with its trained weights (those of the
    run's last checkpoint; None when it has none) of a finished (or running) run.

    The config is the checkpoint's (the truth about the weights); ``config.yaml`` is a copy for
    people to read, used only when there is no checkpoint. When it differs from the checkpoint
    a :class:`ConfigMismatchWarning` names the keys. A torn last line of ``metrics.jsonl`` (a
    full disk) is left out with a warning (:func:`samkit.train.read_metrics`).

    >>> config, metrics, model = samkit.load_run("runs/digits-mlp-sam-s0")
    """
    import warnings

    from samkit._extras import require
    from samkit.config import load_config
    from samkit.models import create_model

    require("experiments", "yaml", what="samkit.load_run (a run's config.yaml)")
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT
    state = None
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint, map_location=map_location)
        config = config_of_checkpoint(state["config"], f"the config of checkpoint {checkpoint}")
        differ = config_yaml_differs(run_dir / "config.yaml", state["config"])
        if differ:
            warnings.warn(f"{run_dir / 'config.yaml'} differs from the checkpoint {checkpoint} "
                          f"in {', '.join(differ)}; returned the checkpoint's config",
                          ConfigMismatchWarning, stacklevel=2)
    elif (run_dir / "config.yaml").is_file():
        config = load_config(run_dir / "config.yaml")
    else:
        raise FileNotFoundError(f"No run at {run_dir}: it has no checkpoint.pt and no config.yaml")
    metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() \
        else []
    model = None
    if state is not None:
        weights = state["model"]
        shapes = state.get("data_shape")
        if shapes is None:  # older checkpoints: the shapes come from the data set
            from samkit.data import load_dataset

            train_split, _ = load_dataset(config.dataset, data_dir=config.data_dir,
                                          subset=config.subset, seed=config.data_seed)
            shapes = [list(train_split.x.shape[1:]), int(train_split.num_classes)]
        model = create_model(config.model, tuple(shapes[0]), shapes[1], **config.model_kwargs)
        model.load_state_dict(weights)
        model.eval()
    return Run(config, metrics, model)


class ConfigMismatchWarning(UserWarning):
    """A run's ``config.yaml`` differs from its checkpoint's config (edited by hand?)."""
