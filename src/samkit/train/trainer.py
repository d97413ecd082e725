"""The training loop: any registry optimizer, the SAM two-pass protocol, exact resume.

>>> from samkit.train import TrainConfig, Trainer
>>> cfg = TrainConfig(dataset="digits", model="mlp", optimizer="asam", rho=0.5, epochs=5)
>>> record = Trainer(cfg).fit()          # runs/digits-mlp-asam-s0/{config.yaml,metrics.jsonl}
>>> record["test_acc"]

Reproducibility: the data order of epoch ``e`` and the augmentation of step ``t`` come from
generators seeded by ``(seed, e)`` and ``(seed, t)``; the global RNGs (dropout) are saved in the
checkpoint. So a resumed run, from an epoch boundary or from an interrupted step, takes the
very same steps as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.config import (
    TrainConfig,
    resolved_dict,
    save_config,
    steps_per_epoch,
    total_steps,
    upgrade_keys,
)
from samkit.optim import ESAM, SharpnessAwareOptimizer, create_optimizer, disable_running_stats
from samkit.train.callbacks import Callback
from samkit.train.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from samkit.train.logs import MetricsWriter, Progress, check_tensorboard, read_metrics
from samkit.train.schedule import LRSchedule

CHECKPOINT = "checkpoint.pt"
# Keys that may differ between a checkpoint's config and the config that resumes it.
RESUMABLE_CHANGES = (
    "epochs", "steps", "log_every", "eval_batch_size", "tensorboard", "checkpoint",
    "checkpoint_every", "data_dir", "device", "threads",
)


class TrainingStopped(Exception):  # noqa: N818 - not an error: a requested stop
    """Raised inside the loop to end it early; the trainer catches it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        allowed = "auto, cpu, cuda, cuda:N, mps"
        raise ValueError(f"Invalid device: {name!r} (allowed: {allowed})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r}: CUDA is not available here (use cpu or auto)")
    return device


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A distinct, reproducible 63-bit seed for each (seed, stream, index)."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + index) % (1 << 64)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) % (1 << 64)
    return x % (1 << 63)


_SHUFFLE, _AUGMENT = 1, 2


