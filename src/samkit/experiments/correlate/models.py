"""One model of the study: train it to the stopping rule (or load it from the cache), evaluate
and measure it and its rescaled copies; the job of one worker process."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any

from samkit.experiments import base
from samkit.experiments.correlate.cache import MeasureCache, _spec_changes, _spec_record
from samkit.experiments.correlate.config import CorrelateConfig
from samkit.experiments.correlate.grid import ModelSpec, _fmt_num
from samkit.measures import evaluate, measure_model, rescale_relu
from samkit.train.checkpoint import atomic_write_text


def load_data(train):
    """The study's (train, test) splits on the CPU, loaded once per process."""
    return base.load_data(train, "cpu", cache=True)


def measure_batch(train_split, config: CorrelateConfig):
    """The fixed ``(x, y)`` the measures use: ``measure_examples`` training examples drawn with
    ``config.seed`` (all of them when there are fewer)."""
    import torch

    n = len(train_split.y)
    if config.measure_examples >= n:
        return train_split.x, train_split.y
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(n, generator=generator)[: config.measure_examples].sort().values
    return train_split.x[index], train_split.y[index]


def _stop_callback(stop_loss: float | None):
    from samkit.train.callbacks import Callback

    class StopRule(Callback):
        """After every epoch: the full training loss in eval mode; stop at ``stop_loss``, or
        at a non-finite loss (diverged)."""

        def on_epoch_end(self, trainer, epoch, metrics):
            if not math.isfinite(metrics["train_loss"]):
                metrics["stop"] = "diverged"
                trainer.request_stop()
                return
            if stop_loss is None:
                return
            loss, acc = trainer.evaluate(trainer.train_data)
            metrics["eval_train_loss"], metrics["eval_train_acc"] = loss, acc
            if not math.isfinite(loss):
                metrics["stop"] = "diverged"
                trainer.request_stop()
            elif loss <= stop_loss:
                metrics["stop"] = "threshold"
                trainer.request_stop()

    return StopRule()



# What a study writes in a model's run folder besides the training run's own files.
MODEL_FILES = ("spec.json", "measures.json")


def train_model(
    spec: ModelSpec, config: CorrelateConfig, data, callbacks: Iterable[Any] = (),
    verbose: int = 0,
) -> tuple[Any, dict[str, Any], bool]:
    """Train ``spec`` to the stopping rule, or continue it, or load it when finished.

    Returns ``(model, last epoch record, trained now)``; the model is on the CPU.
    """
    from samkit.models import create_model
    from samkit.train.trainer import Trainer

    spec_path = spec.run_dir / "spec.json"
    record = _spec_record(spec, config)
    if spec_path.is_file():
        changed = _spec_changes(json.loads(spec_path.read_text()), record)
        if changed:
            raise ValueError(
                f"The cached model {spec.run_dir} was trained with other settings (changed: "
                f"{', '.join(changed) or 'spec'}); rerun with --overwrite, or choose another "
                "--name"
            )
    state = base.finished_state(spec.train, len(data[0].y))
    trained = False
    if state is None:
        from samkit.train.callbacks import Callback

        class WriteSpec(Callback):  # once the run holds its folder (samkit.train.rundir)
            def on_train_start(self, state):
                atomic_write_text(spec_path, base.strict_dumps(record, indent=1, sort_keys=True))

        resume = (spec.run_dir / "checkpoint.pt").is_file()
        trainer = Trainer(
            spec.train, callbacks=[WriteSpec(), _stop_callback(config.stop_loss), *callbacks],
            resume=resume, overwrite=not resume, data=data, verbose=verbose,
            outputs=MODEL_FILES,
        )
        trainer.fit()
        if trainer.stopped and (trainer.last_record or {}).get("stop") is None:
            raise KeyboardInterrupt(f"training of {spec.key} stopped before its end")
        trained = True
        state = base.finished_state(spec.train, len(data[0].y))
        if state is None:  # pragma: no cover - the trainer always checkpoints its end
            raise RuntimeError(f"{spec.key}: training ended without a final checkpoint")
    import torch

    torch.manual_seed(spec.train.seed)
    train_split = data[0]
    model = create_model(spec.train.model, tuple(train_split.x.shape[1:]),
                         train_split.num_classes, **spec.train.model_kwargs)
    model.load_state_dict(state["model"])
    return model, state["last_record"], trained


