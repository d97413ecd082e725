"""samkit.experiments.budget and the fair-comparison features of `samkit compare`: passes
counted, grids chosen on a validation split, the equal-budget row, time-to-accuracy curves."""

import math

import pytest
import torch

from samkit.experiments import budget as B
from samkit.experiments.compare import (
    DEFAULT,
    CompareResult,
    RunSummary,
    format_time_to_accuracy,
    run_compare,
    run_configs,
)
from samkit.train import TrainConfig, Trainer


def quick(tmp_path, **kw):
    values = dict(dataset="digits", model="mlp", model_kwargs={"width": 32}, epochs=2,
                  batch_size=128, lr=0.1, threads=1, out_dir=str(tmp_path), checkpoint=True)
    values.update(kw)
    return TrainConfig(**values)


# ---------------------------------------------------------------------- counting


LAG1 = {"saf": {"lag": 1}}  # SAF's term needs the logits of epoch e - lag: on from epoch 1


@pytest.mark.parametrize("name, per_step", [("sgd", 1), ("sam", 2), ("saf", 1), ("mesa", 1)])
def test_pass_meter_counts_forward_backward_passes(tmp_path, name, per_step):
    ticks = iter(range(10_000))
    meter = B.PassMeter(clock=lambda: float(next(ticks)))  # every step lasts 1 "second"
    trainer = Trainer(quick(tmp_path, optimizer=name, name=name,
                            optimizer_kwargs={"start_epoch": -1, **LAG1.get(name, {})}
                            if name in ("saf", "mesa") else {}), callbacks=[meter], verbose=0)
    record = trainer.fit()
    assert record["passes"] == per_step * trainer.step == meter.passes
    assert record["step_seconds"] == trainer.step


def test_pass_meter_survives_a_resume(tmp_path):
    from samkit.train import Callback

    class Stop(Callback):
        def on_epoch_end(self, state, epoch, metrics):
            if epoch == 0:
                state.request_stop()

    cfg = quick(tmp_path, optimizer="sam", name="cut")
    Trainer(cfg, callbacks=[B.PassMeter(), Stop()], verbose=0).fit()
    trainer = Trainer(cfg, callbacks=[B.PassMeter()], resume=True, verbose=0)
    assert trainer.fit()["passes"] == 2 * trainer.step


# ---------------------------------------------------------------------- grids


def test_expand_spec_makes_the_grid_product():
    assert B.expand_spec("sam") == ["sam"]
    assert B.expand_spec("asam:rho=1.0,eta=0.01") == ["asam:rho=1.0,eta=0.01"]
    assert B.expand_spec("sam:rho=0.02,0.05,0.1") == [
        "sam:rho=0.02", "sam:rho=0.05", "sam:rho=0.1"]
    assert B.expand_spec("asam:rho=0.5,1,eta=0.01,0.1") == [
        "asam:rho=0.5,eta=0.01", "asam:rho=0.5,eta=0.1", "asam:rho=1,eta=0.01",
        "asam:rho=1,eta=0.1"]
    with pytest.raises(ValueError, match="has no key"):
        B.expand_spec("sam:0.1")


def epochs(vals, key="val_acc"):
    return [{"event": "epoch", "epoch": i + 1, key: v} for i, v in enumerate(vals)]


def test_select_candidate_takes_the_best_mean_final_validation_accuracy():
    groups = {"a": [epochs([0.9, 0.5]), epochs([0.9, 0.5])],    # final mean 0.5
              "b": [epochs([0.1, 0.5]), epochs([0.2, 1.0])],    # 0.75
              "c": [epochs([0.1, 0.75]), epochs([0.1, 0.75])]}  # 0.75: a tie, b comes first
    assert B.select_candidate(groups) == "b"
    assert math.isnan(B.mean_final([epochs([0.1], "x")], "val_acc"))


def test_carve_validation_is_stratified_disjoint_and_seeded():
    from samkit.data.split import DataSplit

    x = torch.arange(100, dtype=torch.float32).view(100, 1)
    y = torch.arange(100) % 4
    train = DataSplit(x, y, 4, (1,), "toy")
    a, val = B.carve_validation(train, 0.2, seed=3)
    assert len(val.y) == 20 and len(a.y) == 80
    assert torch.bincount(val.y).tolist() == [5, 5, 5, 5]
    assert not set(a.x.view(-1).tolist()) & set(val.x.view(-1).tolist())
    again = B.carve_validation(train, 0.2, seed=3)[1]
    assert torch.equal(again.x, val.x)
    with pytest.raises(ValueError, match="val_fraction"):
        B.CompareOptions(val_fraction=1.0)
    with pytest.raises(ValueError, match="budget"):
        B.CompareOptions(budget="flops")
    assert B.CompareOptions(equal_budget="none").equal_budget is None