def classification_loss(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy; token logits ``N×T×V`` with targets ``N×T`` are flattened."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), label_smoothing=label_smoothing)


def example_losses(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-example cross-entropy, shape ``N`` (a sequence's is the mean over its tokens); their
    mean is :func:`classification_loss`."""
    per_target = F.cross_entropy(
        logits.flatten(0, -2), y.flatten(), reduction="none", label_smoothing=label_smoothing
    )
    return per_target.view(len(y), -1).mean(1)


def optimizer_kwargs(config: TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """The keyword arguments for ``create_optimizer`` and notes about ignored fields.

    ``momentum`` goes only to an SGD base; ``rho`` and ``eta`` only to optimizers that take them
    (so one config can be trained with sgd, sam and asam).
    """
    import inspect

    from samkit.optim import registry

    name = config.optimizer.lower()
    entry = registry.optimizer_info(name)
    base_cls = registry.base_optimizer_class(config.base or entry.base)
    base_keys = set(inspect.signature(base_cls).parameters)
    own_keys = entry.wrapper_keys()
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    notes = []
    if "momentum" in base_keys:
        kwargs["momentum"] = config.momentum
    for key in ("rho", "eta"):
        value = getattr(config, key)
        if value is None:
            continue
        if key in own_keys:
            kwargs[key] = value
        else:
            notes.append(f"{name} takes no {key}; {key}={value} is not used")
    kwargs.update(config.optimizer_kwargs)
    return kwargs, notes


class Trainer:
    """Trains ``config.model`` on ``config.dataset`` with ``config.optimizer``.

    Args:
        config: the run's :class:`TrainConfig`.
        callbacks: :class:`Callback` objects (e.g. an edge-of-stability tracker).
        resume: continue from ``runs/<name>/checkpoint.pt`` (error if there is none).
        overwrite: start afresh even if the run directory holds a run (its files are replaced).
        model: use this model instead of ``samkit.models.create_model(config.model, ...)``.
        data: ``(train, test)`` splits instead of ``samkit.data.load_dataset(config.dataset)``;
            objects with ``x``, ``y`` and ``num_classes`` (a ``samkit.data.DataSplit``).
        verbose: 0 silent, 1 a line per epoch, 2 also a line every ``log_every`` steps (when
            not on a terminal; a terminal gets a progress bar).
        prefix: put before every printed line (``samkit compare`` labels its runs with it).
    """

    def __init__(
        self,
        config: TrainConfig,
        callbacks: Iterable[Callback] = (),
        resume: bool = False,
        overwrite: bool = False,
        model: nn.Module | None = None,
        data: tuple[Any, Any] | None = None,
        verbose: int = 1,
        prefix: str = "",
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"Invalid config: {type(config).__name__} (allowed: a TrainConfig)")
        self.config = config
        self.callbacks = list(callbacks)
        self.resume = resume
        self.overwrite = overwrite
        self.verbose = verbose
        self.progress = Progress(verbose, prefix)
        self.run_dir = config.run_dir
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self._given_model = model
        self._given_data = data
        self.notes: list[str] = []
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # the current epoch (0-based)
        self.batch: tuple[Tensor, Tensor] | None = None  # the current (x, y), for callbacks
        self.stopped = False  # True when the run ended before its budget (request_stop)
        self.rank, self.world_size = 0, 1  # DDP under torchrun: set by setup()
        self._owns_process_group = False
        self._global_batch = 0  # examples in the current step's batch, over every rank
        self._stop_requested = False
        self._writer: MetricsWriter | None = None
        self.last_record: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up

    def _check_run_dir(self) -> None:
        exists = self.checkpoint_path.exists() or (self.run_dir / "metrics.jsonl").exists()
        if self.resume:
            if not self.checkpoint_path.exists():
                raise FileNotFoundError(
                    f"Cannot resume: no checkpoint at {self.checkpoint_path} (drop --resume to "
                    "start the run)"
                )
        elif exists and not self.overwrite:
            raise FileExistsError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, --overwrite "
                "to start it again, or choose another --name"
            )
        elif exists and self.rank == 0:
            for name in (CHECKPOINT, "metrics.jsonl", "tensorboard"):
                path = self.run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def setup(self) -> None:
        """Build data, model, optimizer, schedule and log files (``fit`` calls it)."""
        cfg = self.config
        # 1. where, and the seeds: everything random below derives from cfg.seed / cfg.data_seed
        self.device = resolve_device(cfg.device)
        self._setup_distributed()
        self._check_run_dir()
        if cfg.tensorboard:
            check_tensorboard()  # fail now, not after the first epoch
        torch.manual_seed(cfg.seed)

        # 2. data: held on the device as tensors (subset and label noise seeded by data_seed)
        if self._given_data is not None:
            self.train_data, self.test_data = self._given_data
        else:
            from samkit.data import load_dataset

            self.train_data, self.test_data = load_dataset(
                cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset, stratified=cfg.stratified,
                label_noise=cfg.label_noise, seed=cfg.data_seed, standardize=True,
                device=self.device,
            )
        n = len(self.train_data.y)
        self.batch_size, self.steps_per_epoch = steps_per_epoch(n, cfg.batch_size, cfg.drop_last)
        self.total_steps = total_steps(cfg, n)
        self.num_epochs = -(-self.total_steps // self.steps_per_epoch)
        if self.world_size > 1:
            self._check_batches_shard(n)

        # 3. model, initialized from cfg.seed
        if self._given_model is not None:
            self.model = self._given_model.to(self.device)
        else:
            from samkit.models import create_model

            torch.manual_seed(cfg.seed)
            self.model = create_model(
                cfg.model, tuple(self.train_data.x.shape[1:]), self.train_data.num_classes,
                **cfg.model_kwargs,
            ).to(self.device)

        # 4. optimizer (from the registry), per-step LR schedule, mixed precision, loss
        kwargs, self.notes = optimizer_kwargs(cfg)
        self.optimizer = create_optimizer(cfg.optimizer, self.model, base=cfg.base, **kwargs)
        self.sharpness_aware = isinstance(self.optimizer, SharpnessAwareOptimizer)
        # ESAM's sharpness-sensitive data selection: the second pass on the examples whose loss
        # rises most (one batch on one process; otherwise its weight perturbation only)
        self.selects_examples = isinstance(self.optimizer, ESAM) and self.optimizer.gamma < 1
        if self.selects_examples and (cfg.grad_accum > 1 or self.world_size > 1):
            self.selects_examples = False
            self.notes.append(
                "ESAM's data selection needs grad_accum=1 and one process; this run uses its "
                "weight perturbation only"
            )
        # DDP: the forward passes go through train_model; self.model stays the plain module
        self.train_model = self._wrap_ddp(self.model)
        self.schedule = self._make_schedule()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        cuda = self.device.type == "cuda"
        self.amp_dtype = (torch.float16 if cuda else torch.bfloat16) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and cuda) if cuda else None
        self.loss_fn = lambda logits, y: classification_loss(logits, y, cfg.label_smoothing)

        # 5. the run directory: resolved config, metrics, the checkpoint to resume from (under
        #    DDP every rank loads the checkpoint; only rank 0 writes files)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_epoch, self.start_batch = 0, 0
        self._epoch_sums: dict[str, float] = {}
        self.train_time = 0.0
        if self.resume:
            self._load(load_checkpoint(self.checkpoint_path, map_location=self.device))
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            self._writer = MetricsWriter(
                self.run_dir, cfg.tensorboard, resume_step=self.step if self.resume else None
            )
        for note in self.notes:
            self.progress.line(f"note: {note}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end of the budget (or a stop); returns the last epoch's record.

        Ctrl-C finishes the current step, saves a checkpoint and raises ``KeyboardInterrupt``
        (a second Ctrl-C aborts at once); ``trainer.request_stop()`` does the same but returns.
        """
        threads = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)
            if self._owns_process_group:
                import torch.distributed as dist

                dist.destroy_process_group()
                self._owns_process_group = False

    def _fit(self) -> dict[str, Any]:
        self.setup()
        restore = self._install_sigint()
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            self._loop()
        except TrainingStopped:
            self.stopped = True
        finally:
            restore()
            self.progress.close()
            if self._writer is not None:
                self._writer.close()
        if self._interrupted:
            raise KeyboardInterrupt(f"training interrupted; checkpoint: {self.checkpoint_path}")
        if not self.stopped:
            for cb in self.callbacks:
                cb.on_train_end(self, self.last_record or {})
        return self.last_record or {}

    def _loop(self) -> None:
        cfg = self.config
        opt = self.optimizer
        # DDP local mode: the first pass (forward and backward) is not all-reduced
        sync_first = not (self.sharpness_aware and cfg.perturbation == "local")
        cuda = self.device.type == "cuda"
        augment = cfg.augment and self.train_data.x.ndim == 4
        generator = torch.Generator()  # CPU generator: the same numbers on every device
        for epoch in range(self.start_epoch, self.num_epochs):
            if self.step >= self.total_steps:
                break
            self.epoch = epoch
            skip = self.start_batch if epoch == self.start_epoch else 0
            if skip == 0:
                self._epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
            sums = self._epoch_sums
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
            count = 0
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            left = self.total_steps - epoch * self.steps_per_epoch
            self.progress.start_epoch(
                epoch, self.num_epochs, min(self.steps_per_epoch, left), initial=skip
            )
            self.model.train()
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()

            # 6. one epoch: the order of its batches depends only on (seed, epoch)
            generator.manual_seed(derive_seed(cfg.seed, _SHUFFLE, epoch))
            full_batch = self.batch_size == len(self.train_data.y)  # no shuffle: one batch
            batches = _iterate(self.train_data, self.batch_size, None if full_batch else generator,
                               cfg.drop_last)
            for index, (x, y) in enumerate(islice(batches, skip, None), start=skip):
                if self.step >= self.total_steps:
                    break
                # 6a. augmentation on the device, seeded by (seed, step)
                if augment:
                    from samkit.data import augment_batch

                    generator.manual_seed(derive_seed(cfg.seed, _AUGMENT, self.step))
                    x = augment_batch(x, generator)
                # 6b. DDP: this rank's slice of the global batch (the same on every rank)
                self._global_batch = len(y)
                if self.world_size > 1:
                    from samkit.distributed import shard_batch

                    x, y = shard_batch(x, y, self.rank, self.world_size)
                self.batch = (x, y)
                micro = _micro_batches(x, y, cfg.grad_accum)

                # 6c. first pass at w: forward + backward over the micro-batches
                batch_loss, batch_correct = self._forward_backward(
                    micro, track=True, sync=sync_first
                )
                if self.sharpness_aware:
                    # 6d. ascend to w + eps (the gradients are cleared); False means the
                    #     optimizer chose a one-pass step (LookSAM, AE-SAM, RST) and has stepped
                    if opt.first_step(zero_grad=True, scaler=self.scaler):
                        # 6e. second pass at w + eps, BatchNorm running statistics untouched
                        #     (ESAM: only on the examples whose loss rose most)
                        with disable_running_stats(self.model):
                            if self.selects_examples and opt.selects_examples(len(y)):
                                micro = [self._sensitive_examples(x, y)]
                            self._forward_backward(micro, track=False)
                        # 6f. back to w; the base optimizer steps with the gradient at w + eps
                        opt.second_step(scaler=self.scaler)
                elif self.scaler is not None and self.scaler.is_enabled():
                    self.scaler.step(opt)
                else:
                    opt.step()
                # 6g. bookkeeping: AMP scale, LR schedule, gradients cleared for the next step
                if self.scaler is not None and self.scaler.is_enabled():
                    self.scaler.update()
                self.scheduler.step()
                opt.zero_grad(set_to_none=True)
                self.step += 1

                # 6h. running epoch statistics stay on the device (no sync per step)
                n = y.numel()  # examples, or tokens for a language model
                loss_sum += batch_loss.double() * n
                correct += batch_correct
                count += n
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, batch_loss)
                log_now = self.step % cfg.log_every == 0
                if log_now and self.world_size > 1:  # the mean over the ranks; agree on stops
                    batch_loss, self._stop_requested = self._reduce_step(batch_loss)
                loss_value = float(batch_loss) if log_now else None
                lr = opt.param_groups[0]["lr"]
                if log_now:
                    self.log({"event": "step", "step": self.step, "epoch": epoch,
                              "lr": lr, "loss": loss_value})
                self.progress.step(self.step, loss_value, lr)
                if self._stop_requested and (log_now or self.world_size == 1):
                    # A clean stop between two steps (under DDP: at a log step, all ranks
                    # together): save where we are and leave.
                    self._epoch_sums = self._add_sums(sums, loss_sum, correct, count, t0, cuda)
                    self._save(epoch, index + 1)
                    raise TrainingStopped

            # 7. end of epoch: evaluate, log, checkpoint
            if self.world_size > 1:
                _, self._stop_requested = self._reduce_step(loss_sum.new_zeros(()))
            sums = self._add_sums(sums, loss_sum, correct, count, t0, cuda)
            record = self._epoch_record(epoch, sums)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, record)
            self.last_record = record
            self.log(record)
            self.progress.end_epoch(record)
            last = epoch + 1 == self.num_epochs or self.step >= self.total_steps
            if last or self._stop_requested or (epoch + 1) % cfg.checkpoint_every == 0:
                self._save(epoch + 1, 0)
            if self._stop_requested:
                raise TrainingStopped

    def _sensitive_examples(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """ESAM's selection at w + eps: the batch's per-example losses are compared with those
        of the first pass (kept by ``_forward_backward``), one forward pass without gradient."""
        with torch.no_grad(), self._autocast():
            after = example_losses(self.train_model(x), y, self.config.label_smoothing)
        keep = self.optimizer.select_examples(self._first_pass_losses, after.float())
        return x[keep], y[keep]

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward_backward(
        self, micro: Sequence[tuple[Tensor, Tensor]], track: bool, sync: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Backward of the mean loss over the micro-batches (each weighted by its size).

        Returns the mean loss (detached) and, when ``track``, the number of correct predictions.
        Under DDP, a pass with ``sync`` all-reduces once, after its last micro-batch (the others
        run under ``no_sync()``), and weighs each rank's loss by its share of the global batch,
        so the all-reduced gradient is the global batch's; without ``sync`` (the first pass of
        ``perturbation: local``) nothing is all-reduced and the gradient is this rank's own.
        """
        from samkit.distributed import sync_context

        total = sum(len(y) for _, y in micro)
        ddp = self.world_size > 1
        mean = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for i, (x, y) in enumerate(micro):
            with sync_context(self.train_model, sync and i == len(micro) - 1):
                with self._autocast():
                    logits = self.train_model(x)
                    loss = self.loss_fn(logits, y)
                    # DDP averages over the ranks: weigh so the average is the global mean
                    share = (
                        len(y) * self.world_size / self._global_batch
                        if ddp and sync
                        else len(y) / total
                    )
                    weighted = loss * share
                scaled = self.scaler.scale(weighted) if self.scaler is not None else weighted
                scaled.backward()
            mean = mean + (weighted if not ddp else loss * (len(y) / total)).detach().float()
            if track:
                correct = correct + (logits.detach().argmax(-1) == y).sum()
                if self.selects_examples:  # the first pass, for ESAM's selection
                    self._first_pass_losses = example_losses(
                        logits.detach(), y, self.config.label_smoothing
                    ).float()
        return mean, correct

    def _add_sums(self, sums, loss_sum, correct, count, t0, cuda) -> dict[str, float]:
        if cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        self.train_time += elapsed
        if self.world_size > 1:  # the epoch's statistics over every rank's examples
            from samkit.distributed import all_reduce_sum

            packed = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(count))])
            loss_sum, correct, count = all_reduce_sum(packed).unbind()
            count = float(count)
        return {
            "loss": sums["loss"] + float(loss_sum),
            "correct": sums["correct"] + float(correct),
            "count": sums["count"] + count,
            "time": sums["time"] + elapsed,
        }

    def _epoch_record(self, epoch: int, sums: dict[str, float]) -> dict[str, Any]:
        count = max(sums["count"], 1)
        images = sums["count"]
        record: dict[str, Any] = {
            "event": "epoch",
            "epoch": epoch + 1,
            "epochs": self.num_epochs,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": sums["loss"] / count,
            "train_acc": sums["correct"] / count,
        }
        last = epoch + 1 == self.num_epochs or self.step >= self.total_steps
        if (epoch + 1) % self.config.eval_every == 0 or last:
            test_loss, test_acc = self.evaluate(self.test_data)
            record["test_loss"], record["test_acc"] = test_loss, test_acc
        record["epoch_time"] = sums["time"]
        record["images_per_s"] = images / sums["time"] if sums["time"] > 0 else math.nan
        record["train_time"] = self.train_time
        return record

    def evaluate(self, split: Any) -> tuple[float, float]:
        """Mean cross-entropy (no label smoothing) and accuracy of the model on ``split``
        (:func:`samkit.measures.evaluate`, under the run's autocast)."""
        from samkit.measures import evaluate

        return evaluate(self.model, split, self.config.eval_batch_size, self.device,
                        self._autocast)

    # ------------------------------------------------------------------ logging and stopping

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl (and TensorBoard); callbacks may use it."""
        if self._writer is not None:
            self._writer.write(record)

    def request_stop(self) -> None:
        """Stop after the current step, with a resumable checkpoint; ``fit`` then returns."""
        self._stop_requested = True

    _interrupted = False

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._interrupted:  # the second Ctrl-C: abort now
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._interrupted = True
            self._stop_requested = True
            self.progress.line("Ctrl-C: stopping after this step (press again to abort)")

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------------ checkpoints

    def _save(self, epoch: int, batch: int) -> None:
        """Checkpoint the position ``(epoch, batch)``: the next batch to take."""
        if not self.config.checkpoint and not self._stop_requested:
            return
        rngs = [rng_states()]
        if self.world_size > 1:  # every rank's RNG (dropout), for an exact resume
            import torch.distributed as dist

            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_states())
            if self.rank != 0:
                return
        state = {
            "version": 1,
            "config": resolved_dict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "batch": batch,
            "step": self.step,
            "epoch_sums": dict(self._epoch_sums) if batch else {},
            "train_time": self.train_time,
            "last_record": self.last_record,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "world_size": self.world_size,
            "callbacks": [
                cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks
            ],
        }
        save_checkpoint(state, self.checkpoint_path)

    # ------------------------------------------------------------------ DDP (torchrun)

    def _setup_distributed(self) -> None:
        """Join torchrun's process group (gloo on CPU, NCCL on CUDA) when launched by it."""
        from samkit import distributed

        self._owns_process_group = distributed.init_from_env(self.device.type)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if self.world_size > 1 and self.device.type == "cuda" and self.device.index is None:
            import os

            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        if self.rank != 0:  # rank 0 prints and writes; the others stay quiet
            self.progress = Progress(0, "")

    def _check_batches_shard(self, n: int) -> None:
        last = n % self.batch_size
        if self.batch_size < self.world_size or (
            not self.config.drop_last and 0 < last < self.world_size
        ):
            size = self.batch_size if self.batch_size < self.world_size else last
            raise ValueError(
                f"Invalid batch_size for {self.world_size} processes: a batch of {size} "
                "example(s) cannot give every rank one (use a larger batch_size, or "
                "drop_last=true)"
            )

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        from samkit.distributed import check_local_optimizer

        if self.config.perturbation == "local":
            check_local_optimizer(self.optimizer)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _reduce_step(self, loss: Tensor) -> tuple[Tensor, bool]:
        """One all-reduce: the mean of ``loss`` over the ranks, and whether any asks to stop."""
        from samkit.distributed import all_reduce_sum

        packed = torch.stack([loss.double(), loss.new_tensor(float(self._stop_requested)).double()])
        total, stops = all_reduce_sum(packed).unbind()
        return (total / self.world_size).to(loss.dtype), bool(stops > 0)

    def _make_schedule(self) -> LRSchedule:
        cfg = self.config
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        return LRSchedule(cfg.lr_schedule, self.total_steps, warmup, cfg.milestones, cfg.gamma)

    def _load(self, state: dict[str, Any]) -> None:
        saved = upgrade_keys(state["config"])  # checkpoints of older versions: older key names
        now = resolved_dict(self.config)
        changed = sorted(
            k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, now[k]) != now[k]
        )
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(
                f"Cannot resume {self.checkpoint_path}: the config differs in {diffs} (allowed "
                f"to change: {', '.join(RESUMABLE_CHANGES)}); use --overwrite or another --name"
            )
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise ValueError(
                f"Cannot resume {self.checkpoint_path}: it was saved by {saved_world} process(es) "
                f"and this run has {self.world_size} (resume with the same --nproc-per-node)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this config's budget (it may have been extended); loading the
        # state wrote the saved budget into the schedule objects, so make them anew.
        self.schedule = self._make_schedule()
        self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
        groups, base_lrs = self.optimizer.param_groups, self.scheduler.base_lrs
        for group, base_lr in zip(groups, base_lrs, strict=True):
            group["lr"] = base_lr * self.schedule(self.scheduler.last_epoch)
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_batch = state["epoch"], state["batch"]
        self.step = state["step"]
        self._epoch_sums = state.get("epoch_sums") or {}
        self.train_time = state.get("train_time", 0.0)
        self.last_record = state.get("last_record")
        set_rng_states(state.get("rng_per_rank", [state["rng"]])[self.rank])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", []), strict=False):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        if self.start_batch == 0:
            self._epoch_sums = {}
        self.progress.line(
            f"resumed {self.checkpoint_path} at epoch {self.start_epoch + 1}, step {self.step}"
        )
        if saved.get("epochs") != now["epochs"] or saved.get("steps") != now["steps"]:
            self.progress.line(f"note: budget changed, now {self.total_steps} steps")


def _iterate(split: Any, batch_size: int, generator: torch.Generator | None, drop_last: bool):
    from samkit.data import iterate_batches

    shuffle = generator is not None
    return iterate_batches(split, batch_size, shuffle, generator, drop_last=drop_last)


def _micro_batches(x: Tensor, y: Tensor, parts: int) -> list[tuple[Tensor, Tensor]]:
    if parts == 1:
        return [(x, y)]
    return [(xs, ys) for xs, ys in zip(x.tensor_split(parts), y.tensor_split(parts), strict=True)
            if len(ys)]


def train(config: TrainConfig, callbacks: Iterable[Callback] = (), **kwargs: Any) -> dict:
    """``Trainer(config, callbacks, **kwargs).fit()``: train and return the last record."""
    return Trainer(config, callbacks, **kwargs).fit()


def load_run(run_dir) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """The config and the metrics records of a finished (or running) run."""
    from pathlib import Path

    from samkit.train.config import load_config

    run_dir = Path(run_dir)
    return load_config(run_dir / "config.yaml"), read_metrics(run_dir / "metrics.jsonl")