def status_of(record: dict[str, Any], config: CorrelateConfig) -> str:
    """``converged`` (stop rule met; every model under a fixed budget), ``unconverged``
    (the budget ran out first) or ``diverged``."""
    stop = record.get("stop")
    if stop == "diverged":
        return "diverged"
    if stop == "threshold" or config.stop_loss is None:
        return "converged"
    return "unconverged"


def process_model(
    spec: ModelSpec, config: CorrelateConfig, callbacks: Iterable[Any] = (), verbose: int = 0
) -> list[dict[str, Any]]:
    """Train (or load) one model, evaluate and measure it (and its rescaled copies); returns its
    rows. Everything is cached in the model's folder."""
    data = load_data(config.train)
    t0 = time.perf_counter()
    model, record, trained = train_model(spec, config, data, callbacks, verbose)
    train_time = time.perf_counter() - t0
    status = status_of(record, config)
    cache = MeasureCache(spec.run_dir / "measures.json")
    batch = measure_batch(data[0], config)
    rows = []
    base_eval = None
    for alpha in (1.0, *config.rescale):
        prefix = "" if alpha == 1.0 else f"x{_fmt_num(alpha)}/"
        net = model if alpha == 1.0 else rescale_relu(model, alpha)

        def _eval(net=net):
            tl, train_acc = evaluate(net, data[0])
            vl, test_acc = evaluate(net, data[1])
            te, ve = 1.0 - train_acc, 1.0 - test_acc
            return {"train_loss": tl, "train_err": te, "test_loss": vl, "test_err": ve}

        ev = cache.get(prefix + "eval", _eval)
        if base_eval is None:
            base_eval = ev
        elif status != "diverged" and not math.isclose(
            ev["train_loss"], base_eval["train_loss"], rel_tol=1e-3, abs_tol=1e-6
        ):
            raise ValueError(
                f"Rescaling {spec.key} by alpha={alpha:g} changed its training loss "
                f"({base_eval['train_loss']:.6g} -> {ev['train_loss']:.6g}): the model is not "
                "positively homogeneous between its first two layers (use a ReLU MLP or CNN)"
            )
        values: dict[str, float] = {}
        if status != "diverged":
            values = measure_model(net, batch, config, cache, prefix)
        row = {
            "model": spec.key if alpha == 1.0 else f"{spec.key}-x{_fmt_num(alpha)}",
            **spec.hparams,
            "alpha": float(alpha),
            "status": status,
            "epochs": record.get("epoch"),
            "steps": record.get("step"),
            "train_time": record.get("train_time"),
            **ev,
            "gap_error": ev["test_err"] - ev["train_err"],
            "gap_loss": ev["test_loss"] - ev["train_loss"],
            **values,
        }
        rows.append(row)
    rows[0]["_trained"] = trained
    rows[0]["_computed"] = cache.computed
    rows[0]["_wall"] = time.perf_counter() - t0
    rows[0]["_train_wall"] = train_time
    return rows


def model_job(task: tuple[ModelSpec, CorrelateConfig, int | None]) -> list[dict[str, Any]]:
    """One model of the study as a job (:func:`samkit.experiments.base.map_jobs`): its rows,
    with torch's CPU threads set to ``threads`` meanwhile (when given)."""
    import torch

    from samkit.config import check_threads

    spec, config, threads = task
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(check_threads(threads))
    try:
        return process_model(spec, config)
    finally:
        torch.set_num_threads(previous)
