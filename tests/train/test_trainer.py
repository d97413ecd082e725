"""The trainer: exact resume (epoch boundary, Ctrl-C mid-epoch, extended budget), callbacks,
run-directory rules, full-batch and steps budgets, accumulation, AMP, TensorBoard errors."""

import contextlib
import copy
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from samkit.train import (
    Callback,
    TrainConfig,
    Trainer,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from samkit.train.build import optimizer_kwargs
from samkit.train.rundir import MARKER

TIME_KEYS = {"epoch_time", "images_per_s", "train_time"}


def cfg(tmp_path, **kw):
    base = dict(dataset="digits", model="mlp", model_kwargs={"width": 32, "dropout": 0.1},
                optimizer="sam", epochs=2, batch_size=100, lr=0.05, augment=True,
                out_dir=str(tmp_path), threads=1, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def same(a, b, path="state"):
    """Bit-exact equality of nested state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), path


def final_state(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")
    return {k: state[k] for k in ("model", "optimizer", "scheduler", "step", "rng")}


def epoch_records(run_dir, drop=()):
    return [
        {k: v for k, v in r.items() if k not in TIME_KEYS | set(drop)}
        for r in read_metrics(run_dir) if r["event"] == "epoch"
    ]


class StopAt(Callback):
    def __init__(self, step=None, epoch=None, sigint=False):
        self.step, self.epoch, self.sigint = step, epoch, sigint

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            if self.sigint:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C
            else:
                trainer.request_stop()

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            trainer.request_stop()


def test_two_epochs_equal_one_epoch_resume_one_epoch(tmp_path):
    Trainer(cfg(tmp_path, name="straight"), verbose=0).fit()
    first = Trainer(cfg(tmp_path, name="resumed"), callbacks=[StopAt(epoch=0)], verbose=0)
    first.fit()
    assert first.stopped and first.step == 15
    Trainer(cfg(tmp_path, name="resumed"), resume=True, verbose=0).fit()
    same(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    assert epoch_records(tmp_path / "straight") == epoch_records(tmp_path / "resumed")


def test_ctrl_c_mid_epoch_leaves_an_exact_resumable_checkpoint(tmp_path):
    # BatchNorm + dropout + ASAM + accumulation: every state the step touches
    model = lambda: nn.Sequential(  # noqa: E731
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(32, 10))
    kw = dict(optimizer="asam", grad_accum=2, schedule="step", warmup_epochs=0.5)
    torch.manual_seed(0)
    Trainer(cfg(tmp_path, name="straight", **kw), model=model(), verbose=0).fit()
    torch.manual_seed(0)
    interrupted = Trainer(cfg(tmp_path, name="cut", **kw), model=model(),
                          callbacks=[StopAt(step=7, sigint=True)], verbose=0)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, else Python's
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 7, 7)
    assert not list((tmp_path / "cut").glob("*.tmp"))  # atomic: no temporary file left
    torch.manual_seed(123)  # the resumed run must not depend on the global seed
    Trainer(cfg(tmp_path, name="cut", **kw), model=model(), resume=True, verbose=0).fit()
    same(final_state(tmp_path / "straight"), final_state(tmp_path / "cut"))
    # the epoch statistics are summed in two parts after a mid-epoch resume: equal to rounding
    a, b = epoch_records(tmp_path / "straight"), epoch_records(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == (pytest.approx(ra[key], rel=1e-12) if isinstance(ra[key], float)
                               else ra[key]), key
    steps = [r["step"] for r in read_metrics(tmp_path / "cut") if r["event"] == "step"]
    assert steps == sorted(set(steps))  # no step logged twice


def test_extending_the_budget_on_resume(tmp_path):
    kw = dict(schedule="constant", optimizer="sgd", augment=False)
    Trainer(cfg(tmp_path, name="straight", **kw), verbose=0).fit()
    Trainer(cfg(tmp_path, name="grown", epochs=1, **kw), verbose=0).fit()
    Trainer(cfg(tmp_path, name="grown", **kw), resume=True, verbose=0).fit()
    same(final_state(tmp_path / "straight"), final_state(tmp_path / "grown"))


def test_run_directory_rules(tmp_path):
    c = cfg(tmp_path, epochs=1, optimizer="sgd", name="r")
    with pytest.raises(FileNotFoundError, match="Cannot resume: no checkpoint"):
        Trainer(c, resume=True, verbose=0).fit()
    Trainer(c, verbose=0).fit()
    assert {p.name for p in c.run_dir.iterdir()} == {"config.yaml", "metrics.jsonl",
                                                      "checkpoint.pt", "run.json", MARKER}
    with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(c, verbose=0).fit()
    with pytest.raises(ValueError, match="config differs in lr: 0.05 -> 0.1"):
        Trainer(c.replace(lr=0.1), resume=True, verbose=0).fit()
    Trainer(c, overwrite=True, verbose=0).fit()
    assert len(epoch_records(c.run_dir)) == 1


class Recorder(Callback):
    def __init__(self):
        self.calls, self.counter = [], 0

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(f"epoch{epoch}")

    def on_step_end(self, trainer, step, loss):
        self.calls.append("step")
        assert step == trainer.step and loss.ndim == 0 and trainer.batch is not None
        self.counter += 1

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["my_metric"] = float(self.counter)
        trainer.log({"event": "custom", "step": trainer.step, "value": 1.0})

    def on_train_end(self, trainer, metrics):
        self.calls.append("end")

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


def test_callbacks_are_called_and_their_state_is_resumed(tmp_path):
    rec = Recorder()
    c = cfg(tmp_path, optimizer="sgd", steps=20, augment=False)
    trainer = Trainer(c, callbacks=[rec, StopAt(epoch=0)], verbose=0)
    trainer.fit()
    assert rec.calls == ["start", "epoch0"] + ["step"] * 15
    rec2 = Recorder()
    record = Trainer(c, callbacks=[rec2], resume=True, verbose=0).fit()
    assert rec2.counter == 20 and rec2.calls == ["start", "epoch1"] + ["step"] * 5 + ["end"]
    assert record["my_metric"] == 20.0 and record["step"] == 20
    lines = [json.loads(x) for x in (c.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines].count("custom") == 2


def test_full_batch_and_steps_budget(tmp_path):
    c = cfg(tmp_path, batch_size=0, steps=3, optimizer="asam", augment=False, eval_every=2,
            subset=200, model_kwargs={"width": 16})
    trainer = Trainer(c, verbose=0)
    record = trainer.fit()
    assert trainer.batch_size == 200 and trainer.steps_per_epoch == 1
    records = epoch_records(c.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert ["test_acc" in r for r in records] == [False, True, True]  # every 2nd and the last
    assert record["step"] == 3


def test_accumulation_matches_the_whole_batch(tmp_path):
    kw = dict(optimizer="sam", augment=False, model_kwargs={"width": 16}, epochs=1)
    Trainer(cfg(tmp_path, name="whole", **kw), verbose=0).fit()
    Trainer(cfg(tmp_path, name="accum", grad_accum=3, **kw), verbose=0).fit()
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "accum" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_amp_on_cpu_runs(tmp_path):
    record = Trainer(cfg(tmp_path, amp=True, epochs=1, optimizer="asam"), verbose=0).fit()
    assert math.isfinite(record["train_loss"]) and 0 <= record["test_acc"] <= 1


def test_optimizer_arguments_follow_the_optimizer():
    kw, notes = optimizer_kwargs(TrainConfig(optimizer="sgd", rho=0.1))
    assert "rho" not in kw and "momentum" in kw
    assert notes == ["sgd takes no rho; rho=0.1 is not used"]
    kw, _ = optimizer_kwargs(TrainConfig(optimizer="asam", rho=1.0, eta=0.02))
    assert (kw["rho"], kw["eta"]) == (1.0, 0.02)
    kw, _ = optimizer_kwargs(TrainConfig(optimizer="adam"))
    assert "momentum" not in kw
    kw, _ = optimizer_kwargs(TrainConfig(optimizer="sam", base="adamw"))
    assert "momentum" not in kw
    with pytest.raises(ValueError, match="Invalid optimizer: 'sgdd'.*asam"):
        optimizer_kwargs(TrainConfig(optimizer="sgdd"))


def test_bsam_takes_the_training_set_size_unless_given(tmp_path):
    """bSAM's N (``num_data``, its posterior's scale) is the size of the data the Trainer trains
    on, not the library's default (CIFAR-10's 50,000); a ``num_data`` the config gives is kept,
    even when it differs from the data (the official runs give 4 N with augmentation)."""
    run = dict(optimizer="bsam", lr=0.5, subset=300, steps=1, augment=False)
    trainer = Trainer(cfg(tmp_path, **run), write=False, verbose=0)
    trainer.fit()
    assert len(trainer.train_data.y) == 300
    assert {g["num_data"] for g in trainer.optimizer.param_groups} == {300}
    given = Trainer(cfg(tmp_path, optimizer_kwargs={"num_data": 1200}, **run), write=False,
                    verbose=0)
    given.fit()
    assert {g["num_data"] for g in given.optimizer.param_groups} == {1200}
    # only to an optimizer that declares it
    assert "num_data" not in optimizer_kwargs(TrainConfig(optimizer="sam"), 300)[0]
    assert optimizer_kwargs(TrainConfig(optimizer="bsam"), 300)[0]["num_data"] == 300


def test_a_resumed_bsam_run_keeps_its_checkpoints_num_data(tmp_path):
    """A checkpoint written with another N (an older samkit's 50,000) resumes with it: the
    optimizer's state wins over the size the Trainer builds with (bit-exact resume)."""
    run = dict(optimizer="bsam", lr=0.5, subset=300, augment=False)
    Trainer(cfg(tmp_path, **run, epochs=1), verbose=0).fit()
    path = tmp_path / cfg(tmp_path, **run).run_name / "checkpoint.pt"
    state = load_checkpoint(path)
    for group in state["optimizer"]["param_groups"]:
        group["num_data"] = 50_000
    save_checkpoint(state, path)
    trainer = Trainer(cfg(tmp_path, **run, epochs=2), resume=True, verbose=0)
    trainer.fit()
    assert {g["num_data"] for g in trainer.optimizer.param_groups} == {50_000}


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match="pip install 'samkit\\[tensorboard\\]'"):
        Trainer(cfg(tmp_path, tensorboard=True), verbose=0).fit()
    assert not (tmp_path / cfg(tmp_path).run_name).exists()  # failed before writing anything


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    Trainer(cfg(tmp_path, epochs=1, optimizer="sgd"), verbose=2).fit()
    out = capsys.readouterr().out
    assert "step 5  loss" in out and "epoch 1/1  step 15" in out and "test loss" in out


