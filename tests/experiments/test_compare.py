"""samkit.experiments.compare: specs, the table, the report, the shipped configs, the plots;
and one real-data comparison on Fashion-MNIST (slow)."""

import math
from pathlib import Path

import numpy as np
import pytest
from realdata import require_fashion_mnist

from samkit.config import to_dict
from samkit.experiments.compare import (
    DEFAULT,
    CompareResult,
    RunSummary,
    format_table,
    parse_optimizer_spec,
    run_compare,
    run_configs,
    write_report,
)
from samkit.plots import curve, plot_learning_curves
from samkit.train import TrainConfig, load_config

CONFIGS = Path(__file__).parents[2] / "configs"


def records(accs, losses, time=1.0):
    return [
        {"event": "epoch", "epoch": i + 1, "epochs": len(accs), "step": 10 * (i + 1),
         "test_acc": a, "train_loss": loss, "epoch_time": time}
        for i, (a, loss) in enumerate(zip(accs, losses, strict=True))
    ]


def test_parse_optimizer_spec():
    assert parse_optimizer_spec("sam") == ("sam", [])
    assert parse_optimizer_spec("asam:rho=1.0, eta=0.02") == ("asam", ["rho=1.0", "eta=0.02"])
    with pytest.raises(ValueError, match="Invalid optimizer spec"):
        parse_optimizer_spec(":rho=1")


def test_run_configs_apply_per_optimizer_settings(tmp_path):
    runs = run_configs(DEFAULT, ["sgd", "asam:rho=1.0"], [0, 3], tmp_path / "c")
    assert [(label, seed) for label, seed, _ in runs] == [
        ("sgd", 0), ("sgd", 3), ("asam:rho=1.0", 0), ("asam:rho=1.0", 3)]
    cfg = runs[3][2]
    assert (cfg.optimizer, cfg.rho, cfg.seed, cfg.run_dir) == ("asam", 1.0, 3,
                                                              tmp_path / "c" / "asam_rho1.0-s3")
    with pytest.raises(ValueError, match="Unknown key 'rhoo'"):
        run_configs(DEFAULT, ["sam:rhoo=1"], [0], tmp_path)


def test_table_and_report(tmp_path):
    cfg = DEFAULT.replace(out_dir=str(tmp_path))
    result = CompareResult("t", tmp_path / "t", cfg, ["sgd", "sam"], [0, 1])
    result.runs = [
        RunSummary("sgd", 0, tmp_path / "a", records([0.5, 0.80], [1.0, 0.5], 1.0)),
        RunSummary("sgd", 1, tmp_path / "b", records([0.6, 0.82], [1.0, 0.7], 1.0)),
        RunSummary("sam", 0, tmp_path / "c", records([0.5, 0.84], [1.0, 0.6], 2.0)),
        RunSummary("sam", 1, tmp_path / "d", records([0.9, 0.86], [1.0, 0.6], 2.2)),
    ]
    rows = result.rows()
    assert rows[0]["final_acc"] == pytest.approx((0.81, np.std([0.80, 0.82], ddof=1)))
    assert rows[1]["best_acc"][0] == pytest.approx((0.84 + 0.9) / 2)
    assert rows[1]["time_ratio"] == pytest.approx(2.1)
    table = format_table(result)
    assert "| sam | 85.00 ± 1.41 | 87.00 ± 4.24 | 0.6000 ± 0.0000 | 2.10 | 2.10x |" in table
    write_report(result, command="samkit compare --seeds 0 1")
    report = (tmp_path / "t" / "report.md").read_text()
    assert "`samkit compare --seeds 0 1`" in report and table in report
    assert (tmp_path / "t" / "curves.png").stat().st_size > 1000


def test_curve_mean_and_std_over_runs():
    epochs, mean, std = curve([records([0.1, 0.2], [1, 1]), records([0.3], [1])], "test_acc")
    assert epochs.tolist() == [1, 2]
    assert mean == pytest.approx([0.2, 0.2]) and std == pytest.approx([math.sqrt(0.02), 0.0])


def test_plot_needs_groups(tmp_path):
    with pytest.raises(ValueError, match="at least one group"):
        plot_learning_curves({}, tmp_path / "x.png")


