"""samkit correlate: config and grid, scale invariance at the study level, cache and resume
(between models, between measures, inside a model's training), --jobs, the --quick smoke run."""

import json
import math
from pathlib import Path

import pytest

from samkit.experiments import correlate as C
from samkit.train.callbacks import Callback

CONFIGS = Path(__file__).parents[2] / "configs"


def tiny(tmp_path, **changes):
    """4 small MLPs on 500 of scikit-learn's digits (as --quick), a few epochs each, one ρ per
    measure."""
    train = C.QUICK.train.replace(
        dataset="digits", subset=500, epochs=3, out_dir=str(tmp_path),
        model_kwargs={"depth": 2, "width": 16, "activation": "relu"},
    )
    cfg = C.QUICK.replace(train=train, batch_sizes=(64, 256), lrs=(0.05,), dropouts=(0.0, 0.2),
                          stop_loss=0.3, measure_examples=128, steps=2, trace_samples=3)
    return cfg.replace(**changes)


def numbers(rows):
    return [{k: v for k, v in r.items() if k != "train_time"} for r in rows]


# ------------------------------------------------------------------ config and grid


def test_default_grid_and_config_round_trip(tmp_path):
    specs = C.grid(C.DEFAULT, tmp_path)
    assert len(specs) == 3 * 3 * 2 * 2
    s = specs[-1]
    assert s.key == "bs512-lr0.05-wd0.0005-do0.2"
    assert (s.train.batch_size, s.train.lr, s.train.weight_decay) == (512, 0.05, 5e-4)
    assert s.train.model_kwargs["dropout"] == 0.2
    assert s.run_dir == tmp_path / "models" / s.key
    # the YAML / dict form gives the same config back
    values = json.loads(json.dumps(C.config_to_dict(C.DEFAULT)))
    assert C.config_from_dict(values, C.QUICK) == C.DEFAULT
    measures = C.measures(C.DEFAULT)
    assert len(measures) == 4 * 3 + 2
    assert len({C.cache_key(m, C.DEFAULT) for m in measures}) == len(measures)


