"""`samkit compare --tune-seed`: rho chosen on a validation split with a seed of its own, the
chosen values trained on the test seeds, paired differences with their intervals and verdicts."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from samkit.cli import build_parser
from samkit.experiments import budget as B
from samkit.experiments import compare, tuned
from samkit.experiments.compare import CompareResult, RunSummary, _slug, run_compare
from samkit.train import TrainConfig
from samkit.train.logs import read_metrics

# the module's tests on one xdist worker (make fast: --dist loadgroup), so that the tuned
# comparison of the module-scoped fixture below runs once, not once a worker
pytestmark = pytest.mark.xdist_group("tuned")

GRIDS = ["sam:rho=0.01,0.2", "asam:rho=0.1,2.0"]
TUNE_SEED, SEEDS = 7, [0, 1, 2]


def quick(tmp_path, **kw):
    values = dict(dataset="digits", model="mlp", model_kwargs={"width": 32}, epochs=1,
                  batch_size=128, lr=0.1, threads=1, out_dir=str(tmp_path), checkpoint=False)
    values.update(kw)
    return TrainConfig(**values)


def epochs(records):
    return [r for r in records if r.get("event") == "epoch"]


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """One tuned comparison on scikit-learn's digits (1 epoch, a 2-value grid per method)."""
    tmp_path = tmp_path_factory.mktemp("tuned")
    options = B.CompareOptions(tune_seed=TUNE_SEED, val_fraction=0.2)
    result = run_compare(quick(tmp_path), GRIDS, SEEDS, name="t", verbose=0, options=options)
    return tmp_path / "t", result


def test_the_tuning_seed_is_never_a_test_seed(protocol, tmp_path):
    run_dir, result = protocol
    assert {t["seed"] for t in result.tuning} == {TUNE_SEED}
    for t in result.tuning:  # what the tuning runs really trained with
        assert _config(t["run_dir"])["seed"] == TUNE_SEED
    assert sorted({r.seed for r in result.runs}) == SEEDS
    assert all(_config(r.run_dir)["seed"] in SEEDS for r in result.runs)
    with pytest.raises(ValueError, match="Invalid tune_seed: 1 is one of the test seeds"):
        run_compare(quick(tmp_path), GRIDS, SEEDS, name="bad", verbose=0,
                    options=B.CompareOptions(tune_seed=1))
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="Invalid tune_seed"):
        B.CompareOptions(tune_seed=-1)


def _config(run_dir):
    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


def test_the_validation_split_overlaps_neither_the_training_nor_the_test_data():
    from samkit.experiments.base import load_data

    cfg = TrainConfig(dataset="digits")
    train, test = load_data(cfg)
    part, val = tuned.split_for_tuning(train, 0.2, cfg.data_seed)
    assert len(part.y) + len(val.y) == len(train.y) and len(val.y) == round(0.2 * len(train.y))
    rows = {tuple(r) for r in train.x.flatten(1).tolist()}
    part_rows = [tuple(r) for r in part.x.flatten(1).tolist()]
    val_rows = [tuple(r) for r in val.x.flatten(1).tolist()]
    # every validation example is a training example, and none is in the tuning runs' data
    assert set(val_rows) <= rows
    assert not set(val_rows) & set(part_rows)
    # nor in the test split (digits' test images are other images)
    assert not set(val_rows) & {tuple(r) for r in test.x.flatten(1).tolist()}


def test_tuning_runs_train_without_the_validation_split_and_test_runs_on_all_of_it(protocol):
    run_dir, result = protocol
    n_train = 1438  # scikit-learn's digits, samkit's train split
    n_val = round(0.2 * n_train)
    steps = {r["run_dir"]: epochs(read_metrics(f"{r['run_dir']}/metrics.jsonl"))[-1]["step"]
             for r in result.tuning}
    assert set(steps.values()) == {math.ceil((n_train - n_val) / 128)}
    assert {epochs(r.records)[-1]["step"] for r in result.runs} == {math.ceil(n_train / 128)}
    assert all(r.run_dir.parent == run_dir for r in result.runs)
    assert all(str(run_dir / tuned.TUNE_DIR) in t["run_dir"] for t in result.tuning)


def test_the_choice_is_the_argmax_of_validation_accuracy(protocol):
    run_dir, result = protocol
    for spec in GRIDS:
        rows = [t for t in result.tuning if t["method"] == spec]
        assert [t["candidate"] for t in rows] == B.expand_spec(spec)
        val = [epochs(read_metrics(f"{t['run_dir']}/metrics.jsonl"))[-1]["val_acc"]
               for t in rows]
        assert [t["val_acc"] for t in rows] == val  # the table is the runs' own figure
        best = int(np.argmax(val))  # the first of the best on ties
        assert [t["chosen"] for t in rows] == [i == best for i in range(len(rows))]
        assert rows[best]["candidate"] in result.labels
    assert result.labels == [next(t["candidate"] for t in result.tuning
                                  if t["method"] == spec and t["chosen"]) for spec in GRIDS]


