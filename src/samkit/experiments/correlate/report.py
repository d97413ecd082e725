"""The study's report: the τ table, the comparison, the models, the scatter figure,
``results.csv``, ``summary.json`` and ``report.md``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from samkit.experiments import base
from samkit.experiments.correlate.config import config_to_dict
from samkit.experiments.correlate.stats import CorrelateResult, comparison, verdict
from samkit.measures import measures
from samkit.train.checkpoint import atomic_write_text


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def format_table(result: CorrelateResult) -> str:
    """The τ table, sorted by τ (largest first), as Markdown (readable as text)."""
    gap = "test - train error" if result.config.gap == "error" else "test - train loss"
    other = "loss gap" if result.config.gap == "error" else "error gap"
    lines = [
        f"| measure | τ vs gap ({gap}) | p-value | Ψ (granulated) | τ vs {other} | models |",
        "|---|---|---|---|---|---|",
    ]
    for c in result.correlations:
        lines.append(
            f"| {c.measure.label} | {_f(c.tau, '+.3f')} | {_p(c.pvalue)} | {_f(c.psi, '+.3f')} "
            f"| {_f(c.tau_other, '+.3f')} | {c.n} |"
        )
    return "\n".join(lines)


def format_comparison(result: CorrelateResult) -> str:
    lines = [
        "| p | plain: best τ | plain: mean τ | adaptive: best τ | adaptive: mean τ "
        "| plain: mean Ψ | adaptive: mean Ψ |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in comparison(result):
        s, a = e["sharpness"], e["adaptive"]
        lines.append(
            f"| {e['p']} | {_f(s['best_tau'], '+.3f')} | {_f(s['mean_tau'], '+.3f')} "
            f"| {_f(a['best_tau'], '+.3f')} | {_f(a['mean_tau'], '+.3f')} "
            f"| {_f(s['mean_psi'], '+.3f')} | {_f(a['mean_psi'], '+.3f')} |"
        )
    return "\n".join(lines)



def format_models(result: CorrelateResult) -> str:
    lines = [
        "| model | batch | lr | wd | dropout | α | status | epochs | train err (%) "
        "| test err (%) | gap (%) | train loss | test loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['lr']:g} | {r['weight_decay']:g} "
            f"| {r['dropout']:g} | {r['alpha']:g} | {r['status']} | {r['epochs']} "
            f"| {_f(100 * r['train_err'], '.2f')} | {_f(100 * r['test_err'], '.2f')} "
            f"| {_f(100 * r['gap_error'], '.2f')} | {_f(r['train_loss'], '.4f')} "
            f"| {_f(r['test_loss'], '.4f')} |"
        )
    return "\n".join(lines)


def plot_scatter(result: CorrelateResult, path: Path) -> Path:
    """One panel per measure: the measure (x, log scale when positive) against the gap (y),
    coloured by batch size, marker by learning rate; τ in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.included
    cors = {c.measure.key: c for c in result.correlations}
    ms = measures(result.config)
    cols = 4
    nrows = max(1, -(-len(ms) // cols))
    fig = Figure(figsize=(3.6 * cols, 3.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    gap_key = f"gap_{result.config.gap}"
    scale = 100.0 if result.config.gap == "error" else 1.0
    batch_sizes = sorted({r["batch_size"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    markers = "osD^v<>ph*"
    colors = [f"C{i}" for i in range(10)]
    for ax, m in zip(axes, ms, strict=False):
        xs_all = [r.get(m.key, math.nan) for r in rows]
        positive = all(x > 0 for x in xs_all if math.isfinite(x)) and any(
            math.isfinite(x) for x in xs_all)
        for bi, bs in enumerate(batch_sizes):
            for li, lr in enumerate(lrs):
                pts = [(r.get(m.key, math.nan), scale * r[gap_key]) for r in rows
                       if r["batch_size"] == bs and r["lr"] == lr]
                pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
                if not pts:
                    continue
                label = f"bs {bs}, lr {lr:g}" if ax is axes[0] else None
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18,
                           color=colors[bi % 10], marker=markers[li % len(markers)],
                           alpha=0.8, label=label)
        if positive:
            from samkit.plots import plain_log_axis

            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
        ax.set_xlabel(m.label + (" (log scale)" if positive else ""), fontsize="small")
        c = cors.get(m.key)
        title = m.label if c is None else f"{m.label}\nτ = {_f(c.tau, '+.2f')}"
        ax.set_title(title, fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(alpha=0.3)
        ax.set_ylabel("gap (%)" if scale == 100.0 else "loss gap", fontsize="small")
    for ax in axes[len(ms):]:
        ax.set_visible(False)
    if len(batch_sizes) * len(lrs) <= 16 and rows:
        axes[0].legend(fontsize="xx-small")
    return base.save_figure(fig, path, dpi=100)


def write_csv(result: CorrelateResult, path: Path) -> Path:
    keys: list[str] = []
    for r in result.rows:
        keys += [k for k in r if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for r in result.rows:
        writer.writerow(r)
    return atomic_write_text(path, buffer.getvalue())


def write_report(result: CorrelateResult, command: str | None = None) -> Path:
    """``report.md``, ``scatter.png``, ``results.csv`` and ``summary.json``."""
    cfg = result.config
    t = cfg.train
    plot_scatter(result, result.run_dir / "scatter.png")
    write_csv(result, result.run_dir / "results.csv")
    originals = [r for r in result.rows if r["alpha"] == 1.0]
    counts = {s: sum(r["status"] == s for r in originals)
              for s in ("converged", "unconverged", "diverged")}
    stop = (f"training loss (eval mode, full training set) <= {cfg.stop_loss:g}, checked after "
            f"every epoch, at most {t.epochs} epochs" if cfg.stop_loss is not None
            else f"a fixed budget of {t.epochs} epochs")
    lines = [
        f"# samkit correlate: {result.name}",
        "",
        f"Command: `{command}`" if command else
        "Run from Python (samkit.experiments.correlate.run_correlate).",
        "",
        f"Data: **{t.dataset}**, {t.subset or 'all'} training examples"
        + (f" (stratified, data seed {t.data_seed})" if t.subset else "")
        + (f", {100 * t.label_noise:g}% label noise" if t.label_noise else "")
        + "; test on the full test split. "
        f"Model: **{t.model}** {t.model_kwargs}, seed {t.seed}. Optimizer: {t.optimizer}, "
        f"momentum {t.momentum:g}, {t.lr_schedule} learning rate.",
        f"Grid: batch size {list(cfg.batch_sizes)} × learning rate {list(cfg.lrs)} × weight "
        f"decay {list(cfg.weight_decays)} × dropout {list(cfg.dropouts)} = "
        f"{len(originals)} models"
        + (f", plus a rescaled copy of each for α in {list(cfg.rescale)}" if cfg.rescale else "")
        + f". Stopping rule: {stop}.",
        f"Models: {counts['converged']} converged, {counts['unconverged']} missed the stopping "
        f"loss, {counts['diverged']} diverged; correlations over {len(result.included)} rows.",
        f"Measures on {cfg.measure_examples} fixed training examples (seed {cfg.seed}), model in "
        f"eval mode, cross-entropy: sharpness max L(w+ε) − L(w) over ‖ε‖_p ≤ ρ, adaptive "
        f"sharpness over ‖T_w⁻¹ε‖_p ≤ ρ with T_w = |w| + {cfg.eta:g} element-wise (biases "
        f"included); {cfg.steps} projected-gradient steps after the SAM/ASAM step"
        + (f", m = {cfg.m}" if cfg.m else "")
        + "; λ₁ by Lanczos (tol 1e-3); trace by Hutchinson "
        f"({cfg.trace_samples} vectors).",
        "",
        "## Kendall τ between each measure and the generalization gap (sorted by τ)",
        "",
        format_table(result),
        "",
        "τ: Kendall's τ_b over all models (p-value of τ = 0, two-sided). Ψ: the granulated "
        "coefficient of Jiang et al. (2020), the mean over the four hyperparameters of the mean "
        "τ over groups of models that differ in that hyperparameter only.",
        "",
        "## Adaptive against plain sharpness",
        "",
        format_comparison(result),
        "",
        verdict(result),
        "",
        "## The hyperparameters themselves (τ against the gap, for reference)",
        "",
        "| hyperparameter | τ | p-value |",
        "|---|---|---|",
    ]
    for key, v in result.hparam_taus.items():
        lines.append(f"| {key} | {_f(v['tau'], '+.3f')} | {_p(v['pvalue'])} |")
    lines += [
        "",
        "![measure against gap](scatter.png)",
        "",
        "## Models",
        "",
        format_models(result),
        "",
        f"Wall time of this invocation: {result.wall_time:.0f} s (models taken from the cache "
        "cost nothing). All numbers per model: results.csv; summary.json.",
    ]
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]
    path = base.write_markdown(result.run_dir / "report.md", lines)
    summary = {
        "name": result.name,
        "config": config_to_dict(cfg),
        "wall_time": result.wall_time,
        "correlations": [
            {"measure": c.measure.key, "label": c.measure.label, "family": c.measure.family,
             "p": None if c.measure.p is None else ("inf" if c.measure.p == math.inf else 2),
             "rho": c.measure.rho, "tau": c.tau, "pvalue": c.pvalue, "n": c.n, "psi": c.psi,
             "psi_per_hyperparameter": c.psi_per, "tau_other_gap": c.tau_other,
             "pvalue_other_gap": c.pvalue_other}
            for c in result.correlations
        ],
        "comparison": comparison(result),
        "verdict": verdict(result),
        "hyperparameters": result.hparam_taus,
        "rows": result.rows,
        "notes": result.notes,
    }
    base.write_json(result.run_dir / "summary.json", summary)
    return path