def test_default_matches_the_shipped_config():
    shipped = load_config(CONFIGS / "fashion-mnist-mlp.yaml")
    assert to_dict(shipped) == to_dict(DEFAULT)


TRAIN_CONFIGS = sorted(CONFIGS.glob("asam-paper/*.yaml")) + [
    CONFIGS / name
    for name in (
        "fashion-mnist-mlp.yaml", "digits-mlp-quick.yaml", "fashion-mnist-cnn-fullbatch.yaml"
    )
]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_training_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("model", ["wrn28-10", "resnet56"])
def test_asam_paper_settings(dataset, model):
    rhos = {"cifar10": {"sam": 0.05, "asam": 0.5}, "cifar100": {"sam": 0.1, "asam": 1.0}}
    for opt in ("sam", "asam"):
        cfg = load_config(CONFIGS / "asam-paper" / f"{dataset}-{model}-{opt}.yaml")
        assert (cfg.dataset, cfg.model, cfg.optimizer, cfg.rho) == (dataset, model, opt,
                                                                   rhos[dataset][opt])
        assert (cfg.epochs, cfg.lr_schedule, cfg.label_smoothing, cfg.lr, cfg.batch_size) == (
            200, "cosine", 0.1, 0.1, 128)
        assert (cfg.momentum, cfg.weight_decay, cfg.augment) == (0.9, 5e-4, True)
        if opt == "asam":
            assert cfg.eta == 0.01


@pytest.mark.slow
def test_real_fashion_mnist_compare(tmp_path):
    require_fashion_mnist()
    base = DEFAULT.replace(subset=3000, epochs=3, label_noise=0.0, out_dir=str(tmp_path))
    result = run_compare(base, ["sgd", "sam", "asam"], [0, 1], name="fm", verbose=0)
    rows = {row["optimizer"]: row for row in result.rows()}
    for row in rows.values():
        assert row["final_acc"][0] > 0.75  # an MLP on 3,000 examples, 3 epochs: about 80%
    assert (tmp_path / "fm" / "report.md").exists()


@pytest.mark.slow  # spawns processes
def test_jobs_train_the_same_runs_in_two_processes(tmp_path):
    """--jobs 2 trains the runs in two spawned processes: the same numbers as one at a time
    (each run is seeded and single-threaded), in the same order."""
    from samkit.experiments.budget import CompareOptions

    base = DEFAULT.replace(dataset="digits", subset=None, epochs=2, batch_size=64,
                           out_dir=str(tmp_path), label_noise=0.0)
    results = {}
    for jobs in (1, 2):
        result = run_compare(base, ["sgd", "sam"], [0, 1], name=f"j{jobs}", verbose=0,
                             options=CompareOptions(jobs=jobs))
        results[jobs] = [(r.label, r.seed, r.records[-1]["test_acc"], r.records[-1]["train_loss"])
                         for r in result.runs]
    assert results[1] == results[2]
    assert [(label, seed) for label, seed, *_ in results[2]] == [
        ("sgd", 0), ("sgd", 1), ("sam", 0), ("sam", 1)]


def _fail_on_two(task):
    if task == 2:
        raise ValueError("task 2 failed")
    return task * 10


def test_map_jobs_in_order_here_and_bad_jobs():
    from samkit.experiments.base import map_jobs

    assert map_jobs(_fail_on_two, [0, 1, 3], jobs=1) == [0, 10, 30]
    with pytest.raises(ValueError, match="task 2 failed"):
        map_jobs(_fail_on_two, [0, 2, 3], jobs=1)
    with pytest.raises(ValueError, match="Invalid jobs"):
        map_jobs(_fail_on_two, [0], jobs=0)


@pytest.mark.slow  # spawns processes
def test_map_jobs_keeps_the_order_and_raises_the_first_error():
    from samkit.experiments.base import map_jobs

    assert map_jobs(_fail_on_two, [0, 1, 3, 4], jobs=2) == [0, 10, 30, 40]
    with pytest.raises(ValueError, match="task 2 failed"):
        map_jobs(_fail_on_two, [0, 2, 3], jobs=2)
