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
from samkit.experiments.correlate.stats import CorrelateResult, comparison, verdicts
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


def _ci(d: Any) -> str:
    """``+0.560 [+0.410, +0.690]`` from an Interval or its dict."""
    if d is None:
        return "n/a"
    if not isinstance(d, dict):
        d = d.to_dict()
    return f"{_f(d['estimate'], '+.3f')} [{_f(d['low'], '+.3f')}, {_f(d['high'], '+.3f')}]"


def format_table(result: CorrelateResult) -> str:
    """The τ table, sorted by τ (largest first), as Markdown (readable as text): τ with its 95 %
    bootstrap interval over the models, Ψ with its per-hyperparameter parts."""
    from samkit.experiments.correlate.grid import HYPERPARAMETERS

    gap = "test - train error" if result.config.gap == "error" else "test - train loss"
    other = "loss gap" if result.config.gap == "error" else "error gap"
    short = {"batch_size": "bs", "lr": "lr", "weight_decay": "wd", "dropout": "do",
             "alpha": "α"}
    keys = [*HYPERPARAMETERS, *(("alpha",) if result.config.rescale else ())]
    lines = [
        f"| measure | τ vs gap ({gap}) [95 % CI] | p-value | Ψ (granulated) | Ψ parts "
        f"({' / '.join(short[k] for k in keys)}) | τ vs {other} [95 % CI] | models |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.correlations:
        parts = " / ".join(_f(c.psi_per.get(k, math.nan), "+.2f") for k in keys)
        lines.append(
            f"| {c.measure.label} | {_ci(c.interval)} | {_p(c.pvalue)} | {_f(c.psi, '+.3f')} "
            f"| {parts} | {_ci(c.interval_other)} | {c.n} |"
        )
    return "\n".join(lines)


def format_comparison(result: CorrelateResult, entries: list[dict[str, Any]] | None = None
                      ) -> str:
    """Adaptive against plain sharpness per group: best τ (its radius) with intervals, the
    paired differences adaptive − plain of the best and of the mean τ with their intervals and
    verdicts, the mean Ψ."""
    lines = [
        "| group | plain: best τ [95 % CI] | adaptive: best τ [95 % CI] | best: adaptive − plain "
        "[95 % CI] | verdict | mean τ plain / adaptive | mean: adaptive − plain [95 % CI] "
        "| verdict | mean Ψ plain / adaptive | models |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in comparison(result) if entries is None else entries:
        s, a = e["sharpness"], e["adaptive"]
        lines.append(
            f"| {e['group']} | {_ci(s['best_interval'])} ({_rho(s['best_measure'])}) "
            f"| {_ci(a['best_interval'])} ({_rho(a['best_measure'])}) "
            f"| {_ci(e['best_difference'])} | {e['best_verdict']} "
            f"| {_f(s['mean_tau'], '+.3f')} / {_f(a['mean_tau'], '+.3f')} "
            f"| {_ci(e['mean_difference'])} | {e['mean_verdict']} "
            f"| {_f(s['mean_psi'], '+.3f')} / {_f(a['mean_psi'], '+.3f')} "
            f"| {e['best_difference']['n']} |"
        )
    return "\n".join(lines)


def _rho(label: str | None) -> str:
    """The radius part of a measure's label (``ρ=0.1``, ``σ=0.2``)."""
    if not label:
        return "n/a"
    return label.split(" (")[0].split(" ")[-1]


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


def _measures_sentence(cfg) -> str:
    """What the measures are, with the preset they follow and what differs from it."""
    from samkit.experiments.correlate.config import preset_changes
    from samkit.measures import PRESET_SOURCES

    changes = preset_changes(cfg)
    worst = (f"worst case: max L(w+ε) − L(w) over ‖ε‖_p ≤ ρ (plain) or ‖T_w⁻¹ε‖_p ≤ ρ "
             f"(adaptive, T_w = |w| + {cfg.eta:g} element-wise, biases included) by projected "
             f"ascent ({cfg.starts or 8} start(s), {cfg.steps} steps after the SAM/ASAM step)"
             + (f", per micro-batch of m = {cfg.m} examples, averaged (m-sharpness)"
                if cfg.m else ""))
    avg = any(getattr(cfg, k) for k in ("avg_sigmas", "avg_sigmas_uniform",
                                        "adaptive_avg_sigmas", "adaptive_avg_sigmas_uniform"))
    return (
        f"Measures (preset **{cfg.preset}**: {PRESET_SOURCES[cfg.preset]}"
        + (f"; changed: {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")
        + f") on {cfg.measure_examples} fixed training examples (seed {cfg.seed}), model in "
        f"eval mode, cross-entropy"
        + (" of the logit-normalized model" if cfg.normalize_logits else "") + ": " + worst
        + ("; average case: E L(w + σ T_w z) − L(w), z Gaussian or uniform in [−1, 1], "
           f"{cfg.avg_samples} seeded draws" if avg else "")
        + ("; beside each loss increase the error increase (error at the perturbed weights − "
           "error at w)" if cfg.error_increase else "")
        + f"; λ₁ by Lanczos (tol 1e-3); trace by Hutchinson ({cfg.trace_samples} vectors)."
    )


def write_report(result: CorrelateResult, command: str | None = None) -> Path:
    """``report.md``, ``scatter.png``, ``results.csv`` and ``summary.json``."""
    cfg = result.config
    t = cfg.train
    entries = comparison(result)
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
        _measures_sentence(cfg),
        "",
        "## Kendall τ between each measure and the generalization gap (sorted by τ)",
        "",
        format_table(result),
        "",
        "τ: Kendall's τ_b over all models, with its 95 % BCa bootstrap interval over the models "
        f"({cfg.resamples} resamples; a model drawn twice is a tie) and the two-sided p-value of "
        "τ = 0. Ψ: the granulated coefficient of Jiang et al. (2020): for each hyperparameter "
        "(the parts), the mean τ over the groups of models that differ in that hyperparameter "
        "only; Ψ is their mean. Ψ has no interval: a bootstrap over models breaks the groups it "
        "is made of.",
        "",
        "## Adaptive against plain sharpness",
        "",
        format_comparison(result, entries),
        "",
        "Within each group (same kind, p and quantity), each family's best τ over its radii and "
        "its mean τ; the differences adaptive − plain are paired (both τ on the same bootstrap "
        "resample of the models) and the best and the mean are taken again in every resample, "
        "so the interval includes the choice of the best radius. The verdicts follow from the "
        "intervals alone: better (or worse) only when the whole 95 % interval is above (below) "
        "zero.",
        "",
        *[f"- {v}" for v in verdicts(result, entries)],
        "",
        "## The hyperparameters themselves (τ against the gap, for reference)",
        "",
        "| hyperparameter | τ [95 % CI] | p-value | models |",
        "|---|---|---|---|",
    ]
    for key, v in result.hparam_taus.items():
        lines.append(f"| {key} | {_ci(v['interval'])} | {_p(v['pvalue'])} | {v['n']} |")
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
             "kind": c.measure.kind, "quantity": c.measure.quantity,
             "rho": c.measure.rho, "tau": c.tau, "pvalue": c.pvalue, "n": c.n, "psi": c.psi,
             "tau_interval": c.interval.to_dict() if c.interval else None,
             "psi_per_hyperparameter": c.psi_per, "tau_other_gap": c.tau_other,
             "pvalue_other_gap": c.pvalue_other,
             "tau_other_gap_interval": c.interval_other.to_dict() if c.interval_other else None}
            for c in result.correlations
        ],
        "comparison": entries,
        "verdicts": verdicts(result, entries),
        "hyperparameters": result.hparam_taus,
        "rows": result.rows,
        "notes": result.notes,
    }
    base.write_json(result.run_dir / "summary.json", summary)
    return path