def test_the_reports_numbers_come_from_the_runs(protocol):
    from scipy.stats import t as student_t  # here: collecting the suite need not import scipy

    run_dir, result = protocol
    final = {}
    for label in result.labels:
        for seed in SEEDS:
            records = epochs(read_metrics(run_dir / f"{_slug(label)}-s{seed}" / "metrics.jsonl"))
            final[label, seed] = records[-1]["test_acc"]
    sam, asam = result.labels
    d = np.array([final[asam, s] - final[sam, s] for s in SEEDS])
    half = student_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    summary = json.loads((run_dir / "summary.json").read_text())
    (diff,) = summary["differences"]
    assert (diff["method"], diff["reference"], diff["seeds"]) == (asam, sam, SEEDS)
    assert diff["interval"]["estimate"] == pytest.approx(d.mean())
    assert diff["interval"]["low"] == pytest.approx(d.mean() - half)
    assert diff["interval"]["high"] == pytest.approx(d.mean() + half)
    expected = ("better" if d.mean() - half > 0 else "worse" if d.mean() + half < 0
                else "not distinguishable at 95 %")
    assert diff["verdict"] == expected
    report = (run_dir / "report.md").read_text()
    assert (f"| {asam} − {sam} | 3 | {100 * d.mean():+.2f} | "
            f"[{100 * (d.mean() - half):+.2f}, {100 * (d.mean() + half):+.2f}] | {expected} |"
            ) in report
    mean = np.mean([final[asam, s] for s in SEEDS])
    std = np.std([final[asam, s] for s in SEEDS], ddof=1)
    assert f"| {asam} | {100 * mean:.2f} ± {100 * std:.2f} |" in report
    assert f"Tuning (seed {TUNE_SEED}" in report
    assert summary["options"]["tune_seed"] == TUNE_SEED and len(summary["tuning"]) == 4


def _records(acc):
    return [{"event": "epoch", "epoch": 1, "step": 1, "test_acc": acc, "train_loss": 1.0,
             "epoch_time": 1.0}]


A = [0.80, 0.81, 0.82, 0.83]  # method a's accuracy per seed in the constructed comparisons


def _three_methods(tmp_path, c_offset):
    """A comparison of a, b (a + 0.05 + 0.001 s) and c (a + c_offset(s)) over seeds 0-3."""
    result = CompareResult("c", tmp_path, TrainConfig(dataset="digits"), ["a", "b", "c"],
                           [0, 1, 2, 3])
    for s in range(4):
        result.runs += [RunSummary("a", s, tmp_path, _records(A[s])),
                        RunSummary("b", s, tmp_path, _records(A[s] + 0.05 + 0.001 * s)),
                        RunSummary("c", s, tmp_path, _records(A[s] + c_offset(s)))]
    return result


def test_paired_rows_on_constructed_runs_with_a_known_answer(tmp_path):
    result = _three_methods(tmp_path, lambda s: (0.01, -0.01)[s % 2])
    result.runs.append(RunSummary("d", 0, tmp_path, [{"event": "diverged", "step": 3}]))
    b, c, c_b = tuned.paired_rows(result)
    assert (b["method"], b["reference"], c["method"], c["reference"]) == ("b", "a", "c", "a")
    assert (c_b["method"], c_b["reference"]) == ("c", "b")
    assert b["verdict"] == "better" and b["interval"]["estimate"] == pytest.approx(0.0515)
    assert c["verdict"] == "not distinguishable at 95 %"
    assert c["interval"]["estimate"] == pytest.approx(0.0)
    # a seed on which one run diverged is left out of the pairing, and said
    result.labels.append("d")
    result.runs += [RunSummary("d", s, tmp_path, _records(A[s] - 0.1 - 0.001 * s))
                    for s in (1, 2, 3)]
    d = next(r for r in tuned.paired_rows(result) if (r["method"], r["reference"]) == ("d", "a"))
    assert d["seeds"] == [1, 2, 3] and d["left_out"] == [0] and d["verdict"] == "worse"


def test_the_flag_reaches_the_options():
    args = build_parser().parse_args(["compare", "--tune-seed", "100", "--seeds", "0", "1"])
    _, _, seeds, options, _ = compare.inputs_from_args(args)
    assert options.tune_seed == 100 and seeds == [0, 1]
    args = build_parser().parse_args(["compare"])
    assert compare.inputs_from_args(args)[3].tune_seed is None


def test_every_pair_has_its_interval(tmp_path):
    result = _three_methods(tmp_path, lambda s: 0.02 - 0.001 * s)
    rows = tuned.paired_rows(result)
    assert [(r["method"], r["reference"]) for r in rows] == [("b", "a"), ("c", "a"), ("c", "b")]
    c_b = rows[-1]
    assert c_b["interval"]["estimate"] == pytest.approx(-0.033)  # -0.03 - 0.002 s
    assert c_b["verdict"] == "worse"


def test_a_plain_comparison_reports_every_paired_difference(tmp_path):
    base = quick(tmp_path)
    result = run_compare(base, ["sgd", "sam:rho=0.05", "asam:rho=0.5"], seeds=[0, 1],
                         name="plain", verbose=0)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    pairs = [(d["method"], d["reference"]) for d in summary["differences"]]
    sgd, sam, asam = result.labels
    assert pairs == [(sam, sgd), (asam, sgd), (asam, sam)]
    final = {(r.label, r.seed): r.final_acc for r in result.runs}
    d = np.array([final[asam, s] - final[sam, s] for s in (0, 1)])
    assert summary["differences"][-1]["interval"]["estimate"] == pytest.approx(d.mean())
    assert "Paired differences in final test accuracy" in (result.run_dir / "report.md").read_text()
