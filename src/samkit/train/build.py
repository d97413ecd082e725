"""What a :class:`~samkit.train.Trainer` builds from its config: the model (unless given), the
optimizer (from the registry, its keywords from the config's fields and the training set) with
its per-step LR schedule, and the step engine."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samkit.config import TrainConfig
from samkit.optim import create_optimizer
from samkit.step import StepEngine


def build_model(cfg: TrainConfig, train: Any) -> nn.Module:
    """``cfg.model`` for the inputs and classes of the split ``train``, initialized from
    ``cfg.seed``."""
    from samkit.models import create_model

    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, tuple(train.x.shape[1:]), train.num_classes,
                        **cfg.model_kwargs)


def optimizer_kwargs(config: TrainConfig, num_examples: int | None = None
                     ) -> tuple[dict[str, Any], list[str]]:
    """The keyword arguments for ``create_optimizer`` and notes about ignored fields.

    From the registry's declarations (:func:`samkit.optim.registry.optimizer_options`):
    ``momentum`` goes only to a base optimizer that declares it (SGD); ``rho`` and ``eta`` only
    to optimizers that declare them (so one config can be trained with sgd, sam and asam);
    ``num_examples``, the size of the training set, goes as ``num_data`` to an optimizer that
    declares it (bSAM's N). ``config.optimizer_kwargs`` win over all of these.
    """
    from samkit.optim import registry

    name = config.optimizer.lower()
    try:
        registry.optimizer_info(name)
    except ValueError as err:
        import difflib

        close = difflib.get_close_matches(name, registry.list_optimizers(), n=3)
        if not close:
            raise
        raise ValueError(f"{err}; did you mean {' or '.join(close)}?") from None
    given = config.optimizer_kwargs
    ascent = given.get("ascent") if isinstance(given.get("ascent"), str) else None
    declared = registry.optimizer_options(name, base=config.base, ascent=ascent)
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    notes = []
    if "momentum" in declared["base"]:
        kwargs["momentum"] = config.momentum
    for key in ("rho", "eta"):
        value = getattr(config, key)
        if value is None:
            continue
        if any(key in declared[space] for space in ("ascent", "descent", "schedule")):
            kwargs[key] = value
        else:
            notes.append(f"{name} takes no {key}; {key}={value} is not used")
    if num_examples is not None and any("num_data" in keys for keys in declared.values()):
        kwargs["num_data"] = num_examples
    kwargs.update(given)
    return kwargs, notes


def build_optimizer(cfg: TrainConfig, model: nn.Module, schedule: Any, num_examples: int
                    ) -> tuple[torch.optim.Optimizer, Any, list[str]]:
    """The optimizer of ``cfg`` on ``model`` (for a training set of ``num_examples``), its
    ``LambdaLR`` over ``schedule`` and the notes about the config's fields it does not use."""
    kwargs, notes = optimizer_kwargs(cfg, num_examples)
    optimizer = create_optimizer(cfg.optimizer, model, base=cfg.base,
                                 decay_bias_and_norm=cfg.decay_bias_and_norm, **kwargs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), notes


def build_engine(cfg: TrainConfig, optimizer: torch.optim.Optimizer, model: nn.Module,
                 task: Any, device: torch.device, world_size: int, batch_size: int
                 ) -> tuple[StepEngine, list[str]]:
    """The step engine: DDP (the forward passes go through the wrapped model), micro-batches,
    mixed precision, the task's loss and the per-example losses a variant asks for; and a note
    when a variant's data selection cannot have them."""
    from samkit.train.ddp import wrap

    cuda = device.type == "cuda"
    engine = StepEngine(
        optimizer, wrap(model, device, world_size), task.loss,
        grad_accum=cfg.grad_accum,
        scaler=torch.amp.GradScaler("cuda", enabled=cfg.amp and cuda) if cuda else None,
        autocast=(torch.float16 if cuda else torch.bfloat16) if cfg.amp else None,
        perturbation=cfg.perturbation if world_size > 1 else "synced",
        example_loss_fn=task.example_losses,
    )
    why = engine.example_losses_unavailable(batch_size)
    notes = [] if why is None else [
        f"{type(optimizer).__name__}'s data selection is off ({why}); this run uses its "
        "weight perturbation only"]
    return engine, notes


def glorot_normal_(model: torch.nn.Module) -> torch.nn.Module:
    r"""Glorot-normal weights :math:`\mathcal N(0, 2/(\text{fan}_\text{in} +
    \text{fan}_\text{out}))` for every linear and convolutional layer, zero biases (flax's
    ``Dense(kernel_init=glorot_normal())``, Long & Bartlett's). Seeded by the caller.

    References:
        X. Glorot, Y. Bengio. Understanding the difficulty of training deep feedforward neural
        networks. AISTATS 2010.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            torch.nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return model
