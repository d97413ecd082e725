"""The report of ``samkit compare``: the table (final and best test accuracy, train loss, time
against the baseline, passes), time to accuracy, ``report.md``, ``summary.json`` and the figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from samkit.config import to_dict
from samkit.experiments import base as experiment
from samkit.experiments import budget as B
from samkit.train.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from samkit.experiments.compare import CompareResult


def format_table(result: CompareResult) -> str:
    """The comparison as a Markdown table (also readable as plain text)."""
    rows = result.rows()
    ref = rows[0]["reference"] if rows else "sgd"
    header = (
        "| optimizer | test acc final (%) | test acc best (%) | train loss | s/epoch "
        f"| time vs {ref} | passes | train s |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = row["optimizer"]
        if row.get("diverged"):
            name += f" ({row['diverged']}/{row['seeds']} seeds diverged)"
        if row.get("diverged", 0) == row["seeds"]:
            lines.append(f"| {name} | diverged | diverged | diverged | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {_pm(row['final_acc'], 100, 2)} | {_pm(row['best_acc'], 100, 2)} | "
            f"{_pm(row['train_loss'], 1, 4)} | {_num(row['time_per_epoch'], 2)} | "
            f"{_num(row['time_ratio'], 2)}x | {_count(row.get('passes', math.nan))} | "
            f"{_num(row.get('train_seconds', math.nan), 1)} |"
        )
    return "\n".join(lines)


def format_tuning(result: CompareResult) -> str:
    """The tuning stage of ``--tune-seed``: every candidate's final validation accuracy."""
    seed = result.options.tune_seed
    lines = [f"Tuning (seed {seed}, not a test seed; trained without the validation split): "
             "final validation accuracy per candidate, the chosen one in bold:", "",
             "| method | candidate | val acc (%) | val loss | train loss |",
             "|---|---|---|---|---|"]
    for t in result.tuning:
        acc = "diverged" if t["diverged"] else _num(100 * t["val_acc"], 2)
        cand = f"**{t['candidate']}**" if t["chosen"] else t["candidate"]
        lines.append(f"| {t['method']} | {cand} | {acc} | {_num(t['val_loss'], 4)} | "
                     f"{_num(t['train_loss'], 4)} |")
    return "\n".join(lines)


def format_differences(result: CompareResult) -> str:
    """The paired differences in final test accuracy (by seed) of ``result.differences``."""
    lines = ["Paired differences in final test accuracy (paired by seed; 95 % paired t interval "
             "over the seeds; the verdict follows from the interval):", "",
             "| difference | seeds | mean (points) | 95 % interval (points) | verdict |",
             "|---|---|---|---|---|"]
    for d in result.differences:
        iv = d["interval"]
        mean, ci = "-", "-"
        if iv is not None:
            mean = f"{100 * iv['estimate']:+.2f}"
            ci = f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}]"
        left = f" (left out: {', '.join(map(str, d['left_out']))})" if d["left_out"] else ""
        lines.append(f"| {d['method']} − {d['reference']} | {len(d['seeds'])}{left} | {mean} | "
                     f"{ci} | {d['verdict']} |")
    return "\n".join(lines)


def _count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def format_time_to_accuracy(result: CompareResult) -> str:
    """Seconds and passes each method needs to reach the reference row's final accuracy."""
    rows = result.rows()
    if not rows:
        return ""
    ref = next(r for r in rows if r["optimizer"] == rows[0]["reference"])
    target = ref["final_acc"][0]
    if math.isnan(target):
        return ""
    lines = [f"Time to reach {ref['optimizer']}'s final test accuracy ({100 * target:.2f} %), "
             "mean curve over seeds, at epoch ends:", "",
             "| optimizer | training s | passes |", "|---|---|---|"]
    for label in result.labels:
        secs, passes = B.time_to_accuracy([r.records for r in result.by_label(label)], target)
        lines.append(f"| {label} | {'never' if math.isnan(secs) else f'{secs:.1f}'} | "
                     f"{'never' if math.isnan(passes) else _count(passes)} |")
    return "\n".join(lines)


def _num(value: float, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(mean_std: tuple[float, float], scale: float, digits: int) -> str:
    """``mean ± std``; the mean alone (``(1 seed)``) when there is no spread to show."""
    mean, std = mean_std
    if mean is None or not math.isfinite(mean):
        return "-"
    def fmt(v: float) -> str:  # a huge (nearly diverged) loss as 6.2e+22, not 23 digits
        return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.{digits}f}"

    if std is None or not math.isfinite(std):
        return f"{fmt(scale * mean)} (1 seed)"
    return f"{fmt(scale * mean)} ± {fmt(scale * std)}"


