"""One run of ``samkit eos``: a :class:`~samkit.train.Trainer` (the experiment's task and
loader, no run folder of its own) with the experiment's :class:`~samkit.train.edge.EdgeTracker`
and a callback that logs the loss and ‖g‖ of every step (``train.jsonl``)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from samkit.config import TrainConfig
from samkit.experiments import base as experiment
from samkit.experiments.eos_report import summarize
from samkit.train.callbacks import Callback
from samkit.train.checkpoint import atomic_write_text
from samkit.train.edge import EdgeTracker
from samkit.train.stops import TrainingDiverged

if TYPE_CHECKING:
    from samkit.experiments.eos import EOSConfig


@dataclass(frozen=True)
class RunSpec:
    """One training run of the experiment."""

    label: str  # gd-lr0.1, sam-lr0.1-rho0.05
    optimizer: str  # sgd, sam or usam
    lr: float
    rho: float | None
    momentum: float = 0.0  # heavy-ball momentum of the base SGD (Adam: β₁)


@dataclass
class RunResult:
    spec: RunSpec
    rows: list[dict[str, Any]]  # tracker rows
    train: list[dict[str, Any]]  # per-step loss and gradient norm
    diverged: bool
    seconds: float
    tracker_seconds: float
    matvecs: int
    summary: dict[str, Any] = field(default_factory=dict)


def train_config(config: EOSConfig, spec: RunSpec, n: int) -> TrainConfig:
    """The :class:`~samkit.config.TrainConfig` of one run: the experiment's data and model, the
    run's optimizer with a constant step size and no weight decay, ``config.steps`` steps of
    the full batch (or of minibatches, the last short one dropped), nothing written."""
    extra: dict[str, Any] = {}
    rho = spec.rho
    if spec.optimizer == "adam":  # full-batch Adam (Cohen et al. 2022): β₂ 0.999, ε 1e-8
        extra, rho = {"betas": (spec.momentum, 0.999), "eps": 1e-8}, None
    elif spec.optimizer == "gsam" and rho is not None:  # a constant ρ_t = ρ
        extra, rho = {"rho_max": rho, "rho_min": rho}, None
    from samkit.experiments.eos import default_model_kwargs

    batch = 0 if config.batch_size == 0 else min(config.batch_size, n)
    return TrainConfig(
        dataset="text" if config.is_text else config.dataset, data_dir=config.data_dir,
        subset=config.subset, data_seed=config.data_seed, augment=False,
        model=config.model_name, model_kwargs=default_model_kwargs(config),
        optimizer=spec.optimizer, lr=spec.lr, momentum=spec.momentum, weight_decay=0.0,
        rho=rho, optimizer_kwargs=extra, steps=config.steps, batch_size=batch, drop_last=True,
        lr_schedule="constant", warmup_epochs=0.0, seed=config.seed, device=config.device,
        threads=config.threads, checkpoint=False, name=spec.label, out_dir=str(config.run_dir),
    )


class _Tracker(EdgeTracker):
    """The run's :class:`EdgeTracker`: at w_t, before step t (so ‖g‖ is the one step t
    normalizes by), on the probe set with the step's minibatch for the SAM-edge's ‖g‖, or all
    on the step's minibatch (``measure_on="batch"``); at the final weights with the batch the
    next step would take. Prints each row."""

    def __init__(self, *args: Any, on_batch: bool, batch_of: Any, lr: float, steps: int,
                 verbose: int, prefix: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_batch, self.batch_of, self.lr, self.steps = on_batch, batch_of, lr, steps
        self.show, self.prefix = verbose, prefix  # (EdgeTracker's verbose is its own)
        self.last_print = time.perf_counter()

    def measure(self, step: int, model: Any, optimizer: Any, batch: Any) -> None:
        if self.on_batch:
            row = self.maybe_record(step, model, optimizer, probe=batch)
        else:
            row = self.maybe_record(step, model, optimizer, batch=batch)
        if row is not None and self.show:
            now = time.perf_counter()
            if row.get("diverged"):
                print(f"{self.prefix}step {step:>5d}  diverged", flush=True)
            else:
                edge = f"{row['edge']:.2f}" if row.get("edge") is not None else "-"
                ratio = f"{row['ratio']:.3f}" if row.get("ratio") is not None else "-"
                print(f"{self.prefix}step {step:>5d}/{self.steps}  loss {row['loss']:.4f}  "
                      f"|g| {row['grad_norm']:.4f}  lambda1 {row['lambda1']:.2f}  edge {edge}  "
                      f"ratio {ratio}  2/lr {2 / self.lr:.2f}  ({now - self.last_print:.1f} s)",
                      flush=True)
            self.last_print = now
        if row is not None and row.get("diverged"):
            raise _Diverged

    def on_step_start(self, state: Any, step: int) -> None:
        self.measure(step, state.model, state.optimizer, self.batch_of(step, state.batch))

    def on_epoch_end(self, state: Any, epoch: int, metrics: dict[str, Any]) -> None:
        pass  # measured before each step and at the end

    def on_train_end(self, state: Any, metrics: dict[str, Any]) -> None:
        self.measure(state.step, state.model, state.optimizer, self.batch_of(state.step))


class _StepRows(Callback):
    """The loss and ‖g‖ at w of every step, from its first pass (before the optimizer uses
    them); a non-finite one ends the run without stepping."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_first_pass(self, state: Any, step: int, loss: Tensor) -> None:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))
        loss_value, grad_value = float(loss), float(grad_norm)
        self.rows.append({"step": step, "loss": loss_value, "grad_norm": grad_value})
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            raise _Diverged


