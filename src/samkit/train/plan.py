"""A run's plan: its batch size, steps per epoch, budget in steps and epochs, from the config,
the loader and the training set's size; the settings that cannot work with them are refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samkit.config import TrainConfig, steps_per_epoch


@dataclass(frozen=True)
class Plan:
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int


def plan(cfg: TrainConfig, n: int, loader: Any, world_size: int = 1) -> Plan:
    """The plan of a run of ``cfg`` on ``n`` examples drawn by ``loader`` (a full-batch loader:
    one step per epoch, ``steps`` or ``epochs`` of them; a minibatch loader without a batch
    size gets the config's; its own ``drop_last`` counts)."""
    from samkit.train.loader import FullBatch

    if isinstance(loader, FullBatch):
        batch_size, per_epoch, steps = n, 1, cfg.steps or cfg.epochs
    else:
        # a loader's own batch size and drop_last win over the config's
        size = cfg.batch_size if loader.batch_size is None else loader.batch_size
        batch_size, per_epoch = steps_per_epoch(n, size, loader.drop_last)
        steps = cfg.steps or cfg.epochs * per_epoch
        if loader.batch_size is None:
            loader.batch_size = batch_size
    epochs = -(-steps // per_epoch)
    check_loss_term_switches_on(cfg, epochs)  # SAF/MESA that would be plain SGD
    if cfg.grad_accum > batch_size:
        raise ValueError(
            f"Invalid grad_accum: {cfg.grad_accum} micro-batches for a batch of "
            f"{batch_size} examples (allowed: 1 <= grad_accum <= the batch size)")
    if cfg.warmup_epochs * per_epoch > steps:
        raise ValueError(
            f"Invalid warmup_epochs: {cfg.warmup_epochs} epochs of warm-up is more than the "
            f"run's {steps} steps (allowed: at most the budget)")
    if world_size > 1:
        from samkit.train.ddp import check_batches_shard

        check_batches_shard(n, batch_size, world_size, cfg.drop_last)
    return Plan(batch_size, per_epoch, steps, epochs)


def check_loss_term_switches_on(config: TrainConfig, num_epochs: int) -> None:
    """Refuse SAF/MESA (an optimizer with a ``start_epoch``) whose loss term would never be on
    in a run of ``num_epochs`` epochs: the term is on in epochs ``e > start_epoch`` (0-based),
    and SAF's also needs the logits of epoch ``e - lag`` (``e >= lag``), so when no epoch
    qualifies the run is its base optimizer under another name (and a grid over ``lam``
    chooses among identical runs). The keys and defaults are the registry's declarations.

    Raises:
        ValueError: naming ``start_epoch`` (and ``lag``), the run's epochs and what to do.
    """
    from samkit.optim import registry

    name = config.optimizer.lower()
    try:
        declared = registry.optimizer_options(name)["descent"]
    except ValueError:
        return  # the optimizer's own error comes where it is built
    if "start_epoch" not in declared:
        return
    values = {**declared, **config.optimizer_kwargs}
    start, lam, lag = values["start_epoch"], values.get("lam", 1.0), values.get("lag", 0)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, lag)) or \
            not isinstance(lam, (int, float)):
        return  # the constructor names the bad value
    first = max(start + 1, lag)  # the first epoch in which the term is on
    if lam == 0 or num_epochs > first:
        return  # lam = 0 turns the term off on purpose
    base = config.base or registry.optimizer_info(name).base
    if lag > start + 1:
        raise ValueError(
            f"Invalid lag for {name}: {lag} in a run of {num_epochs} epoch(s): its loss term "
            f"uses each example's logits of {lag} epochs before, so it is on only from epoch "
            f"{lag} (0-based) and the run would be plain {base} under another "
            f"name (allowed: lag < {num_epochs}; e.g. {name}:lag={max(1, num_epochs - 1)}, or "
            f"more than {lag} epochs)")
    raise ValueError(
        f"Invalid start_epoch for {name}: {start} in a run of {num_epochs} epoch(s): its loss "
        f"term is on only in epochs e > start_epoch (0-based), so it would never switch on and "
        f"the run would be plain {base} under another name (allowed: "
        f"start_epoch < {num_epochs - 1}; e.g. {name}:start_epoch={max(-1, num_epochs - 2)} in "
        f"--optimizers, --set optimizer_kwargs.start_epoch={max(-1, num_epochs - 2)}, or more "
        f"than {start + 1} epochs)"
    )
