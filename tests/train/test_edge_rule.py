"""The edge tracker's rule (issue 20 #7, issue 26): an explicit ``every`` is honoured, the
warm-up is outside the budget, the budget says what it will leave out, an empty probe is refused
at construction, ``samkit train --edge-every`` switches the tracker on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from samkit.train import EdgeTracker

mse = nn.functional.mse_loss


def _problem(n=32, d=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, x, y


def _loop(tracker, steps, lr=0.05):
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(steps):
        tracker.maybe_record(t, model, opt)
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return tracker


# --------------------------------------------------------------------------- every k means every k


def test_explicit_every_measures_every_k_steps_of_a_short_loop():
    """The issue's 60-step loop: EdgeTracker(..., every=10) gives a row at every 10th step
    (it gave 1 row and "5 due steps left out" under the default 25 % budget)."""
    _, x, y = _problem()
    tracker = _loop(EdgeTracker((x, y), mse, every=10), steps=60)
    assert [r["step"] for r in tracker.rows] == [0, 10, 20, 30, 40, 50]
    assert tracker.budget is None and tracker.skipped == 0
    assert "every 10 steps, no budget" in tracker.cost_summary()


def test_the_rule_every_and_budget():
    _, x, y = _problem()
    default = EdgeTracker((x, y), mse)
    assert (default.every, default.budget) == (10, 0.25)  # neither given: 10 within 25 %
    assert EdgeTracker(every=5).budget is None  # every alone: every 5 steps
    assert EdgeTracker(every=5, budget="auto").budget is None
    assert EdgeTracker(every=5, budget=0.1).budget == 0.1  # both: the budget applies
    assert EdgeTracker(budget=None).every == 10
    with pytest.raises(ValueError, match=r"Invalid budget: 'always' \(allowed: 'auto', None"):
        EdgeTracker(budget="always")


# --------------------------------------------------------------------------- warm-up


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_warm_up_is_outside_the_budget(monkeypatch):
    """A 20 s warm-up (compilation, allocation), 2 s measurements, 1 s steps, a 25 % budget:
    the warm-up does not delay the next measurements (the first charged one is paid back by
    step 12, then one every 6 steps, as without a warm-up); it was charged before, and its 22 s
    kept the tracker from measuring again in 100 steps."""
    import samkit.train.edge as edge_module

    clock = _Clock()
    monkeypatch.setattr(edge_module.time, "perf_counter", clock)
    original = EdgeTracker._warm_up

    warming = []

    def warm_up(self, model, params, probe):
        warming.append(True)
        original(self, model, params, probe)
        warming.clear()

    def loss_grad(self, model, params, batches, shift=None):
        # the warm-up's gradient carries the one-time cost (20 s); in a measurement 1 s
        clock.now += 20.0 if warming else 1.0
        return 0.5, torch.ones(sum(p.numel() for p in params), dtype=torch.float64)

    def top(self, H, init, keep_basis=False, tol=None):
        clock.now += 1.0
        return _FakeTop(H.shape[0])

    monkeypatch.setattr(EdgeTracker, "_warm_up", warm_up)
    monkeypatch.setattr(EdgeTracker, "_loss_grad", loss_grad)
    monkeypatch.setattr(EdgeTracker, "_top", top)
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = EdgeTracker((x, y), mse, every=1, budget=0.25, effective=False)
    monkeypatch.setattr(edge_module, "_alignment", lambda g, v: 0.0)
    for t in range(100):
        tracker.maybe_record(t, model, opt)
        clock.now += 1.0
    steps = [r["step"] for r in tracker.rows]
    assert steps[:3] == [0, 12, 18]
    assert tracker.warmup_seconds == 20.0
    assert tracker.rows[0]["seconds"] == 2.0  # the warm-up left out
    assert tracker.cost()["share"] <= 0.25 + 1e-12
    assert tracker.cost()["warmup_seconds"] == tracker.warmup_seconds
    assert "warm-up, outside the budget" in tracker.cost_summary()


class _FakeTop:
    def __init__(self, d):
        self.values = torch.tensor([1.0], dtype=torch.float64)
        self.vectors = torch.ones(d, 1, dtype=torch.float64) / d**0.5
        self.matvecs = 10
        self.converged = True
        self.error_bounds = torch.zeros(1, dtype=torch.float64)
        self.basis = None


def test_a_real_warm_up_is_timed_once_and_again_after_a_resume():
    _, x, y = _problem()
    tracker = _loop(EdgeTracker((x, y), mse, every=5), steps=11)
    assert len(tracker.rows) == 3 and tracker.warmup_seconds > 0
    first = tracker.warmup_seconds
    assert tracker.cost()["seconds"] == pytest.approx(sum(r["seconds"] for r in tracker.rows))
    again = EdgeTracker((x, y), mse, every=5)
    again.load_state_dict(tracker.state_dict())
    assert again.warmup_seconds == first
    _loop(again, steps=1)
    assert again.warmup_seconds > first  # a new process warms up again


# --------------------------------------------------------------------------- told what it costs


def test_the_budget_says_what_it_leaves_out(monkeypatch, capsys):
    """2 s measurements, 0.1 s steps, every 10 within 25 %: the first due step left out brings
    a note with the cost in steps and the spacing the budget allows (60 steps)."""
    import samkit.train.edge as edge_module

    clock = _Clock()
    monkeypatch.setattr(edge_module.time, "perf_counter", clock)

    def record(self, step, model, optimizer, batch=None, probe=None):
        start = clock()
        clock.now += 2.0  # a row format_row can print (verbose)
        return self._append({"step": int(step), "loss": 0.0, "grad_norm": 0.0, "diverged": True},
                            start, 10)

    monkeypatch.setattr(EdgeTracker, "record", record)
    tracker = EdgeTracker((torch.zeros(2, 1), torch.zeros(2, 1)), mse, every=10, budget=0.25,
                          verbose=True)
    for t in range(200):
        tracker.maybe_record(t, None, None)
        clock.now += 0.1
    assert tracker.note is not None
    assert "a measurement costs 2 s, about 20 training steps" in tracker.note
    assert "measures about every 60 steps instead of every 10" in tracker.note
    assert "budget=None: every 10 steps, about 67 % of the run's time" in tracker.note
    assert tracker.note in capsys.readouterr().out  # verbose: printed once
    assert EdgeTracker(every=10).note is None


# --------------------------------------------------------------------------- an empty probe


@pytest.mark.parametrize("probe", [
    (torch.zeros(0, 3), torch.zeros(0)),
    [(torch.zeros(4, 3), torch.zeros(4)), (torch.zeros(0, 3), torch.zeros(0))],
    [],
])
def test_an_empty_probe_is_refused_at_construction(probe):
    with pytest.raises(ValueError, match="Invalid probe"):
        EdgeTracker(probe, mse, every=1)


def test_an_empty_probe_names_the_batch():
    with pytest.raises(ValueError, match=r"no examples \(batch 1 of 2\)"):
        EdgeTracker([(torch.zeros(4, 3), torch.zeros(4)), (torch.zeros(0, 3), torch.zeros(0))])


# --------------------------------------------------------------------------- samkit train


def test_samkit_train_edge_every_flag(tmp_path, capsys):
    """--edge-every 2: a row every 2 steps in edge.jsonl and as "edge" records in
    metrics.jsonl; the resolved config keeps edge_every."""
    from samkit.cli import main
    from samkit.train import read_metrics

    argv = ["train", "--dataset", "digits", "--subset", "200", "--batch-size", "100",
            "--epochs", "3", "--optimizer", "sam", "--edge-every", "2", "--name", "edge",
            "--out-dir", str(tmp_path), "--threads", "1",
            "--set", "model_kwargs={width: 8}"]
    assert main(argv) == 0
    run = tmp_path / "edge"
    rows = [json.loads(line) for line in (run / "edge.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]  # 6 steps; the final weights at 6
    edges = [r for r in read_metrics(run) if r.get("event") == "edge"]
    assert [r["step"] for r in edges] == [0, 2, 4, 6]
    assert edges[0]["lambda1"] == pytest.approx(rows[0]["lambda1"])
    assert "edge_every: 2" in (run / "config.yaml").read_text()
    assert "every 2 steps, no budget" in capsys.readouterr().out


def test_samkit_train_edge_every_is_off_by_default_and_checked(tmp_path, capsys):
    from samkit.config import TrainConfig
    from samkit.train import Trainer

    assert TrainConfig().edge_every is None
    assert not any(isinstance(cb, EdgeTracker) for cb in Trainer(TrainConfig()).callbacks)
    with pytest.raises(ValueError, match=r"Invalid edge_every: 0 \(allowed: None or an integer"):
        Trainer(TrainConfig(edge_every=0, out_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())
