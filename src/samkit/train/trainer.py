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
import signal
import threading
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    check_threads,
    from_dict,
    legacy_values,
    resolved_dict,
    save_config,
    steps_per_epoch,
    total_steps,
    upgrade_keys,
)
from samkit.optim import create_optimizer
from samkit.step import StepEngine
from samkit.train.callbacks import Callback, TrainState
from samkit.train.checkpoint import (
    WriteFailed,
    load_checkpoint,
    remove_stale_temporaries,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from samkit.train.logs import MetricsWriter, Progress, check_tensorboard, read_metrics
from samkit.train.rundir import RunDir, strict_dumps, versions
from samkit.train.schedule import LRSchedule

CHECKPOINT = "checkpoint.pt"
# The files a training run writes in its directory (what --overwrite replaces).
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "tensorboard", "config.yaml", "run.json")


class TrainingStopped(Exception):  # noqa: N818 - not an error: a requested stop
    """Raised inside the loop to end it early; the trainer catches it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after a step, with a resumable checkpoint;
    ``signum`` is the signal (the CLI exits ``128 + signum``). Picklable, so a job process of
    :func:`samkit.experiments.base.map_jobs` hands it to its parent whole."""

    def __init__(self, message: str = "training interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    def __reduce__(self):
        return type(self), (str(self), self.signum)


class TrainingDiverged(RuntimeError):
    """The training loss (or the weights) became NaN or infinite: the run stopped at once.

    ``record`` is the ``diverged`` record written to metrics.jsonl (step, epoch, loss, lr,
    message); the checkpoint on disk is the last good one (or none)."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def no_checkpoint_advice(run_dir: Path, checkpoint: Path) -> str:
    """Why ``--resume`` cannot go on, and what can (never "drop --resume" when dropping it
    would be refused: a run stopped before its first checkpoint left other files)."""
    if (run_dir / "metrics.jsonl").exists():
        return (f"Cannot resume: no checkpoint at {checkpoint} (the run there stopped before "
                "its first checkpoint, nothing to resume): use --overwrite instead of --resume "
                "to start it again, or choose another --name")
    return f"Cannot resume: no checkpoint at {checkpoint} (drop --resume to start the run)"


def existing_run_advice(checkpoint: Path) -> str:
    """What to do when a new run finds a run in its folder (``--resume`` only when there is a
    checkpoint to resume); completes "<run_dir> already holds a run: ..."."""
    if checkpoint.exists():
        return ("pass --resume to continue it, --overwrite to start it again, or choose another "
                "--name")
    return ("it stopped before its first checkpoint (nothing to resume): pass --overwrite to "
            "start it again, or choose another --name")


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
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"Invalid device: {name!r}: MPS (Apple GPU) is not available here "
                         "(use cpu or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Invalid device: {name!r} (allowed: auto, cpu, cuda, cuda:N, mps)")
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

    From the registry's declarations (:func:`samkit.optim.registry.optimizer_options`):
    ``momentum`` goes only to a base optimizer that declares it (SGD); ``rho`` and ``eta`` only
    to optimizers that declare them (so one config can be trained with sgd, sam and asam).
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
    kwargs.update(given)
    return kwargs, notes


def check_loss_term_switches_on(config: TrainConfig, num_epochs: int) -> None:
    """Refuse SAF/MESA (an optimizer with a ``start_epoch``) whose loss term would never be on
    in a run of ``num_epochs`` epochs: the term is on in epochs ``e > start_epoch`` (0-based),
    so with ``num_epochs <= start_epoch + 1`` the run is its base optimizer under another name
    (and a grid over ``lam`` chooses among identical runs).

    Raises:
        ValueError: naming ``start_epoch``, the run's epochs and what to do.
    """
    import inspect

    from samkit.optim import registry

    name = config.optimizer.lower()
    try:
        entry = registry.optimizer_info(name)
    except ValueError:
        return  # the optimizer's own error comes where it is built
    if entry.wrapper is None:
        return
    params = inspect.signature(entry.wrapper).parameters
    if "start_epoch" not in params:
        return
    given = config.optimizer_kwargs
    start = given.get("start_epoch", params["start_epoch"].default)
    lam = given.get("lam", params["lam"].default if "lam" in params else 1.0)
    if isinstance(start, bool) or not isinstance(start, int) or not isinstance(lam, (int, float)):
        return  # the constructor names the bad value
    if lam == 0 or num_epochs > start + 1:
        return  # lam = 0 turns the term off on purpose
    raise ValueError(
        f"Invalid start_epoch for {name}: {start} in a run of {num_epochs} epoch(s): its loss "
        f"term is on only in epochs e > start_epoch (0-based), so it would never switch on and "
        f"the run would be plain {config.base or entry.base} under another name (allowed: "
        f"start_epoch < {num_epochs - 1}; e.g. {name}:start_epoch={max(-1, num_epochs - 2)} in "
        f"--optimizers, --set optimizer_kwargs.start_epoch={max(-1, num_epochs - 2)}, or more "
        f"than {start + 1} epochs)"
    )


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
        outputs: names the caller writes in the run folder besides the run's own files (e.g.
            ``samkit correlate``'s ``measures.json``): they are the run's, and ``--overwrite``
            replaces them with it.
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
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"Invalid config: {type(config).__name__} (allowed: a TrainConfig)")
        # what the run is (fixed at construction)
        self.config = config
        self.callbacks = list(callbacks)
        if config.edge_every is not None:  # λ₁ against the edge, every edge_every steps
            self.callbacks.append(_edge_tracker(config.edge_every))
        self.resume = resume
        self.overwrite = overwrite
        self.progress = Progress(verbose, prefix)
        self.outputs = RUN_FILES + tuple(outputs)
        self.run_dir: Path = config.run_dir
        self.checkpoint_path = self.run_dir / CHECKPOINT
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
        self._writer: MetricsWriter | None = None
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
        self._run: RunDir | None = None  # the run folder, held by rank 0 while it trains
        self._saved_step: int | None = None  # the step of the checkpoint on disk (this run's)
        self._bad_step: Tensor | None = None  # the first step with a non-finite loss, or -1
        self.state = TrainState(self)  # what callbacks see

    # ------------------------------------------------------------------ set-up

    def _check_run_dir(self) -> None:
        if self.rank == 0 and self._run is None:
            # made or found, locked, and checked (samkit.train.rundir.RunDir: a run of the same
            # folder in use, a run already there, files samkit did not write)
            self._run = RunDir(
                self.run_dir, "train", self.outputs, overwrite=self.overwrite and not self.resume,
                keep=self.resume, advice=existing_run_advice(self.checkpoint_path))
        if self.resume and not self.checkpoint_path.exists():
            raise FileNotFoundError(no_checkpoint_advice(self.run_dir, self.checkpoint_path))
        # with --overwrite the old run's files are replaced only once data and model have
        # loaded (setup, step 5): a run that fails to start leaves the old one whole

    def setup(self) -> None:
        """Build data, model, optimizer, schedule and log files (``fit`` calls it)."""
        cfg = self.config
        # 1. where, and the seeds: everything random below derives from cfg.seed / cfg.data_seed
        self.device = resolve_device(cfg.device)
        self._setup_distributed()
        self._check_run_dir()
        saved_state = None
        if self.resume:  # read it first: a corrupt checkpoint fails before anything loads
            saved_state = load_checkpoint(self.checkpoint_path, map_location=self.device)
            # a checkpoint of an older samkit: the keys it lacks keep their behaviour then
            adopt = {k: v for k, v in legacy_values(upgrade_keys(saved_state["config"])).items()
                     if getattr(cfg, k) != v}
            if adopt:
                cfg = self.config = cfg.replace(**adopt)
                self.notes.append("the checkpoint was written by an older samkit; kept its "
                                  + ", ".join(f"{k}={v}" for k, v in adopt.items()))
        if cfg.tensorboard:
            check_tensorboard()  # fail now, not after the first epoch
        if cfg.data_dir is not None and given_data_is_none(self._given):
            from samkit.data.paths import check_data_roots

            check_data_roots(cfg.data_dir)
        torch.manual_seed(cfg.seed)

        given_model, given_data = self._given
        # 2. data: held on the device as tensors (subset and label noise seeded by data_seed)
        if given_data is not None:
            self.train_data, self.test_data = given_data
        else:
            from samkit.data import load_dataset

            self.train_data, self.test_data = load_dataset(
                cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset, stratified=cfg.stratified,
                label_noise=cfg.label_noise, seed=cfg.data_seed, standardize=True,
                device=self.device,
            )
            self.data_path = data_folder(cfg.dataset, cfg.data_dir)
        n = len(self.train_data.y)
        self.batch_size, self.steps_per_epoch = steps_per_epoch(n, cfg.batch_size, cfg.drop_last)
        self.total_steps = total_steps(cfg, n)
        self.num_epochs = -(-self.total_steps // self.steps_per_epoch)
        check_loss_term_switches_on(cfg, self.num_epochs)  # SAF/MESA that would be plain SGD
        if cfg.grad_accum > self.batch_size:
            raise ValueError(
                f"Invalid grad_accum: {cfg.grad_accum} micro-batches for a batch of "
                f"{self.batch_size} examples (allowed: 1 <= grad_accum <= the batch size)")
        if cfg.warmup_epochs * self.steps_per_epoch > self.total_steps:
            raise ValueError(
                f"Invalid warmup_epochs: {cfg.warmup_epochs} epochs of warm-up is more than the "
                f"run's {self.total_steps} steps (allowed: at most the budget)")
        if self.world_size > 1:
            self._check_batches_shard(n)

        # 3. model, initialized from cfg.seed
        if given_model is not None:
            self.model = given_model.to(self.device)
        else:
            from samkit.models import create_model

            torch.manual_seed(cfg.seed)
            self.model = create_model(
                cfg.model, tuple(self.train_data.x.shape[1:]), self.train_data.num_classes,
                **cfg.model_kwargs,
            ).to(self.device)

        # 4. optimizer (from the registry), per-step LR schedule, and the step engine: DDP
        #    (the forward passes go through the wrapped model; self.model stays the plain
        #    module), micro-batches, mixed precision, the per-example losses a variant asks for
        kwargs, self.notes = optimizer_kwargs(cfg)
        self.optimizer = create_optimizer(cfg.optimizer, self.model, base=cfg.base,
                                          decay_bias_and_norm=cfg.decay_bias_and_norm, **kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._make_schedule())
        cuda = self.device.type == "cuda"
        self.engine = StepEngine(
            self.optimizer, self._wrap_ddp(self.model),
            lambda logits, y: classification_loss(logits, y, cfg.label_smoothing),
            grad_accum=cfg.grad_accum,
            scaler=torch.amp.GradScaler("cuda", enabled=cfg.amp and cuda) if cuda else None,
            autocast=(torch.float16 if cuda else torch.bfloat16) if cfg.amp else None,
            perturbation=cfg.perturbation if self.world_size > 1 else "synced",
            example_loss_fn=lambda logits, y: example_losses(logits, y, cfg.label_smoothing),
        )
        why = self.engine.example_losses_unavailable(self.batch_size)
        if why is not None:
            self.notes.append(
                f"{type(self.optimizer).__name__}'s data selection is off ({why}); this run "
                "uses its weight perturbation only"
            )

        # 5. the run directory: resolved config, metrics, the checkpoint to resume from (under
        #    DDP every rank loads the checkpoint; only rank 0 writes files)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self._run is not None:  # --overwrite: the old run goes only now
                self._run.start()
            # what a write killed half-way left (we hold the lock: no one else writes here)
            stale = remove_stale_temporaries(self.run_dir)
            if stale:
                self.notes.append(f"removed {len(stale)} temporary file(s) of an interrupted "
                                  f"write: {', '.join(p.name for p in stale)}")
        if saved_state is not None and self.rank == 0:
            differ = config_yaml_differs(self.run_dir / "config.yaml", saved_state["config"])
            if differ:
                self.notes.append(f"{self.run_dir / 'config.yaml'} differs from the checkpoint in "
                                  f"{', '.join(differ)}; the checkpoint's values are the run's "
                                  "(config.yaml is rewritten from them)")
        if saved_state is not None:
            self._load(saved_state)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            self._write_run_info("running")
            self._writer = MetricsWriter(
                self.run_dir, cfg.tensorboard, resume_step=self.step if self.resume else None
            )
        for note in self.notes:
            self.progress.line(f"note: {note}")
        if self.data_path is not None:
            self.progress.line(f"data: {cfg.dataset} from {self.data_path}")

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
            if self._run is not None:
                self._run.release()
                self._run = None
            if self._owns_process_group:
                import torch.distributed as dist

                dist.destroy_process_group()
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
            self.progress.close()
            failing = status in ("failed", "write failed")
            try:
                if self._writer is not None:
                    self._writer.close()
                if self.rank == 0:
                    self._write_run_info(status)
            except WriteFailed:
                if not failing:  # else the first error is the one to report
                    raise
        if self._interrupted:
            raise TrainingInterrupted(
                f"training interrupted; checkpoint: {self.checkpoint_path}",
                self.signal or signal.SIGINT)
        return self.last_record or {}

    def _kept(self) -> str:
        """What a failed run leaves to resume from, in words."""
        if self._saved_step is not None:
            return f"the checkpoint of step {self._saved_step} is kept: {self.checkpoint_path}"
        if self.checkpoint_path.exists():
            return f"the checkpoint {self.checkpoint_path} is kept"
        return "no checkpoint was saved before it"

    def _write_run_info(self, status: str) -> None:
        """``run.json``: what made the run (versions), where its data came from, its status."""
        from samkit.train.checkpoint import atomic_write_text

        if not hasattr(self, "_versions"):
            self._versions = versions()
        info = {"status": status, "name": self.config.run_name, "step": self.step,
                "data_path": self.data_path, "versions": self._versions,
                "diverged": self.diverged}
        atomic_write_text(self.run_dir / "run.json", strict_dumps(info, indent=2) + "\n")

    def _loop(self) -> None:
        cfg = self.config
        cuda = self.device.type == "cuda"
        augment = cfg.augment and self.train_data.x.ndim == 4
        generator = torch.Generator()  # CPU generator: the same numbers on every device
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

            # 6. one epoch: the order of its batches depends only on (seed, epoch)
            generator.manual_seed(derive_seed(cfg.seed, _SHUFFLE, epoch))
            full_batch = self.batch_size == len(self.train_data.y)  # no shuffle: one batch
            # the examples' indices only when the optimizer asks for them (samkit.step)
            wants_indices = "indices" in self.engine.batch_needs
            batches = _iterate(self.train_data, self.batch_size, None if full_batch else generator,
                               cfg.drop_last, wants_indices)
            for index, batch in enumerate(islice(batches, skip, None), start=skip):
                x, y, idx = batch if wants_indices else (*batch, None)
                if self.step >= self.total_steps:
                    break
                # 6a. augmentation on the device, seeded by (seed, step)
                if augment:
                    from samkit.data import augment_batch

                    generator.manual_seed(derive_seed(cfg.seed, _AUGMENT, self.step))
                    x = augment_batch(x, generator)
                # 6b. DDP: this rank's slice of the global batch (the same on every rank)
                global_examples = len(y)
                if self.world_size > 1:
                    from samkit.distributed import shard_batch

                    if idx is not None:  # the same slice as shard_batch's
                        idx = idx.tensor_split(self.world_size)[self.rank]
                    x, y = shard_batch(x, y, self.rank, self.world_size)
                self.batch = (x, y)
                self._call("on_step_start", self.step)

                # 6c. the step (samkit.step): the closure's passes over the micro-batches, as
                #     many as the optimizer runs, then the AMP scale update; the first pass's
                #     predictions are counted
                hits: list[Tensor] = []
                batch_loss = self.engine.step(
                    x, y, global_examples=global_examples if self.world_size > 1 else None,
                    observe=lambda out, t, hits=hits: hits.append((out.argmax(-1) == t).sum()),
                    indices=idx, epoch=epoch, num_examples=len(self.train_data.y),
                )
                # 6d. bookkeeping: LR schedule, gradients cleared for the next step (with
                #     TensorBoard, the per-step loss, lr and ‖g‖ of the step's gradient first)
                if self._writer is not None and self._writer.tensorboard:
                    self._writer.write_step(self.step + 1, float(batch_loss),
                                            self.optimizer.param_groups[0]["lr"],
                                            _grad_norm(self.model))
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
                    batch_loss, self._stop_requested = self._reduce_step(batch_loss)
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
                _, self._stop_requested = self._reduce_step(loss_sum.new_zeros(()))
            self._check_finite(loss_sum, True, epoch, weights=True)
            sums = self._add_sums(sums, loss_sum, correct, count, t0, cuda)
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

    def _check_finite(self, loss: Tensor, now: bool, epoch: int, weights: bool = False) -> None:
        """Stop the run (:class:`TrainingDiverged`) once the loss or the weights are not finite.

        The first bad step is recorded on the device every step (no host sync); it is read at
        ``now`` (every step on CPU, on logging steps and epoch ends on a GPU)."""
        if self.world_size > 1 and not now:
            return  # DDP: only the mean loss of a logging step and the (shared) weights, so
            # that every rank stops at the same step
        if self.world_size > 1 and weights:
            loss = loss.new_zeros(())  # this rank's epoch loss is not the others'
        bad = ~torch.isfinite(loss.detach())
        step = torch.tensor(self.step, device=loss.device)
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._bad_step = torch.where(bad & (self._bad_step < 0), step, self._bad_step)
        if not now:
            return
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()])
            self._bad_step = torch.where(~finite.all() & (self._bad_step < 0), step,
                                         self._bad_step)
        first = int(self._bad_step)
        if first >= 0:
            self._diverge(first, epoch, None if weights else float(loss))

    def _diverge(self, step: int, epoch: int, loss: float | None) -> None:
        cfg = self.config
        what = f"the training loss is {loss}" if loss is not None else (
            "the loss or the weights are not finite")
        causes = [f"lr={cfg.lr:g} too large"]
        rho = getattr(self.optimizer, "defaults", {}).get("rho", cfg.rho)
        if rho is not None and "rho" in getattr(self.optimizer, "defaults", {}):
            causes.append(f"rho={rho:g} too large")
        kept = (f"The last good checkpoint is kept: {self.checkpoint_path}"
                if self.checkpoint_path.exists() else "No checkpoint was saved before it")
        message = (f"training diverged at step {step} (epoch {epoch + 1}): {what}. Likely "
                   f"cause: {' or '.join(causes)}; try a smaller --lr"
                   + (" or --rho" if len(causes) > 1 else "") + f". {kept}")
        record = {"event": "diverged", "step": step, "epoch": epoch + 1, "loss": loss,
                  "lr": self.optimizer.param_groups[0]["lr"], "message": message}
        self.diverged = record
        self.log(record)
        raise TrainingDiverged(message, record)

    def _call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` of every callback with the run's TrainState."""
        for cb in self.callbacks:
            getattr(cb, hook)(self.state, *args)

    @property
    def loss_fn(self):
        """The training loss ``loss_fn(logits, y)`` (mean over the batch)."""
        return None if self.engine is None else self.engine.loss_fn

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
                        lambda: self.engine.autocast_context(self.device))

    # ------------------------------------------------------------------ logging and stopping

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl (and TensorBoard); callbacks may use it."""
        if self._writer is not None:
            self._writer.write(record)

    def request_stop(self) -> None:
        """Stop after the current step, with a resumable checkpoint; ``fit`` then returns."""
        self._stop_requested = True

    def _install_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before preemption): finish the
        step, save a resumable checkpoint, stop; a second signal aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
        previous = {s: signal.getsignal(s) for s in signals}

        def handler(signum, frame):
            if self._interrupted:  # the second signal: abort now
                for s, h in previous.items():
                    signal.signal(s, h)
                raise KeyboardInterrupt
            self._interrupted = True
            self._stop_requested = True
            self.signal = signum
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.progress.line(f"{name}: stopping after this step with a checkpoint (again to "
                               "abort)")

        for s in signals:
            signal.signal(s, handler)

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    _install_sigint = _install_signals  # the older name

    # ------------------------------------------------------------------ checkpoints

    def _save(self, epoch: int, batch: int) -> None:
        """Checkpoint the position ``(epoch, batch)``: the next batch to take."""
        if not self.config.checkpoint and not self._stop_requested:
            return
        scaler = self.engine.scaler
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
            "scaler": scaler.state_dict() if scaler is not None else None,
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
            "versions": getattr(self, "_versions", None),
            "data_shape": [list(self.train_data.x.shape[1:]), int(self.train_data.num_classes)],
        }
        save_checkpoint(state, self.checkpoint_path)
        self._saved_step = self.step

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
        if self.total_steps < state["step"]:
            done = state["step"] / self.steps_per_epoch
            epochs = f"{done:g}" if done == int(done) else f"{done:.2f}"
            asked = (f"--steps {self.config.steps}" if self.config.steps is not None
                     else f"--epochs {self.config.epochs}")
            raise ValueError(
                f"Cannot resume {self.checkpoint_path}: the run is at step {state['step']} "
                f"({epochs} epochs) and the budget asks for {self.total_steps} steps ({asked}); "
                f"allowed: a budget of at least {state['step']} steps (or --overwrite to start "
                "again)")
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
        schedule = self._make_schedule()
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        groups, base_lrs = self.optimizer.param_groups, self.scheduler.base_lrs
        for group, base_lr in zip(groups, base_lrs, strict=True):
            group["lr"] = base_lr * schedule(self.scheduler.last_epoch)
        scaler = self.engine.scaler
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        self._start = (state["epoch"], state["batch"])
        self.step = self._saved_step = state["step"]
        self._epoch_sums = state.get("epoch_sums") or {}
        self.train_time = state.get("train_time", 0.0)
        self.last_record = state.get("last_record")
        set_rng_states(state.get("rng_per_rank", [state["rng"]])[self.rank])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", []), strict=False):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        if self._start[1] == 0:
            self._epoch_sums = {}
        self.progress.line(
            f"resumed {self.checkpoint_path} at epoch {self._start[0] + 1}, step {self.step}"
        )
        if saved.get("epochs") != now["epochs"] or saved.get("steps") != now["steps"]:
            self.progress.line(f"note: budget changed, now {self.total_steps} steps")


def _grad_norm(model: nn.Module) -> float | None:
    """‖g‖₂ over every parameter's ``.grad`` (None when none has one)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.detach().float()) for g in grads])))


