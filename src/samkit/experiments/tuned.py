r"""``samkit compare --tune-seed SEED``: a comparison whose hyperparameters are tuned on their own
seed and whose verdict comes from paired intervals.

1. **Tuning.** A stratified share (``val_fraction``, seeded by ``data_seed``) of the training
   set is held out as the validation split. Every candidate of a method's grid
   (``sam:rho=0.01,0.02,0.05``) trains on the rest with the *tuning seed*, which is never one of
   the test seeds; the candidate with the best final validation accuracy is the method's value
   (the first one listed on ties). A method without a grid is not tuned. The table of every
   candidate is ``tune/`` (the runs), ``report.md`` and ``summary.json["tuning"]``.
2. **Test.** Every method trains at its chosen value on the *whole* training set with each test
   seed (``--seeds``) and is evaluated on the test set, which neither stage ever chooses with.
3. **Report.** Per method the mean ± std of the final test accuracy; for every pair of methods
   (each later one against each earlier one), the paired difference over the seeds both
   finished,

   .. math::
       d_s = a_s - b_s, \qquad \bar d \pm t_{n-1,\,0.975}\, s_d/\sqrt{n},

   and the verdict the interval allows (:func:`samkit.stats.verdict`: "better", "worse" or "not
   distinguishable at 95 %").

References:
    P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for Efficiently
    Improving Generalization. ICLR 2021 (rho chosen on a held-out split).
    J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from samkit.experiments import budget as B

if TYPE_CHECKING:
    from samkit.config import TrainConfig
    from samkit.experiments.compare import CompareResult, RunSummary

TUNE_DIR = "tune"  # the tuning runs' folder inside the comparison's


def check_tune_seed(tune_seed: int, seeds: list[int] | tuple[int, ...]) -> None:
    """The tuning seed must not be a test seed (its runs would choose with what they test)."""
    if tune_seed in seeds:
        raise ValueError(
            f"Invalid tune_seed: {tune_seed} is one of the test seeds {list(seeds)} (allowed: "
            "a seed outside --seeds, so that no test run shares the tuning run's "
            "initialization and data order)")


def split_for_tuning(train: Any, fraction: float, data_seed: int) -> tuple[Any, Any]:
    """``(tuning training split, validation split)``: disjoint parts of ``train`` (the
    validation split stratified, ``fraction`` of it, seeded by ``data_seed``)."""
    return B.carve_validation(train, fraction, data_seed)


def paired_rows(result: CompareResult) -> list[dict[str, Any]]:
    """For every later method against every earlier one (so that each difference a reader may
    take from the table has its interval): the per-seed final test accuracies of both, the
    paired difference (later − earlier) with its 95 % paired t interval and the verdict, over the
    seeds on which both runs finished (a diverged run's seed is left out, and said)."""
    pairs = [(result.labels[i], later) for i in range(len(result.labels))
             for later in result.labels[i + 1:]]
    return [paired_row(result, first, label) for first, label in pairs]


def paired_row(result: CompareResult, first: str, label: str) -> dict[str, Any]:
    """Run ``label`` against run ``first`` of ``result``: the final test accuracies of the seeds
    both finished, their paired difference (``label`` − ``first``) with its 95 % paired t
    interval and the verdict (keys of :func:`paired_rows`' rows)."""
    from samkit.stats import paired_difference, verdict

    ref = {r.seed: r.final_acc for r in result.by_label(first)}
    mine = {r.seed: r.final_acc for r in result.by_label(label)}
    seeds = [s for s in result.seeds if s in ref and s in mine
             and math.isfinite(ref[s]) and math.isfinite(mine[s])]
    row: dict[str, Any] = {
        "method": label, "reference": first, "seeds": seeds,
        "left_out": [s for s in result.seeds if s not in seeds],
        "method_acc": [mine[s] for s in seeds], "reference_acc": [ref[s] for s in seeds],
    }
    if len(seeds) >= 2:
        interval = paired_difference(row["method_acc"], row["reference_acc"])
        row["interval"] = interval.to_dict()
        row["verdict"] = verdict(interval)
    else:
        row["interval"] = None
        row["verdict"] = f"no interval: {len(seeds)} paired seed(s), at least 2 needed"
    return row


def train_tuned(result: CompareResult, run, base: TrainConfig, optimizers: list[str],
                seeds: list[int], data, resume: bool, overwrite: bool, verbose: int,
                command: str | None, diverged_error: type) -> CompareResult:
    """Stages 1 to 3 (the module's docstring) on ``data`` = (train, test), into ``result``."""
    from samkit.experiments import compare as K
    from samkit.experiments.compare_report import write_report

    options = result.options
    tune_seed = options.tune_seed
    check_tune_seed(tune_seed, seeds)
    candidates = {spec: B.expand_spec(spec) for spec in optimizers}
    train, test = data
    tune_train, val = split_for_tuning(train, options.val_fraction, base.data_seed)
    start = time.perf_counter()

    # 1. tuning: every candidate of every grid, on the tuning split, with the tuning seed
    grids = [c for spec in optimizers if len(candidates[spec]) > 1 for c in candidates[spec]]
    grids = list(dict.fromkeys(grids))
    tune_runs = K.run_configs(base, grids, [tune_seed], result.run_dir / TUNE_DIR)
    baseline = options.equal_budget
    total = len(tune_runs) + len(optimizers) * len(seeds) + (
        len(seeds) * (1 + (baseline not in optimizers)) if baseline is not None else 0)
    tuned: dict[str, RunSummary] = {}
    if tune_runs:
        run.claim(TUNE_DIR)
        tasks = [K._Task(cfg, label, seed, resume, overwrite, verbose, f"[{i + 1}/{total}] ",
                         " (tuning)") for i, (label, seed, cfg) in enumerate(tune_runs)]
        for summary in K._train_tasks(tasks, (tune_train, test), val, options.jobs,
                                      diverged_error):
            tuned[summary.label] = summary
    chosen: dict[str, str] = {}
    for spec in optimizers:
        if len(candidates[spec]) == 1:
            chosen[spec] = spec
            continue
        groups = {c: [tuned[c].records] for c in candidates[spec]}
        chosen[spec] = B.select_candidate(groups)
        result.selection[spec] = {c: B.mean_final(g, "val_acc") for c, g in groups.items()}
        result.tuning.extend(
            {"method": spec, "candidate": c, "seed": tune_seed, "run_dir": str(tuned[c].run_dir),
             "val_acc": B.mean_final(groups[c], "val_acc"),
             "val_loss": B.mean_final(groups[c], "val_loss"),
             "train_loss": tuned[c].train_loss, "diverged": bool(tuned[c].diverged),
             "chosen": c == chosen[spec]}
            for c in candidates[spec])
    test_labels = list(dict.fromkeys(chosen[spec] for spec in optimizers))
    if baseline is not None and baseline not in test_labels:
        test_labels.append(baseline)  # the equal-budget row needs its base-budget runs
    result.notes.append(
        f"tuned protocol: {len(val.y)} training examples ({options.val_fraction:g}, stratified, "
        f"data seed {base.data_seed}) held out; each grid's value chosen by the final validation "
        f"accuracy of one run with tuning seed {tune_seed} (not a test seed) on the other "
        f"{len(tune_train.y)}; the chosen values then trained on all {len(train.y)} training "
        f"examples with seeds {', '.join(map(str, seeds))} and evaluated on the test set")

    # 2. test: each method at its chosen value, the whole training set, every test seed
    done = len(tune_runs)
    runs = K.run_configs(base, test_labels, list(seeds), result.run_dir)
    tasks = [K._Task(cfg, label, seed, resume, overwrite, verbose,
                     f"[{done + i + 1}/{total}] ") for i, (label, seed, cfg) in enumerate(runs)]
    for summary in K._train_tasks(tasks, (train, test), None, options.jobs, diverged_error):
        result.runs.append(summary)
    result.labels.extend(test_labels)
    if baseline is not None:
        K.add_equal_budget_row(result, base, baseline, (train, test), seeds, result.run_dir,
                               resume, overwrite, verbose, None, total, diverged_error)

    # 3. the report: mean ± std, the paired differences with their intervals and verdicts
    result.differences = paired_rows(result)
    result.wall_time = time.perf_counter() - start
    write_report(result, command=command)
    return result