def write_report(result: CompareResult, command: str | None = None) -> Path:
    """``report.md``, ``curves.png`` and ``summary.json`` in the comparison's directory."""
    from samkit.plots import plot_learning_curves

    cfg = result.config
    groups = {label: [r.records for r in result.by_label(label)] for label in result.labels}
    title = f"{cfg.dataset}, {cfg.model}" + (
        f", {round(100 * cfg.label_noise)}% label noise" if cfg.label_noise else ""
    )
    plot_learning_curves(groups, result.run_dir / "curves.png", title=title)
    B.plot_time_to_accuracy(groups, result.run_dir / "time_to_accuracy.png", title=title)
    seeds = ", ".join(str(s) for s in result.seeds)
    train_n = cfg.subset if cfg.subset else "all"
    lines = [
        f"# samkit compare: {result.name}",
        "",
        f"Command: `{command}`" if command else "Run from Python (samkit.experiments.run_compare).",
        "",
        f"Data: **{cfg.dataset}**, {train_n} training examples"
        + (f" (stratified, data seed {cfg.data_seed})" if cfg.subset else "")
        + (f", {100 * cfg.label_noise:g}% symmetric label noise" if cfg.label_noise else "")
        + ". Test accuracy on the full test split.",
        f"Model: **{cfg.model}** {cfg.model_kwargs or ''}. Budget: "
        + (f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs} epochs")
        + f", batch {cfg.batch_size or 'full'}, lr {cfg.lr:g} ({cfg.lr_schedule}), momentum "
        f"{cfg.momentum:g}, weight decay {cfg.weight_decay:g}, label smoothing "
        f"{cfg.label_smoothing:g}. Seeds: {seeds}.",
        "",
        format_table(result),
        "",
        "Mean ± standard deviation over seeds. *final*: after the last epoch; *best*: the best "
        "epoch (an optimistic number, shown for reference). *train loss*: mean loss of the last "
        "epoch at the weights w (first pass). *s/epoch*: training time only, without evaluation.",
        "",
        "![learning curves](curves.png)",
        "",
        format_time_to_accuracy(result),
        "",
        "![test accuracy against training time and passes](time_to_accuracy.png)",
        "",
        "*passes*: forward-backward passes per run (SAM: 2 per step; MESA's EMA forward and the "
        "evaluations are not counted). *train s*: seconds spent in the optimizer steps, "
        "measured on this machine (a busy machine inflates them).",
        "",
        f"Wall time: {result.wall_time:.0f} s. Runs:",
        "",
    ]
    for run in result.runs:
        if run.diverged:
            lines.append(f"- `{run.run_dir.name}`: **diverged** at step {run.diverged['step']} "
                         f"({run.diverged.get('message', '')})")
            continue
        lines.append(
            f"- `{run.run_dir.name}`: final {100 * run.final_acc:.2f}%, best "
            f"{100 * run.best_acc:.2f}%, {run.time_per_epoch:.2f} s/epoch"
        )
    if result.tuning:
        lines += ["", format_tuning(result)]
    else:
        for spec, scores in result.selection.items():
            lines += ["", f"Grid `{spec}`: mean final validation accuracy per candidate "
                      "(the best one is the method's row):", ""]
            lines += [f"- `{c}`: {100 * v:.2f} %" for c, v in scores.items()]
    if result.differences:
        lines += ["", format_differences(result)]
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]
    path = atomic_write_text(result.run_dir / "report.md", "\n".join(lines) + "\n")
    summary = {
        "name": result.name,
        "config": to_dict(cfg),
        "optimizers": result.labels,
        "seeds": result.seeds,
        "wall_time": result.wall_time,
        "rows": result.rows(),
        "selection": result.selection,
        "equal_budget": result.equal_budget_label,
        "options": to_dict(result.options),
        "runs": [
            {"optimizer": r.label, "seed": r.seed, "dir": str(r.run_dir), "final_acc": r.final_acc,
             "best_acc": r.best_acc, "train_loss": r.train_loss,
             "time_per_epoch": r.time_per_epoch, "passes": r.last("passes"),
             "train_seconds": r.last("step_seconds"),
             "diverged_at": r.diverged["step"] if r.diverged else None}
            for r in result.runs
        ],
        "notes": result.notes,
        "tuning": result.tuning,
        "differences": result.differences,
    }
    experiment.write_json(result.run_dir / "summary.json", summary)
    return path
