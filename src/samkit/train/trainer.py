"""The training loop: any registry optimizer, the SAM two-pass protocol, exact resume.

>>> from samkit.train import TrainConfig, Trainer
>>> cfg = TrainConfig(dataset="digits", model="mlp", optimizer="asam", rho=0.5, epochs=5)
>>> record = Trainer(cfg).fit()          # runs/digits-mlp-asam-s0/{config.yaml,metrics.jsonl}
>>> record["test_acc"]

The loop is a loop over the step engine (:mod:`samkit.step`) with a *task* (the loss, the
metric of a step, the evaluation: :mod:`samkit.train.task`; classification by default) and a
*loader* (the batches of an epoch: :mod:`samkit.train.loader`; minibatches, or the full
batch). The run folder (lock, ``run.json``, ``metrics.jsonl``, the checkpoint) is
:mod:`samkit.train.runfiles`'s; ``Trainer(..., write=False)`` trains without one.

Weights: an optimizer that holds :math:`w + ε` between steps (MSAM, see
:mod:`samkit.optim.onepass`) is moved to :math:`w` (``at_weights``) for every evaluation, every
checkpoint and the end-of-epoch and end-of-training callbacks, and left at :math:`w` when
``fit`` returns (``trainer.model`` holds the trained weights).

Reproducibility: the data order of epoch ``e`` and the augmentation of step ``t`` come from
generators seeded by ``(seed, e)`` and ``(seed, t)``; the global RNGs (dropout) are saved in the
checkpoint. So a resumed run, from an epoch boundary or from an interrupted step, takes the
very same steps as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from samkit.config import TrainConfig, check_threads, resolved_dict
from samkit.step import StepEngine
from samkit.train import ddp, runfiles
from samkit.train.build import build_engine, build_model, build_optimizer
from samkit.train.callbacks import Callback, TrainState, edge_tracker
from samkit.train.checkpoint import WriteFailed
from samkit.train.data import check_data_dir, config_data, data_folder
from samkit.train.ddp import resolve_device
from samkit.train.loader import _SHUFFLE as _SHUFFLE  # re-exported (older imports)
from samkit.train.loader import Minibatch, for_step
from samkit.train.loader import derive_seed as derive_seed
from samkit.train.loadrun import ConfigMismatchWarning as ConfigMismatchWarning
from samkit.train.loadrun import load_run as load_run
from samkit.train.logs import Progress, check_tensorboard
from samkit.train.plan import check_loss_term_switches_on as check_loss_term_switches_on
from samkit.train.plan import plan
from samkit.train.records import add_sums, epoch_record, grad_norm
from samkit.train.runfiles import CHECKPOINT, RunFiles
from samkit.train.schedule import LRSchedule
from samkit.train.stops import (
    DivergenceWatch,
    TrainingDiverged,
    TrainingInterrupted,
    TrainingStopped,
    install_signals,
    signal_name,
)
from samkit.train.task import Classification, Task
from samkit.train.task import classification_loss as classification_loss


class Trainer:
    """Trains ``config.model`` on ``config.dataset`` with ``config.optimizer``.

    Args:
        config: the run's :class:`TrainConfig`.
        callbacks: :class:`Callback` objects (e.g. an edge-of-stability tracker).
        resume: continue from ``runs/<name>/checkpoint.pt`` (error if there is none).
        overwrite: start afresh even if the run directory holds a run (its files are replaced).
        model: use this model instead of ``samkit.models.create_model(config.model, ...)``.
        data: ``(train, test)`` splits (``samkit.data.DataSplit``: ``x``, ``y``,
            ``num_classes``) instead of the config's data set; a ``test`` of None: no evaluation.
        verbose: 0 silent, 1 a line per epoch, 2 also a line every ``log_every`` steps (off a
            terminal; a terminal gets a progress bar).
        prefix: put before every printed line (``samkit compare`` labels its runs with it).
        outputs: names the caller writes in the run folder besides the run's own files (e.g.
            ``samkit correlate``'s ``measures.json``); ``--overwrite`` replaces them with it.
        task: loss, metric and evaluation (:mod:`samkit.train.task`); default
            ``Classification(config.label_smoothing)``.
        loader: the batches of an epoch (:mod:`samkit.train.loader`); default ``Minibatch``
            of ``config.batch_size`` shuffled from ``(config.seed, epoch)``.
        write: False: no run folder (no lock, config, metrics, checkpoint; ``samkit eos``).
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
        outputs: tuple[str, ...] = (),
        task: Task | None = None,
        loader: Minibatch | None = None,
        write: bool = True,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"Invalid config: {type(config).__name__} (allowed: a TrainConfig)")
        if resume and not write:
            raise ValueError("Invalid resume: a run without a folder (write=False) has no "
                             "checkpoint to resume")
        # what the run is (fixed at construction)
        self.config = config
        self.callbacks = list(callbacks)
        if config.edge_every is not None:  # λ₁ against the edge, every edge_every steps
            self.callbacks.append(edge_tracker(config.edge_every))
        self.task = task if task is not None else Classification(config.label_smoothing)
        self.loader = loader if loader is not None else Minibatch(
            drop_last=config.drop_last, seed=config.seed)
        self.resume = resume
        self.progress = Progress(verbose, prefix)
        self.run_dir: Path = config.run_dir
        self.files = RunFiles(self.run_dir, outputs, overwrite, resume) if write else None
        self._given: tuple[nn.Module | None, tuple[Any, Any] | None] = (model, data)
        # built by setup()
        self.device: torch.device | None = None
        self.rank, self.world_size = 0, 1  # DDP under torchrun
        self._owns_process_group = False
        self.train_data: Any = None
        self.test_data: Any = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.engine: StepEngine | None = None  # how each step is taken (samkit.step)
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.notes: list[str] = []
        self.batch_size = self.steps_per_epoch = self.total_steps = self.num_epochs = 0
        # where the run is (saved in the checkpoint)
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # the current epoch (0-based)
        self.batch: tuple[Tensor, Tensor] | None = None  # the current (x, y), for callbacks
        self._start = (0, 0)  # (epoch, batch) the loop starts from (a resumed position)
        self._epoch_sums: dict[str, float] = {}
        self.train_time = 0.0
        self.last_record: dict[str, Any] | None = None
        self.stopped = False  # True when the run ended before its budget (request_stop)
        self.diverged: dict[str, Any] | None = None  # the `diverged` record, when it diverged
        self.signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run
        self.data_path: str | None = None  # the folder the data were read from (None: built in)
        self._stop_requested = False
        self._interrupted = False
        self._watch = DivergenceWatch()  # the first step with a non-finite loss
        self.state = TrainState(self)  # what callbacks see

    checkpoint_path = property(lambda self: self.run_dir / CHECKPOINT)

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Build data, model, optimizer, schedule and log files (``fit`` calls it)."""
        cfg = self.config
        # 1. where, and the seeds: everything random below derives from cfg.seed / cfg.data_seed
        self.device = resolve_device(cfg.device)
        self._owns_process_group, self.rank, self.world_size, self.device = ddp.join(self.device)
        if self.rank != 0:  # rank 0 prints and writes; the others stay quiet
            self.progress = Progress(0, "")
        if self.files is not None:
            self.files.claim(self.rank)
        saved_state = None
        if self.resume:  # read it first: a corrupt checkpoint fails before anything loads
            saved_state, cfg, notes = runfiles.read_checkpoint(self.checkpoint_path, cfg,
                                                               self.device)
            self.config = cfg
            self.notes += notes
        if cfg.tensorboard and self.files is not None:
            check_tensorboard()  # fail now, not after the first epoch
        given_model, given_data = self._given
        if given_data is None:
            check_data_dir(cfg)
        torch.manual_seed(cfg.seed)

        # 2. data: held on the device as tensors (subset and label noise seeded by data_seed)
        if given_data is not None:
            self.train_data, self.test_data = given_data
        else:
            self.train_data, self.test_data = config_data(cfg, self.device)
            self.data_path = data_folder(cfg.dataset, cfg.data_dir)
        p = plan(cfg, len(self.train_data.y), self.loader, self.world_size)
        self.batch_size, self.steps_per_epoch = p.batch_size, p.steps_per_epoch
        self.total_steps, self.num_epochs = p.total_steps, p.num_epochs

        # 3. model, initialized from cfg.seed
        self.model = (given_model if given_model is not None
                      else build_model(cfg, self.train_data)).to(self.device)

        # 4. optimizer (from the registry), per-step LR schedule, and the step engine
        #    (samkit.step: DDP, micro-batches, mixed precision; self.model stays the plain module)
        self.optimizer, self.scheduler, notes = build_optimizer(
            cfg, self.model, self._make_schedule(), len(self.train_data.y))
        self.engine, more = build_engine(cfg, self.optimizer, self.model, self.task,
                                         self.device, self.world_size, self.batch_size)
        self.notes += notes + more

        # 5. the run directory: resolved config, metrics, the checkpoint to resume from (under
        #    DDP every rank loads the checkpoint; only rank 0 writes files)
        files = self.files if self.rank == 0 else None
        if files is not None:
            files.start(self.notes)  # --overwrite: the old run goes only now
            if saved_state is not None:
                files.check_config_yaml(saved_state["config"], self.notes)
        if saved_state is not None:
            runfiles.restore(self, saved_state, self.checkpoint_path)
        if files is not None:
            files.open(cfg, self.step if self.resume else None, self.data_path)
        for note in self.notes:
            self.progress.line(f"note: {note}")
        if self.data_path is not None:
            self.progress.line(f"data: {cfg.dataset} from {self.data_path}")

    def _make_schedule(self) -> LRSchedule:
        cfg = self.config
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        return LRSchedule(cfg.lr_schedule, self.total_steps, warmup, cfg.milestones, cfg.gamma)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end of the budget (or a stop); returns the last epoch's record.

        Ctrl-C finishes the current step, saves a checkpoint and raises ``KeyboardInterrupt``
        (a second Ctrl-C aborts at once); ``trainer.request_stop()`` does the same but returns.
        """
        threads = torch.get_num_threads()
        if check_threads(self.config.threads) is not None:  # at most the CPUs: a clear error
            torch.set_num_threads(self.config.threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)
            if self.files is not None:
                self.files.release()
            if self._owns_process_group:
                ddp.destroy()
                self._owns_process_group = False

    def _fit(self) -> dict[str, Any]:
        try:
            self.setup()
        except WriteFailed as err:  # config.yaml, run.json, metrics.jsonl (a full disk)
            raise WriteFailed(f"{err}; {self._kept()}") from err
        restore = self._install_signals()
        status = "failed"
        try:
            self._call("on_train_start")
            self._loop()
            self._release_weights()  # the model at w for what follows (and the caller)
            status = "finished"
            # while metrics.jsonl is open: what a callback logs at the end is kept (the edge
            # tracker's row at the final weights)
            self._call("on_train_end", self.last_record or {})
            if self._writer is not None:
                self._writer.write_hparams(resolved_dict(self.config), self.last_record or {})
        except TrainingStopped:
            self.stopped = True
            status = "interrupted" if self._interrupted else "stopped"
        except TrainingDiverged:
            status = "diverged"
            raise
        except WriteFailed as err:  # a full disk: say what is kept (the old checkpoint is whole)
            status = "write failed"
            raise WriteFailed(f"{err}; {self._kept()}") from err
        finally:
            restore()
            self._release_weights()
            self.progress.close()
            if self.files is not None:  # metrics.jsonl closed, run.json says how it ended
                self.files.close(status, self.config.run_name, self.step, self.data_path,
                                 self.diverged, self.rank == 0)
        if self._interrupted:
            raise TrainingInterrupted(
                f"training interrupted; checkpoint: {self.checkpoint_path}",
                self.signal or signal.SIGINT)
        return self.last_record or {}

    _writer = property(lambda self: None if self.files is None else self.files.writer)

    def _at_weights(self):
        """The model at its weights ``w`` within the block (:func:`samkit.optim.at_weights`)."""
        from samkit.optim.onepass import at_weights

        return at_weights(self.optimizer)

    def _release_weights(self) -> None:
        """Leave the model at ``w`` (an optimizer holding ``w + ε`` moves back for good)."""
        if getattr(self.optimizer, "weights_perturbed", False):
            self.optimizer.restore()

    def _kept(self) -> str:  # what a failed run leaves to resume from, in words
        return "nothing is kept" if self.files is None else self.files.kept()

    def _loop(self) -> None:
        cfg = self.config
        cuda = self.device.type == "cuda"
        augmented = cfg.augment and self.train_data.x.ndim == 4
        generator = torch.Generator()  # CPU generator: the same numbers on every device
        first_pass = [cb.on_first_pass for cb in self.callbacks if hasattr(cb, "on_first_pass")]
        start_epoch, start_batch = self._start
        for epoch in range(start_epoch, self.num_epochs):
            if self.step >= self.total_steps:
                break
            self.epoch = epoch
            skip = start_batch if epoch == start_epoch else 0
            if skip == 0:
                self._epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
            sums = self._epoch_sums
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
            count = 0
            self._call("on_epoch_start", epoch)
            left = self.total_steps - epoch * self.steps_per_epoch
            self.progress.start_epoch(
                epoch, self.num_epochs, min(self.steps_per_epoch, left), initial=skip
            )
            self.model.train()
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()

            # 6. one epoch: the loader's batches (their order depends only on (seed, epoch));
            #    the examples' indices only when the optimizer asks for them (samkit.step)
            wants_indices = "indices" in self.engine.batch_needs
            batches = self.loader.batches(self.train_data, epoch, generator, wants_indices)
            for index, batch in enumerate(islice(batches, skip, None), start=skip):
                if self.step >= self.total_steps:
                    break
                # 6a. augmentation on the device, seeded by (seed, step); 6b. DDP: this rank's
                #     slice of the global batch (the same on every rank)
                global_examples = len(batch[1])
                x, y, idx = for_step(batch, self.step, cfg.seed, augmented, generator,
                                     self.rank, self.world_size)
                self.batch = (x, y)
                self._call("on_step_start", self.step)

                # 6c. the step (samkit.step): the closure's passes over the micro-batches, as
                #     many as the optimizer runs, then the AMP scale update; the first pass's
                #     predictions are counted (the task's metric)
                hits: list[Tensor] = []
                options: dict[str, Any] = {}
                if first_pass:  # callbacks that see the first pass's loss and gradient
                    options["after_first_pass"] = lambda loss, step=self.step: [
                        hook(self.state, step, loss) for hook in first_pass]
                batch_loss = self.engine.step(
                    x, y, global_examples=global_examples if self.world_size > 1 else None,
                    observe=lambda out, t, hits=hits: hits.append(self.task.correct(out, t)),
                    indices=idx, epoch=epoch, num_examples=len(self.train_data.y), **options,
                )
                # 6d. bookkeeping: LR schedule, gradients cleared for the next step (with
                #     TensorBoard, the per-step loss, lr and ‖g‖ of the step's gradient first)
                if self._writer is not None and self._writer.tensorboard:
                    self._writer.write_step(self.step + 1, float(batch_loss),
                                            self.optimizer.param_groups[0]["lr"],
                                            grad_norm(self.model))
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1

                # 6e. running epoch statistics stay on the device (no sync per step)
                n = y.numel()  # examples, or tokens for a language model
                loss_sum += batch_loss.double() * n
                for hit in hits:
                    correct += hit
                count += n
                self._call("on_step_end", self.step, batch_loss)
                log_now = self.step % cfg.log_every == 0
                if log_now and self.world_size > 1:  # the mean over the ranks; agree on stops
                    batch_loss, self._stop_requested = ddp.reduce_step(
                        batch_loss, self._stop_requested, self.world_size)
                self._check_finite(batch_loss, log_now or not cuda, epoch)
                loss_value = float(batch_loss) if log_now else None
                lr = self.optimizer.param_groups[0]["lr"]
                if log_now:
                    self.log({"event": "step", "step": self.step, "epoch": epoch,
                              "lr": lr, "loss": loss_value})
                self.progress.step(self.step, loss_value, lr)
                if self._stop_requested and (log_now or self.world_size == 1):
                    # A clean stop between two steps (under DDP: at a log step, all ranks
                    # together): save where we are and leave (never a diverged state).
                    self._check_finite(batch_loss, True, epoch)
                    self._epoch_sums = self._add_sums(sums, loss_sum, correct, count, t0, cuda)
                    self._save(epoch, index + 1)
                    raise TrainingStopped

            # 7. end of epoch: evaluate, log, checkpoint
            if self.world_size > 1:
                _, self._stop_requested = ddp.reduce_step(
                    loss_sum.new_zeros(()), self._stop_requested, self.world_size)
            self._check_finite(loss_sum, True, epoch, weights=True)
            sums = self._add_sums(sums, loss_sum, correct, count, t0, cuda)
            with self._at_weights():  # evaluation and the epoch's callbacks at w
                record = self._epoch_record(epoch, sums)
                self._call("on_epoch_end", epoch, record)
            self.last_record = record
            self.log(record)
            self.progress.end_epoch(record)
            last = epoch + 1 == self.num_epochs or self.step >= self.total_steps
            if last or self._stop_requested or (epoch + 1) % cfg.checkpoint_every == 0:
                self._save(epoch + 1, 0)
            if self._stop_requested:
                raise TrainingStopped

    def _save(self, epoch: int, batch: int) -> None:
        """Checkpoint the position ``(epoch, batch)``: the next batch to take."""
        if not self.config.checkpoint and not self._stop_requested:
            return
        with self._at_weights():  # the model saved at w (the optimizer keeps w + ε exact)
            runfiles.save(self, epoch, batch)

    def _check_finite(self, loss: Tensor, now: bool, epoch: int, weights: bool = False) -> None:
        """Stop the run (:class:`TrainingDiverged`, a ``diverged`` record logged) once the loss
        or the weights are not finite (:class:`~samkit.train.stops.DivergenceWatch`)."""
        record = self._watch.check(self, loss, now, epoch, weights)
        if record is not None:
            self.diverged = record
            self.log(record)
            raise TrainingDiverged(record["message"], record)

    def _call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` of every callback with the run's TrainState."""
        for cb in self.callbacks:
            getattr(cb, hook)(self.state, *args)

    @property
    def loss_fn(self):
        """The training loss ``loss_fn(logits, y)`` (mean over the batch)."""
        return None if self.engine is None else self.engine.loss_fn

    def _add_sums(self, sums, loss_sum, correct, count, t0, cuda) -> dict[str, float]:
        sums, self.train_time = add_sums(sums, loss_sum, correct, count, t0, self.train_time,
                                         self.device if cuda else None, self.world_size)
        return sums

    def _epoch_record(self, epoch: int, sums: dict[str, float]) -> dict[str, Any]:
        last = epoch + 1 == self.num_epochs or self.step >= self.total_steps
        evaluate = self.test_data is not None and (
            (epoch + 1) % self.config.eval_every == 0 or last)
        return epoch_record(epoch, self.num_epochs, self.step,
                            self.optimizer.param_groups[0]["lr"], sums, self.train_time,
                            self.evaluate(self.test_data) if evaluate else None)

    def evaluate(self, split: Any) -> tuple[float, float]:
        """The task's loss and accuracy of the model on ``split`` (classification: mean
        cross-entropy without label smoothing, :func:`samkit.measures.evaluate`), under the
        run's autocast; at the weights ``w``, :func:`samkit.optim.at_weights`)."""
        with self._at_weights():
            autocast = self.engine.autocast_context
            return self.task.evaluate(self.model, split, self.config.eval_batch_size,
                                      self.device, lambda: autocast(self.device))

    # ------------------------------------------------------------------ logging and stopping

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl (and TensorBoard); callbacks may use it."""
        if self._writer is not None:
            self._writer.write(record)

    def request_stop(self) -> None:
        """Stop after the current step, with a resumable checkpoint; ``fit`` then returns."""
        self._stop_requested = True

    def _install_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM: finish the step, save a checkpoint, stop; a second
        signal aborts at once (:func:`~samkit.train.stops.install_signals`)."""
        return install_signals(self._on_signal, lambda: self._interrupted)

    def _on_signal(self, signum: int) -> None:
        self._interrupted = self._stop_requested = True
        self.signal = signum
        self.progress.line(f"{signal_name(signum)}: stopping after this step with a checkpoint "
                           "(again to abort)")


def train(config: TrainConfig, callbacks: Iterable[Callback] = (), **kwargs: Any) -> dict:
    """``Trainer(config, callbacks, **kwargs).fit()``: train and return the last record."""
    return Trainer(config, callbacks, **kwargs).fit()