def test_optimizer_keys_go_to_optimizer_kwargs(tmp_path):
    runs = run_configs(DEFAULT, ["saf:lam=0.8,lag=3", "sam:rho=0.1"], [0], tmp_path)
    assert runs[0][2].optimizer_kwargs == {"lam": 0.8, "lag": 3}
    assert runs[1][2].rho == 0.1 and runs[1][2].optimizer_kwargs == {}


# ---------------------------------------------------------------------- the equal budget


def test_equal_budget_steps_scale_with_the_cost_ratio():
    assert B.equal_budget_steps(100, 2.0, 4.2) == 210
    assert B.equal_budget_steps(100, 1000, 2000) == 200
    with pytest.raises(ValueError, match="Invalid costs"):
        B.equal_budget_steps(100, 0.0, 1.0)


def test_compare_with_a_grid_and_an_equal_passes_row(tmp_path):
    cfg = quick(tmp_path, epochs=2)
    options = B.CompareOptions(equal_budget="sgd", budget="passes", val_fraction=0.2)
    result = run_compare(cfg, ["sam:rho=0.01,0.2", "saf:start_epoch=-1,lag=1"], [0, 1],
                         name="c", verbose=0, options=options)
    # the grid's chosen candidate is the row; the other candidate is only in the selection
    assert set(result.selection) == {"sam:rho=0.01,0.2"}
    scores = result.selection["sam:rho=0.01,0.2"]
    chosen = max(scores, key=scores.get)
    assert result.labels[:3] == [chosen, "saf:start_epoch=-1,lag=1", "sgd"]
    # every method trained on the same 80 %; validation accuracy in the records
    run = result.by_label(chosen)[0]
    assert all("val_acc" in r for r in run.epochs())
    # sgd again for SAM's passes: exactly twice its steps
    label = result.equal_budget_label
    assert label == f"sgd (equal passes: {chosen})"
    rows = {r["optimizer"]: r for r in result.rows()}
    assert rows[label]["passes"] == rows[chosen]["passes"] == 2 * rows["sgd"]["passes"]
    report = (tmp_path / "c" / "report.md").read_text()
    assert "Grid `sam:rho=0.01,0.2`" in report and "Time to reach sgd's final" in report
    assert (tmp_path / "c" / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_time_to_accuracy_reads_the_mean_curves(tmp_path):
    def recs(accs, secs, passes):
        return [{"event": "epoch", "epoch": i + 1, "test_acc": a, "step_seconds": s,
                 "passes": p, "train_loss": 1.0, "epoch_time": 1.0}
                for i, (a, s, p) in enumerate(zip(accs, secs, passes, strict=True))]

    result = CompareResult("t", tmp_path, DEFAULT, ["sgd", "saf"], [0])
    result.runs = [RunSummary("sgd", 0, tmp_path, recs([0.5, 0.7], [1, 2], [10, 20])),
                   RunSummary("saf", 0, tmp_path, recs([0.72, 0.8], [1.5, 3], [10, 20]))]
    assert B.time_to_accuracy([r.records for r in result.by_label("saf")], 0.7) == (1.5, 10)
    assert all(math.isnan(v) for v in B.time_to_accuracy([result.runs[0].records], 0.9))
    table = format_time_to_accuracy(result)
    assert "| saf | 1.5 | 10 |" in table and "| sgd | 2.0 | 20 |" in table


def test_the_default_job_shows_the_effect_setting():
    from samkit.experiments.compare import DEFAULT_OPTIMIZERS, DEFAULT_OPTIONS
    from samkit.optim.registry import optimizer_info

    assert DEFAULT.label_noise == 0.4 and DEFAULT.subset == 10_000
    assert DEFAULT_OPTIMIZERS[:3] == ("sgd", "sam", "asam")
    one_pass = [o for o in DEFAULT_OPTIMIZERS if hasattr(
        optimizer_info(o.partition(":")[0]).wrapper, "loss_term")]
    assert one_pass  # the best one-pass variant
    assert DEFAULT_OPTIONS.equal_budget == "sgd" and DEFAULT_OPTIONS.budget == "time"