def train_run(
    config: EOSConfig, spec: RunSpec, train, run_dir: Path, device: torch.device,
    verbose: int = 1, prefix: str = "",
) -> RunResult:
    """Train one run from the shared initialization (a :class:`~samkit.train.Trainer` with the
    experiment's task and loader, writing no run folder of its own), tracking λ₁ every
    ``config.every`` steps (within ``config.budget``)."""
    from samkit.experiments.eos import build_model
    from samkit.train import Trainer
    from samkit.train.loader import FullBatch, Minibatch
    from samkit.train.task import task_for

    run_dir.mkdir(parents=True, exist_ok=True)
    task = task_for("ce", text=True) if config.is_text else task_for(config.loss)
    # 1. the batches (the whole training subset, or minibatches of one seeded stream of
    #    permutations) and the probe set (the whole subset, or fixed examples)
    n = len(train.y)
    batch_size = n if config.batch_size == 0 else min(config.batch_size, n)
    full_batch = batch_size == n
    if full_batch:
        loader, probe = FullBatch(), (train.x, train.y)
    else:
        loader = Minibatch(batch_size, drop_last=True, seed=config.seed, stream=True)
        gen = torch.Generator().manual_seed(config.seed + 1)
        idx = torch.randperm(n, generator=gen)[: config.probe_size].to(train.y.device)
        probe = (train.x[idx], train.y[idx])

    def batch_of(step: int, current: Any = None) -> Any:
        """The batch of step ``step`` (None in full-batch runs: the probe set is the data)."""
        if full_batch:
            return None
        if current is not None:
            return current
        per_epoch = n // batch_size
        x, y, _ = next(islice(loader.batches(train, step // per_epoch, torch.Generator()),
                              step % per_epoch, None))
        return x, y

    # 2. the tracker (a GD baseline records the alignment of the SAM gradient with the first
    #    rho) and the per-step rows, as callbacks of the Trainer
    rho_for_gd = config.rhos[0] if config.rhos else None
    tracker = _Tracker(probe, task.loss, every=config.every, path=run_dir / "edge.jsonl",
                       rho=spec.rho if spec.rho is not None else rho_for_gd, tol=config.tol,
                       k=config.k, seed=config.seed, budget=config.budget,
                       on_batch=not full_batch and config.measure_on == "batch",
                       batch_of=batch_of, lr=spec.lr, steps=config.steps, verbose=verbose,
                       prefix=prefix)
    steps = _StepRows()
    trainer = Trainer(train_config(config, spec, n), [tracker, steps],
                      model=build_model(config, train, device), data=(train, None), verbose=0,
                      task=task, loader=loader, write=False)
    diverged = False
    start = time.perf_counter()
    try:
        trainer.fit()
    except _Diverged:
        diverged = True
    except TrainingDiverged:  # weights not finite after a step: what the next row sees
        diverged = True
        with contextlib.suppress(_Diverged):
            tracker.measure(trainer.step, trainer.model, trainer.optimizer,
                            batch_of(trainer.step))
    seconds = time.perf_counter() - start
    atomic_write_text(run_dir / "train.jsonl",
                      "".join(experiment.strict_dumps(r) + "\n" for r in steps.rows))
    result = RunResult(spec, list(tracker.rows), steps.rows, diverged, seconds,
                       tracker.seconds, tracker.matvecs)
    result.summary = summarize(result, config.steps)
    if verbose:
        print(f"{prefix}done in {seconds:.1f} s; {tracker.cost_summary()} "
              f"({100 * tracker.seconds / max(seconds, 1e-9):.0f}% of the run)", flush=True)
    return result


class _Diverged(Exception):  # noqa: N818 - not an error: a run that diverged ends early
    """Raised from the step's closure when the first pass is non-finite, or from the tracker
    when the loss at w_t is."""
