"""A training run's folder: its lock, ``run.json``, ``metrics.jsonl``, ``config.yaml`` and the
checkpoint (its schema, saving it, and the checks and bookkeeping of a resume).

The folder rules (made or found, locked, what ``--overwrite`` replaces, files samkit did not
write) are :class:`samkit.train.rundir.RunDir`'s; :class:`RunFiles` holds one for a
:class:`~samkit.train.Trainer` (on rank 0 under DDP) and writes the run's files in it. A
Trainer without a folder (``Trainer(..., run_dir=False)``, e.g. the runs of ``samkit eos``)
has none: it writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from samkit.config import RESUMABLE_CHANGES, resolved_dict, save_config, upgrade_keys
from samkit.train.checkpoint import (
    WriteFailed,
    atomic_write_text,
    remove_stale_temporaries,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from samkit.train.logs import MetricsWriter
from samkit.train.rundir import RunDir, strict_dumps, versions

if TYPE_CHECKING:
    from samkit.train.trainer import Trainer

CHECKPOINT = "checkpoint.pt"
# The files a training run writes in its directory (what --overwrite replaces).
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "tensorboard", "config.yaml", "run.json")


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


class RunFiles:
    """The files of one training run in ``run_dir`` (see the module docstring).

    Args:
        run_dir: the run's folder.
        outputs: the names the run owns there (``--overwrite`` replaces them).
        overwrite, resume: the run's ``--overwrite`` and ``--resume``.
    """

    def __init__(self, run_dir: Path, outputs: tuple[str, ...], overwrite: bool,
                 resume: bool) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint = self.run_dir / CHECKPOINT
        self.outputs = RUN_FILES + tuple(outputs)
        self.overwrite, self.resume = overwrite, resume
        self.writer: MetricsWriter | None = None
        self.saved_step: int | None = None  # the step of the checkpoint on disk (this run's)
        self.versions: dict[str, Any] | None = None
        self._run: RunDir | None = None  # held by rank 0 while the run trains

    def claim(self, rank: int) -> None:
        """Rank 0: make or find the folder, lock it and check it (:class:`RunDir`: a run of
        the same folder in use, a run already there, files samkit did not write). Every rank:
        a resume needs a checkpoint. With --overwrite the old run's files are replaced only in
        :meth:`start` (once data and model have loaded: a run that fails to start leaves the
        old one whole)."""
        if rank == 0 and self._run is None:
            self._run = RunDir(
                self.run_dir, "train", self.outputs, overwrite=self.overwrite and not self.resume,
                keep=self.resume, advice=existing_run_advice(self.checkpoint))
        if self.resume and not self.checkpoint.exists():
            raise FileNotFoundError(no_checkpoint_advice(self.run_dir, self.checkpoint))

    def start(self, notes: list[str]) -> None:
        """Rank 0, once the run can start: the old run goes (--overwrite); the temporaries of
        a write killed half-way are removed (we hold the lock: no one else writes here)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._run is not None:
            self._run.start()
        stale = remove_stale_temporaries(self.run_dir)
        if stale:
            notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write: "
                         f"{', '.join(p.name for p in stale)}")

    def check_config_yaml(self, saved: dict[str, Any], notes: list[str]) -> None:
        """A resume: note when ``config.yaml`` differs from the checkpoint's config."""
        from samkit.train.loadrun import config_yaml_differs

        differ = config_yaml_differs(self.run_dir / "config.yaml", saved)
        if differ:
            notes.append(f"{self.run_dir / 'config.yaml'} differs from the checkpoint in "
                         f"{', '.join(differ)}; the checkpoint's values are the run's "
                         "(config.yaml is rewritten from them)")

    def open(self, config: Any, step: int | None, data_path: str | None) -> None:
        """Write ``config.yaml`` and ``run.json`` (running) and open ``metrics.jsonl``
        (``step``: a resumed run's step, whose later records are dropped)."""
        save_config(config, self.run_dir / "config.yaml")
        self.write_info("running", config.run_name, step or 0, data_path, None)
        self.writer = MetricsWriter(self.run_dir, config.tensorboard, resume_step=step)

    def write_info(self, status: str, name: str, step: int, data_path: str | None,
                   diverged: dict[str, Any] | None) -> None:
        """``run.json``: what made the run (versions), where its data came from, its status."""
        if self.versions is None:
            self.versions = versions()
        info = {"status": status, "name": name, "step": step, "data_path": data_path,
                "versions": self.versions, "diverged": diverged}
        atomic_write_text(self.run_dir / "run.json", strict_dumps(info, indent=2) + "\n")

    def close(self, status: str, name: str, step: int, data_path: str | None,
              diverged: dict[str, Any] | None, writes: bool) -> None:
        """The run ended with ``status``: close ``metrics.jsonl``, write ``run.json`` (rank 0:
        ``writes``). A failed write after a failed run is dropped: the first error is the one
        to report."""
        try:
            if self.writer is not None:
                self.writer.close()
            if writes:
                self.write_info(status, name, step, data_path, diverged)
        except WriteFailed:
            if status not in ("failed", "write failed"):
                raise

    def kept(self) -> str:
        """What a failed run leaves to resume from, in words."""
        if self.saved_step is not None:
            return f"the checkpoint of step {self.saved_step} is kept: {self.checkpoint}"
        if self.checkpoint.exists():
            return f"the checkpoint {self.checkpoint} is kept"
        return "no checkpoint was saved before it"

    def release(self) -> None:
        if self._run is not None:
            self._run.release()
            self._run = None


# --------------------------------------------------------------------------- the checkpoint