def given_data_is_none(given: tuple[Any, Any]) -> bool:
    return given[1] is None


def data_folder(dataset: str, data_dir: str | None) -> str | None:
    """The folder ``dataset`` was read from (None for a built-in or generated data set)."""
    from samkit.data import resolve_data_dir

    try:
        return str(resolve_data_dir(dataset, data_dir).resolve())
    except (ValueError, OSError):
        return None


def _iterate(split: Any, batch_size: int, generator: torch.Generator | None, drop_last: bool,
             indices: bool = False):
    from samkit.data import iterate_batches

    shuffle = generator is not None
    return iterate_batches(split, batch_size, shuffle, generator, drop_last=drop_last,
                           indices=indices)


def _edge_tracker(every: Any) -> Callback:
    """The :class:`~samkit.train.edge.EdgeTracker` of ``config.edge_every``: every ``every``
    steps, no budget (the rule of an explicit ``every``); its rows go to ``edge.jsonl`` and, as
    ``{"event": "edge", ...}`` records, to ``metrics.jsonl``."""
    from samkit.train.edge import EdgeTracker

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"Invalid edge_every: {every!r} (allowed: None or an integer >= 1)")
    return EdgeTracker(every=every)


def train(config: TrainConfig, callbacks: Iterable[Callback] = (), **kwargs: Any) -> dict:
    """``Trainer(config, callbacks, **kwargs).fit()``: train and return the last record."""
    return Trainer(config, callbacks, **kwargs).fit()


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
    from samkit.models import create_model
    from samkit.train.config import load_config

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