def test_esam_data_selection_in_the_trainer_equals_esam_step(tmp_path):
    """A full-batch ESAM step of the trainer (SWP + SDS: second pass on the γ-fraction whose
    loss rises most) equals ESAM.step with ExampleLosses on the same batch."""
    from functools import partial

    import samkit
    from samkit.data import load_dataset

    config = cfg(tmp_path, optimizer="esam", batch_size=0, steps=2, augment=False,
                 model_kwargs={"width": 32}, optimizer_kwargs={"gamma": 0.25},
                 schedule="constant")
    seen, start = [], {}

    class Watch(Callback):
        def on_train_start(self, trainer):
            start["model"] = copy.deepcopy(trainer.model)
            trainer.model.register_forward_pre_hook(
                lambda m, args: seen.append(len(args[0])) if m.training else None
            )

    trainer = Trainer(config, callbacks=[Watch()], verbose=0)
    trainer.fit()
    reference = start["model"]
    n = len(trainer.train_data.y)
    # per step: the first pass (n), the selection forward (n) and the second pass (n / 4)
    assert seen == [n, n, math.ceil(n / 4)] * 2

    train, _ = load_dataset("digits")
    kwargs, _ = optimizer_kwargs(config)
    opt = samkit.create_optimizer("esam", reference, **kwargs)
    for _ in range(2):
        opt.step(samkit.ExampleLosses(reference, partial(nn.functional.cross_entropy,
                                                          reduction="none"), train.x, train.y))
    for p, q in zip(trainer.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_esam_data_selection_falls_back_with_accumulation(tmp_path):
    seen = []

    class Watch(Callback):
        def on_train_start(self, state):
            state.model.register_forward_pre_hook(
                lambda m, args: seen.append(len(args[0])) if m.training else None
            )

    trainer = Trainer(cfg(tmp_path, optimizer="esam", grad_accum=2, steps=1), callbacks=[Watch()],
                      verbose=0)
    trainer.fit()
    assert any("weight perturbation only" in note for note in trainer.notes)
    # two full passes over the two micro-batches of 50: no selection forward, no dropped example
    assert seen == [50, 50, 50, 50]


def test_checkpoint_every_n_epochs_and_always_at_the_end(tmp_path):
    seen = {}

    class Look(Callback):
        def on_epoch_end(self, state, epoch, metrics):  # before this epoch's checkpoint
            path = state.run_dir / "checkpoint.pt"
            seen[epoch] = load_checkpoint(path)["epoch"] if path.exists() else None

    c = cfg(tmp_path, epochs=5, checkpoint_every=2)
    Trainer(c, callbacks=[Look()], verbose=0).fit()
    assert seen == {0: None, 1: None, 2: 2, 3: 2, 4: 4}
    assert load_checkpoint(c.run_dir / "checkpoint.pt")["epoch"] == 5
    with pytest.raises(ValueError, match="checkpoint_every"):
        cfg(tmp_path, checkpoint_every=0)


def test_callbacks_see_a_train_state_with_step_start(tmp_path):
    from samkit.train import TrainState

    calls = []

    class Look(Callback):
        def on_train_start(self, state):
            assert isinstance(state, TrainState) and state.step == 0 and not state.resumed
            with pytest.raises(AttributeError, match="TrainState has no attribute 'scheduler'.*"
                                                     "model, optimizer"):
                state.scheduler  # noqa: B018 - the trainer's internals are not part of it

        def on_step_start(self, state, step):
            assert step == state.step and state.batch is not None
            calls.append(("start", step, id(state.batch)))

        def on_step_end(self, state, step, loss):
            calls.append(("end", step, id(state.batch)))

        def on_epoch_end(self, state, epoch, metrics):
            metrics["eval"] = state.evaluate()

    trainer = Trainer(cfg(tmp_path, optimizer="sgd", steps=4, augment=False, batch_size=500),
                      callbacks=[Look()], verbose=0)
    record = trainer.fit()
    assert [c[:2] for c in calls] == [("start", 0), ("end", 1), ("start", 1), ("end", 2),
                                      ("start", 2), ("end", 3), ("start", 3), ("end", 4)]
    assert calls[0][2] == calls[1][2]  # the batch a step starts with is the one it used
    assert record["eval"] == pytest.approx((record["test_loss"], record["test_acc"]))


def test_edge_tracker_in_the_trainer_measures_where_a_plain_loop_does(tmp_path):
    """Row t: the weights before step t and the gradient norm on the batch step t uses (the
    ‖g‖ the SAM step normalizes by), as `tracker.maybe_record(t, model, opt, batch)` does in a
    plain loop; the final weights get a row too."""
    from samkit.train import EdgeTracker, read_edge_rows
    from samkit.train.trainer import classification_loss

    saved = {}

    class Save(Callback):
        def on_step_start(self, state, step):
            saved[step] = (copy.deepcopy(state.model), state.batch)

    config = cfg(tmp_path, optimizer="sam", steps=4, augment=False, subset=300,
                 model_kwargs={"width": 8, "dropout": 0.0})
    tracker = EdgeTracker(every=2, budget=None, probe_size=64)
    Trainer(config, callbacks=[Save(), tracker], verbose=0).fit()
    rows = read_edge_rows(config.run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows[:2]:
        model, (x, y) = saved[row["step"]]
        grads = torch.autograd.grad(classification_loss(model(x), y), list(model.parameters()))
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        assert row["batch_grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert "batch_grad_norm" not in rows[2]  # the final weights: no next batch


def test_msam_in_the_trainer_evaluates_and_saves_at_w_and_resumes_bit_for_bit(tmp_path):
    """MSAM holds w + eps between steps: the trainer evaluates and checkpoints at w (inside
    at_weights), leaves the model at w when fit returns, and a run stopped mid-epoch and resumed
    takes the very same steps as an uninterrupted one."""
    kw = dict(optimizer="msam", rho=1.0, epochs=2)
    straight = Trainer(cfg(tmp_path, name="straight", **kw), verbose=0)
    record = straight.fit()
    assert not straight.optimizer.weights_perturbed  # left at w
    assert straight.evaluate(straight.test_data) == (record["test_loss"], record["test_acc"])
    saved = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    same(saved, straight.model.state_dict())
    straight.optimizer.perturb()  # at w + eps the test loss differs: the record was at w
    at_eps = straight.task.evaluate(straight.model, straight.test_data, 500, straight.device,
                                    contextlib.nullcontext)
    assert at_eps[0] != record["test_loss"]
    first = Trainer(cfg(tmp_path, name="cut", **kw), callbacks=[StopAt(step=7)], verbose=0)
    first.fit()
    assert first.stopped and first.step == 7
    Trainer(cfg(tmp_path, name="cut", **kw), resume=True, verbose=0).fit()
    same(final_state(tmp_path / "straight"), final_state(tmp_path / "cut"))
    assert epoch_records(tmp_path / "straight") == epoch_records(tmp_path / "cut")