def read_checkpoint(path: Path, cfg: Any, device: Any) -> tuple[dict[str, Any], Any, list[str]]:
    """The checkpoint to resume (read first: a corrupt one fails before anything loads), the
    config with the values of the keys an older samkit's checkpoint lacks (they keep their
    behaviour then), and a note naming them."""
    from samkit.config import legacy_values
    from samkit.train.checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location=device)
    adopt = {k: v for k, v in legacy_values(upgrade_keys(state["config"])).items()
             if getattr(cfg, k) != v}
    if not adopt:
        return state, cfg, []
    return state, cfg.replace(**adopt), [
        "the checkpoint was written by an older samkit; kept its "
        + ", ".join(f"{k}={v}" for k, v in adopt.items())]


def checkpoint_state(trainer: Trainer, epoch: int, batch: int, rngs: list[Any]
                     ) -> dict[str, Any]:
    """The checkpoint of ``trainer`` at the position ``(epoch, batch)`` (the next batch to
    take); ``rngs``: every rank's RNG states (dropout), for an exact resume."""
    scaler = trainer.engine.scaler
    return {
        "version": 1,
        "config": resolved_dict(trainer.config),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "batch": batch,
        "step": trainer.step,
        "epoch_sums": dict(trainer._epoch_sums) if batch else {},
        "train_time": trainer.train_time,
        "last_record": trainer.last_record,
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "world_size": trainer.world_size,
        "callbacks": [
            cb.state_dict() if hasattr(cb, "state_dict") else None for cb in trainer.callbacks
        ],
        "versions": trainer.files.versions if trainer.files is not None else None,
        "data_shape": [list(trainer.train_data.x.shape[1:]),
                       int(trainer.train_data.num_classes)],
    }


def save(trainer: Trainer, epoch: int, batch: int) -> None:
    """Checkpoint ``trainer`` at ``(epoch, batch)`` (rank 0 writes; every rank's RNG)."""
    rngs = [rng_states()]
    if trainer.world_size > 1:
        import torch.distributed as dist

        rngs = [None] * trainer.world_size
        dist.all_gather_object(rngs, rng_states())
        if trainer.rank != 0:
            return
    if trainer.files is None:
        return
    save_checkpoint(checkpoint_state(trainer, epoch, batch, rngs), trainer.files.checkpoint)
    trainer.files.saved_step = trainer.step


def check_resumable(trainer: Trainer, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Refuse a checkpoint this run cannot continue: another config (but
    :data:`~samkit.config.RESUMABLE_CHANGES`), a budget below its step, another number of
    processes. Returns its config with today's key names."""
    saved = upgrade_keys(state["config"])  # checkpoints of older versions: older key names
    now = resolved_dict(trainer.config)
    changed = sorted(
        k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, now[k]) != now[k]
    )
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"Cannot resume {path}: the config differs in {diffs} (allowed "
            f"to change: {', '.join(RESUMABLE_CHANGES)}); use --overwrite or another --name"
        )
    if trainer.total_steps < state["step"]:
        done = state["step"] / trainer.steps_per_epoch
        epochs = f"{done:g}" if done == int(done) else f"{done:.2f}"
        cfg = trainer.config
        asked = f"--steps {cfg.steps}" if cfg.steps is not None else f"--epochs {cfg.epochs}"
        raise ValueError(
            f"Cannot resume {path}: the run is at step {state['step']} "
            f"({epochs} epochs) and the budget asks for {trainer.total_steps} steps ({asked}); "
            f"allowed: a budget of at least {state['step']} steps (or --overwrite to start "
            "again)")
    saved_world = state.get("world_size", 1)
    if saved_world != trainer.world_size:
        raise ValueError(
            f"Cannot resume {path}: it was saved by {saved_world} process(es) "
            f"and this run has {trainer.world_size} (resume with the same --nproc-per-node)"
        )
    return saved


def restore(trainer: Trainer, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint into ``trainer`` (checked by :func:`check_resumable`): weights,
    optimizer, schedule (made anew for this config's budget), scaler, position, epoch sums,
    RNG states (this rank's) and the callbacks' states."""
    saved = check_resumable(trainer, state, path)
    now = resolved_dict(trainer.config)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    # The schedule follows this config's budget (it may have been extended); loading the
    # state wrote the saved budget into the schedule objects, so make them anew.
    schedule = trainer._make_schedule()
    trainer.scheduler.lr_lambdas = [schedule] * len(trainer.optimizer.param_groups)
    groups, base_lrs = trainer.optimizer.param_groups, trainer.scheduler.base_lrs
    for group, base_lr in zip(groups, base_lrs, strict=True):
        group["lr"] = base_lr * schedule(trainer.scheduler.last_epoch)
    scaler = trainer.engine.scaler
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    trainer._start = (state["epoch"], state["batch"])
    trainer.step = state["step"]
    if trainer.files is not None:
        trainer.files.saved_step = state["step"]
    trainer._epoch_sums = state.get("epoch_sums") or {}
    trainer.train_time = state.get("train_time", 0.0)
    trainer.last_record = state.get("last_record")
    set_rng_states(state.get("rng_per_rank", [state["rng"]])[trainer.rank])
    for cb, cb_state in zip(trainer.callbacks, state.get("callbacks", []), strict=False):
        if cb_state is not None and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(cb_state)
    if trainer._start[1] == 0:
        trainer._epoch_sums = {}
    trainer.progress.line(f"resumed {path} at epoch {trainer._start[0] + 1}, step {trainer.step}")
    if saved.get("epochs") != now["epochs"] or saved.get("steps") != now["steps"]:
        trainer.progress.line(f"note: budget changed, now {trainer.total_steps} steps")