def test_overrides_and_errors(tmp_path):
    cfg = C.apply_study_overrides(
        C.DEFAULT, ["steps=3", "train.subset=500", "train.model_kwargs.width=8", "rescale=[2]"])
    assert (cfg.steps, cfg.train.subset, cfg.train.model_kwargs["width"], cfg.rescale) == (
        3, 500, 8, (2,))
    with pytest.raises(ValueError, match="Unknown key 'step'.*did you mean steps"):
        C.apply_study_overrides(C.DEFAULT, ["step=3"])
    with pytest.raises(ValueError, match="Unknown key 'lrr'"):
        C.apply_study_overrides(C.DEFAULT, ["train.lrr=3"])
    with pytest.raises(ValueError, match="Invalid value for 'stop_loss'"):
        C.apply_study_overrides(C.DEFAULT, ["stop_loss=abc"])
    with pytest.raises(ValueError, match="Invalid lrs: the list is empty"):
        C.DEFAULT.replace(lrs=())
    with pytest.raises(ValueError, match="Invalid dropouts"):
        C.DEFAULT.replace(dropouts=(0.0, 1.0))
    with pytest.raises(ValueError, match="Invalid gap"):
        C.DEFAULT.replace(gap="acc")
    with pytest.raises(ValueError, match="Invalid jobs"):
        C.run_correlate(tiny(tmp_path), jobs=0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("correlate*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = C.load_correlate_config(path)
    assert C.grid(cfg, Path("runs/x"))


# ------------------------------------------------------------------ scale invariance


def test_study_level_scale_invariance(tmp_path):
    """A rescaled copy of every model joins the study: same gap and adaptive sharpness, other
    plain sharpness."""
    cfg = tiny(tmp_path, batch_sizes=(64,), dropouts=(0.0,), rescale=(8.0,))
    result = C.run_correlate(cfg, name="s", verbose=0)
    assert [r["alpha"] for r in result.rows] == [1.0, 8.0]
    orig, copy = result.rows
    assert copy["model"] == orig["model"] + "-x8"
    assert copy["gap_error"] == orig["gap_error"]
    assert copy["train_loss"] == pytest.approx(orig["train_loss"], rel=1e-5)
    for m in C.measures(cfg):
        if m.family == "adaptive":
            assert copy[m.key] == pytest.approx(orig[m.key], rel=1e-4), m.key
        else:
            assert not math.isclose(copy[m.key], orig[m.key], rel_tol=0.05), m.key


# ------------------------------------------------------------------ cache and resume


class Counter:
    def __init__(self, monkeypatch, fail_at=None):
        self.fits = 0
        self.measures = 0
        self.fail_at = fail_at
        real_measure = C.measure_one
        from samkit.train.trainer import Trainer

        real_fit = Trainer.fit

        def measure_one(*args, **kwargs):
            self.measures += 1
            if self.fail_at is not None and self.measures == self.fail_at:
                raise KeyboardInterrupt("simulated Ctrl-C while measuring")
            return real_measure(*args, **kwargs)

        def fit(trainer):
            self.fits += 1
            return real_fit(trainer)

        monkeypatch.setattr("samkit.measures.measure_one", measure_one)
        monkeypatch.setattr(Trainer, "fit", fit)


def test_interrupted_study_continues_where_it_stopped(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    per_model = len(C.measures(cfg))
    reference = C.run_correlate(cfg, name="ref", verbose=0)
    assert len(reference.rows) == 4

    # Ctrl-C in the middle of the third model's measures
    fail_at = 2 * per_model + 3
    counter = Counter(monkeypatch, fail_at=fail_at)
    with pytest.raises(KeyboardInterrupt):
        C.run_correlate(cfg, name="study", verbose=0)
    assert counter.fits == 3
    run_dir = tmp_path / "study"
    assert not list(run_dir.rglob(".*.tmp"))  # atomic writes leave no partial files
    assert not (run_dir / "report.md").exists()

    # the same call again: only the fourth model trains, only the missing measures run
    counter = Counter(monkeypatch)
    result = C.run_correlate(cfg, name="study", verbose=0)
    assert counter.fits == 1
    assert counter.measures == 4 * per_model - (fail_at - 1)
    assert numbers(result.rows) == numbers(reference.rows)
    assert [c.tau for c in result.correlations] == [c.tau for c in reference.correlations]
    for name in ("report.md", "scatter.png", "results.csv", "summary.json"):
        assert (run_dir / name).is_file()

    # the calls below are about the cache: their reports skip the figure (a second a drawing;
    # drawn above and in the --quick run)
    from samkit.experiments.correlate import report

    monkeypatch.setattr(report, "plot_scatter", lambda result, path: path)

    # and once more: everything from the cache
    counter = Counter(monkeypatch)
    again = C.run_correlate(cfg, name="study", verbose=0)
    assert (counter.fits, counter.measures) == (0, 0)
    assert numbers(again.rows) == numbers(reference.rows)

    # a new measure setting computes only the new measure
    counter = Counter(monkeypatch)
    C.run_correlate(cfg.replace(rhos_l2=(0.1, 0.3)), name="study", verbose=0)
    assert (counter.fits, counter.measures) == (0, 4)

    # a cache written before TrainConfig gained a key (at its default) is still valid
    spec_path = next((run_dir / "models").glob("*/spec.json"))
    saved = json.loads(spec_path.read_text())
    del saved["train"]["label_smoothing"]
    spec_path.write_text(json.dumps(saved))
    counter = Counter(monkeypatch)
    C.run_correlate(cfg, name="study", verbose=0)
    assert (counter.fits, counter.measures) == (0, 0)

    # changed training settings are refused, not silently mixed
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        C.run_correlate(cfg.replace(train=cfg.train.replace(momentum=0.5)), name="study",
                        verbose=0)


class StopAfter(Callback):
    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch + 1 == self.epochs:
            trainer.request_stop()


def test_model_interrupted_during_training_resumes_to_the_same_weights(tmp_path):
    cfg = tiny(tmp_path, batch_sizes=(64,), dropouts=(0.2,), stop_loss=None)
    spec = C.grid(cfg, tmp_path / "a")[0]
    reference = C.process_model(spec, cfg)
    spec_b = C.grid(cfg, tmp_path / "b")[0]
    with pytest.raises(KeyboardInterrupt, match="stopped before its end"):
        C.process_model(spec_b, cfg, callbacks=[StopAfter(2)])
    assert not (spec_b.run_dir / "measures.json").exists()
    resumed = C.process_model(spec_b, cfg)
    assert resumed[0]["epochs"] == cfg.train.epochs
    assert numbers(resumed)[0] | {"model": None, "_wall": 0, "_train_wall": 0} == numbers(
        reference)[0] | {"model": None, "_wall": 0, "_train_wall": 0}


@pytest.mark.slow  # spawns processes
def test_jobs_give_the_same_study(tmp_path):
    cfg = tiny(tmp_path, dropouts=(0.0,))
    one = C.run_correlate(cfg, name="one", verbose=0)
    two = C.run_correlate(cfg, name="two", jobs=2, verbose=0)
    assert numbers(two.rows) == numbers(one.rows)


# ------------------------------------------------------------------ the command


def test_quick_smoke_run_through_the_cli(tmp_path, capsys):
    from samkit.cli import main

    argv = ["correlate", "--quick", "--dataset", "digits", "--out-dir", str(tmp_path),
            "--set", "train.epochs=2", "steps=1", "measure_examples=64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| measure | τ vs gap" in out
    assert "adaptive sharpness" in out and "p=2:" in out
    (run_dir,) = tmp_path.glob("correlate-quick-digits-mlp-*")  # other settings: a digest
    report = (run_dir / "report.md").read_text()
    assert "samkit correlate --quick" in report
    assert "## Kendall τ" in report and "scatter.png" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["rows"]) == 8
    assert len(summary["correlations"]) == len(C.measures(C.QUICK))
    assert (run_dir / "scatter.png").stat().st_size > 1000
    # bad input: exit status 2 and a clear message
    assert main(["correlate", "--quick", "--set", "bogus=1"]) == 2
    assert "Unknown key 'bogus'" in capsys.readouterr().err
