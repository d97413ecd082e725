r"""``samkit eos``'s summary, table, figures and report: the median of λ₁/edge over the second
half of training and the first step at which λ₁ reaches the edge, for every run; λ₁ against
2/η and the SAM-edge; ``summary.json`` and ``report.md``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samkit import config as C
from samkit.experiments import base as experiment

if TYPE_CHECKING:
    from samkit.experiments.eos import EOSResult, RunResult

# The band of "at the edge": a measurement is at the edge when λ₁/edge lies within ±10 %.
# Lanczos is converged to tol 1e-3 and ‖g‖ swings by tens of percent between steps, so a
# tighter band would count noise as leaving; a wider one (the old [0.8, 1.3]) let a 28 %
# systematic excess pass as "at the edge".
EDGE_BAND = (0.9, 1.1)
# The acceptance bands of the median λ₁/edge over the second half ("in band"): the same band.
GD_BAND = EDGE_BAND
SAM_BAND = EDGE_BAND
# No verdict (at the edge, above it, left it, "in band") on fewer measurements than this: one
# or two values of λ₁/edge say nothing about where a trace settles.
MIN_MEASUREMENTS = 5


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def diagnose(rows: Sequence[dict[str, Any]], band: tuple[float, float] = EDGE_BAND,
             key: str = "ratio", name: str = "λ₁/edge") -> dict[str, Any]:
    r"""Where a trace of λ₁/edge stands against the edge: reached, stayed, left, above.

    ``rows`` are tracker rows (``step``, ``ratio`` = λ₁/edge, optionally ``loss``), in step
    order; rows without a finite ``ratio`` (``key``) are skipped; ``name`` is the ratio's name
    in the verdict. With the band :math:`[a, b]`
    (default :data:`EDGE_BAND` = [0.9, 1.1]) a measurement is *at the edge* when
    :math:`a \le \lambda_1/\text{edge} \le b`. Returns

    * ``max_ratio``, ``max_ratio_step``: the largest λ₁/edge and where;
    * ``first_crossing_step``: the first step with λ₁/edge ≥ a (the trace reaches the edge's
      band, from below or — when it starts above it — at once); ``None``: never reached;
    * ``fraction_at_edge_after_crossing``: the share of the measurements from that step on
      that are at the edge; ``fraction_above_after_crossing``, ``fraction_below_after_crossing``
      the shares above b and below a;
    * ``median_ratio_after_crossing``;
    * ``last_step_at_edge``: the last step at the edge (``None``: never);
    * ``left_edge``: the measurements after ``last_step_at_edge`` are all below the band (the
      trace reached the edge and fell away from it), and at least one exists;
    * ``excess``: the median after crossing lies above b (λ₁ sits *above* the edge, a
      systematic excess, not the edge of stability as the closed form states it);
    * ``verdict``: the above in one sentence, e.g. "reached the edge at step 575, at it 18 %
      of the measurements since, left it at step 700 (loss 0.21 → 0.015; final λ₁/edge 0.50)";
    * ``too_few``: fewer than :data:`MIN_MEASUREMENTS` finite ratios: then only ``max_ratio``
      is filled in and the verdict is "too few measurements (n) for a verdict".
    """
    a, b = band
    pts = [r for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    out: dict[str, Any] = {
        "band": [a, b], "max_ratio": None, "max_ratio_step": None, "first_crossing_step": None,
        "fraction_at_edge_after_crossing": None, "fraction_above_after_crossing": None,
        "fraction_below_after_crossing": None, "median_ratio_after_crossing": None,
        "last_step_at_edge": None, "left_edge": False, "excess": False,
        "too_few": len(pts) < MIN_MEASUREMENTS,
    }
    if not pts:
        out["verdict"] = f"no measurement of {name} (no edge applies, or no finite λ₁)"
        return out
    top = max(pts, key=lambda r: r[key])
    out["max_ratio"], out["max_ratio_step"] = float(top[key]), int(top["step"])
    if out["too_few"]:
        out["verdict"] = (f"too few measurements ({len(pts)}) for a verdict (at least "
                          f"{MIN_MEASUREMENTS} of {name}; measure more often: a smaller "
                          f"--every, --budget none or more --steps); max {name} "
                          f"{top[key]:.2f}")
        return out
    first = next((i for i, r in enumerate(pts) if r[key] >= a), None)
    final = pts[-1][key]
    if first is None:
        out["verdict"] = (f"never reached the edge: {name} at most {top[key]:.2f} (step "
                          f"{top['step']}), final {final:.2f}; band [{a:g}, {b:g}]")
        return out
    after = pts[first:]
    n = len(after)
    at = [r for r in after if a <= r[key] <= b]
    above = sum(r[key] > b for r in after)
    below = sum(r[key] < a for r in after)
    med = statistics.median(r[key] for r in after)
    out.update({
        "first_crossing_step": int(pts[first]["step"]),
        "fraction_at_edge_after_crossing": len(at) / n,
        "fraction_above_after_crossing": above / n,
        "fraction_below_after_crossing": below / n,
        "median_ratio_after_crossing": float(med),
        "last_step_at_edge": int(at[-1]["step"]) if at else None,
        "excess": med > b,
    })
    if at:
        tail = [r for r in after if r["step"] > at[-1]["step"]]
        out["left_edge"] = bool(tail) and all(r[key] < a for r in tail)
    start = "started above the edge" if first == 0 and pts[0][key] > b else \
        f"reached the edge at step {out['first_crossing_step']}"
    words = [f"{start}, at it {100 * len(at) / n:.0f} % of the measurements since "
             f"(band [{a:g}, {b:g}])"]
    if out["excess"]:
        words.append(f"above it {100 * above / n:.0f} % (median {name} {med:.2f}: a "
                     "systematic excess)")
    elif above / n >= 0.25:
        words.append(f"above it {100 * above / n:.0f} %")
    if out["left_edge"]:
        left = out["last_step_at_edge"]
        loss_at = next((r.get("loss") for r in after if r["step"] == left), None)
        loss_end = pts[-1].get("loss")
        how = (f" (loss {loss_at:.3g} → {loss_end:.3g})" if loss_at is not None
               and loss_end is not None else "")
        fell = " as the loss fell" if how and loss_end < loss_at else ""
        words.append(f"left it after step {left}{fell}{how}; final {name} {final:.2f}")
    elif not at:
        words.append(f"never within the band; final {name} {final:.2f}")
    out["verdict"] = ", ".join(words)
    return out


def excess_with_rho(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences on a systematic excess: for every η with SAM runs at two or more ρ whose
    median λ₁/edge after crossing lies above 1 and grows with ρ (runs that diverged left out)."""
    notes = []
    for lr in sorted({s["lr"] for s in summaries}):
        sam = sorted((s for s in summaries if s["lr"] == lr and s["rho"] is not None
                      and not s.get("diverged")
                      and s.get("median_ratio_after_crossing") is not None),
                     key=lambda s: s["rho"])
        if len(sam) < 2:
            continue
        ratios = [s["median_ratio_after_crossing"] for s in sam]
        growing = all(x < y for x, y in zip(ratios, ratios[1:], strict=False))
        if all(r > 1.0 for r in ratios) and growing:
            notes.append(
                f"η = {lr:g}: λ₁ sits above the {sam[0]['optimizer'].upper()}-edge by a margin "
                "that grows with ρ (median λ₁/edge after crossing "
                + ", ".join(f"{r:.2f} at ρ = {s['rho']:g}"
                            for r, s in zip(ratios, sam, strict=True))
                + "): a systematic excess over the closed-form edge")
    return notes


def summarize(run: RunResult, steps: int) -> dict[str, Any]:
    """The numbers of the table for one run.

    ``median_ratio``: median of λ₁/edge over the measurements of the second half of training
    (steps >= steps/2); ``median_lambda1``, ``median_edge`` likewise; ``first_at_edge``: the
    first measured step with λ₁/edge >= 1 (Adam: λ₁(P⁻¹H)/edge); ``edge_early``: the median
    edge over the first quarter (after step 0); ``lambda1_over_gd_edge``: median λ₁·η/2 over
    the second half.
    """
    rows = [r for r in run.rows if not r.get("diverged") and r.get("lambda1") is not None]
    late = [r for r in rows if r["step"] >= steps / 2]
    early = [r for r in rows if 0 < r["step"] <= steps / 4]
    # λ₁/edge ≥ 1 (for Adam the preconditioned sharpness's ratio)
    first = next((r["step"] for r in rows if r.get("ratio") is not None
                  and r["ratio"] >= 1.0), None)
    lr = run.spec.lr
    out = {
        "label": run.spec.label,
        "optimizer": run.spec.optimizer,
        "lr": lr,
        "rho": run.spec.rho,
        "gd_edge": 2.0 / lr,
        "lambda1_init": rows[0]["lambda1"] if rows else None,
        "median_lambda1": _median([r["lambda1"] for r in late]),
        "median_edge": _median([r.get("edge") for r in late]),
        "median_ratio": _median([r.get("ratio") for r in late]),
        "lambda1_over_gd_edge": _median([r["lambda1"] * lr / 2 for r in late]),
        "edge_early": _median([r.get("edge") for r in early]),
        "grad_norm_early": _median([r["grad_norm"] for r in early]),
        "grad_norm_late": _median([r["grad_norm"] for r in late]),
        "first_at_edge": first,
        "final_loss": run.train[-1]["loss"] if run.train else None,
        "diverged": run.diverged,
        "seconds": run.seconds,
        "tracker_seconds": run.tracker_seconds,
        "matvecs": run.matvecs,
        "measurements": len(run.rows),
    }
    band = GD_BAND if run.spec.rho is None else SAM_BAND
    ratio = out["median_ratio"]
    out["at_edge"] = ratio is not None and band[0] <= ratio <= band[1]
    out.update(diagnose(rows, EDGE_BAND))
    if out["too_few"]:  # no "in band" either (None: the table says "-")
        out["at_edge"] = None
    # the effective Hessian's λ_max against the base optimizer's edge, where recorded
    eff = [r for r in rows if r.get("eff_ratio") is not None]
    if eff:
        out["median_eff_ratio"] = _median([r["eff_ratio"] for r in eff if r["step"] >= steps / 2])
        out["median_lambda_eff"] = _median([r["lambda_eff"] for r in eff
                                            if r["step"] >= steps / 2])
        out["base_edge"] = eff[-1].get("base_edge")
        out.update({f"eff_{k}": v for k, v in diagnose(
            eff, EDGE_BAND, key="eff_ratio", name="λ_max(H_eff)/base edge").items()})
    if run.diverged:  # not an edge: the run blew up (its ratios are not a measurement of one)
        out["excess"] = False
        last = run.train[-1]["step"] if run.train else None
        out["verdict"] = (f"diverged (non-finite loss at step {last}); the largest λ₁/edge "
                          f"measured was {_fmt(out['max_ratio'], '.3g')}")
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


def format_table(result: EOSResult) -> str:
    """The summary table (Markdown): one row per run."""
    head = ("| run | η | ρ | 2/η | λ₁ at step 0 | median λ₁ (2nd half) | median edge (2nd half) "
            "| median λ₁/edge | median λ₁/(2/η) | first step λ₁ ≥ edge | edge early → late "
            "| ‖g‖ early → late | final loss | in band | max λ₁/edge | reached edge (step) "
            "| at edge since | last step at edge | time (tracker) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in result.runs:
        s = run.summary
        band = GD_BAND if s["rho"] is None else SAM_BAND
        lines.append(
            f"| {s['label']} | {s['lr']:g} | {_fmt(s['rho'], 'g')} | {s['gd_edge']:.2f} "
            f"| {_fmt(s['lambda1_init'], '.2f')} | {_fmt(s['median_lambda1'], '.2f')} "
            f"| {_fmt(s['median_edge'], '.2f')} | **{_fmt(s['median_ratio'])}** "
            f"| {_fmt(s['lambda1_over_gd_edge'])} | {_fmt(s['first_at_edge'], 'd')} "
            f"| {_fmt(s['edge_early'], '.2f')} → {_fmt(s['median_edge'], '.2f')} "
            f"| {_fmt(s['grad_norm_early'], '.3f')} → {_fmt(s['grad_norm_late'], '.3f')} "
            f"| {_fmt(s['final_loss'], '.4f')} "
            f"| {_yes_no(s['at_edge'])} [{band[0]}, {band[1]}]"
            f"{' (diverged)' if s['diverged'] else ''} "
            f"| {_fmt(s.get('max_ratio'))} | {_fmt(s.get('first_crossing_step'), 'd')} "
            f"| {_pct(s.get('fraction_at_edge_after_crossing'))} "
            f"| {_fmt(s.get('last_step_at_edge'), 'd')} "
            f"| {s['seconds']:.0f} s ({s['tracker_seconds']:.0f} s) |"
        )
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def verdicts(result: EOSResult) -> list[str]:
    """One sentence per run (its ``verdict``), then the notes on a systematic excess."""
    lines = []
    for r in result.runs:
        s = r.summary
        line = f"* **{s['label']}**: {s.get('verdict', '-')}."
        if s.get("eff_verdict") is not None:
            line += (f" Effective Hessian: λ_max(H_eff)/base edge median "
                     f"{_fmt(s.get('median_eff_ratio'))} (2nd half); {s['eff_verdict']}.")
        lines.append(line)
    lines += [f"* {n}." for n in excess_with_rho([r.summary for r in result.runs])]
    return lines


# --------------------------------------------------------------------------- figures


# Line widths and marker sizes of the figures (readable when a figure is shrunk to a column).
LW_CURVE, LW_EDGE, LW_REF, MS = 1.6, 1.6, 1.3, 4


def edge_label(run: RunResult) -> str:
    """The name of the edge that applies to ``run``: 2/η, (2 + 2β)/η, the SAM- or USAM-edge."""
    if run.spec.rho is not None:
        return f"{run.spec.optimizer.upper()}-edge"
    if run.spec.optimizer == "adam":
        return "Adam edge (2 + 2β₁)/(η(1 − β₁))"
    return "2/η" if not run.spec.momentum else "(2 + 2β)/η"


def _sharpness_key(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    if any(r.get("lambda1_precond") is not None for r in rows):
        return "lambda1_precond", "λ₁(P⁻¹H) (preconditioned)"
    return "lambda1", "λ₁ (top Hessian eigenvalue)"


def tracker_sentence(result: EOSResult) -> str:
    """How often λ₁ was measured and what the tracker cost, per run (the budget makes the
    measured steps depend on timing: say so)."""
    config = result.config
    parts = [f"{r.spec.label} {sum(1 for row in r.rows if 'lambda1' in row)} "
             f"({r.tracker_seconds:.1f} of {r.seconds:.1f} s)" for r in result.runs]
    if config.budget is None:
        how = f"every {config.every} steps (no budget)"
    else:
        how = (f"at most every {config.every} steps, within {100 * config.budget:g} % of each "
               "run's time (which steps depends on timing; `--budget none` measures every "
               f"{config.every} steps)")
    return f"λ₁ measurements per run, {how}: " + ", ".join(parts) + "."


def squeezes(reference: float, values: Sequence[float], factor: float = 1.6) -> bool:
    """Whether a horizontal line at ``reference`` would squeeze ``values`` into a small part of
    the axis: it lies more than ``factor`` times above their largest value."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return bool(values) and reference > factor * max(values)


def plot_edge_panel(ax, run: RunResult, show_gd: bool | None = None, legend: bool = True) -> None:
    """λ₁ (markers at the measurements) and the edge that applies to the run; 2/η only where it
    does not squeeze the axis (``show_gd=None``) or when asked."""
    rows = [r for r in run.rows if r.get("lambda1") is not None]
    key, name = _sharpness_key(rows)
    steps = [r["step"] for r in rows]
    lam = [r.get(key) for r in rows]
    ax.plot(steps, lam, "o-", ms=MS, lw=LW_CURVE, color="C0", label=name)
    k = max((len(r.get("eigenvalues") or ()) for r in rows), default=0)
    for j in range(1, k):  # --k: λ₂ ... λ_k, thinner
        ax.plot(steps, [(r.get("eigenvalues") or [None] * k)[j] for r in rows], ".-", ms=2,
                lw=0.9, color="0.45", alpha=0.8, label="λ₂ … λ_k" if j == 1 else None)
    gd = 2 / run.spec.lr
    edge_values: list[float] = []
    if run.spec.rho is not None:
        edges = _edges_per_step(run)  # the edge of every step, from that step's ‖g‖
        if edges:
            ax.plot([e[0] for e in edges], [e[1] for e in edges], color="C3", lw=LW_EDGE,
                    alpha=0.85, label=f"{edge_label(run)} (every step's ‖g‖)")
            edge_values = [e[1] for e in edges]
        ax.plot(steps, [r.get("edge") for r in rows], "s", ms=MS, color="C3", mfc="white",
                label=f"{edge_label(run)} at the measurements")
    else:
        edge_values = [r.get("edge") for r in rows if r.get("edge") is not None]
        if edge_values:
            label = edge_label(run)
            if label == "2/η":
                label = f"2/η = {gd:g}"
            ax.plot(steps, [r.get("edge") for r in rows], "--", color="C3", lw=LW_EDGE,
                    label=label)
    if show_gd is None:
        show_gd = run.spec.rho is not None and not squeezes(gd, lam + edge_values)
    is_gd_edge = edge_label(run) == "2/η"  # the edge drawn already is 2/η
    if show_gd and not is_gd_edge:
        ax.axhline(gd, ls=":", color="k", lw=LW_REF, label=f"2/η = {gd:g}")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    if legend:
        ax.legend(fontsize=8, loc="best")


def plot_run(run: RunResult, path: Path, title: str = "") -> Path:
    """Four panels: λ₁ and its edge alone (2/η only where it leaves room for them, else named
    in the panel's title); the training loss; ‖g‖; the alignments with v₁."""
    from matplotlib.figure import Figure

    rows = [r for r in run.rows if r.get("lambda1") is not None]
    fig = Figure(figsize=(14, 3.8), constrained_layout=True)
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.6, 1, 1, 1]})
    steps = [r["step"] for r in rows]
    plot_edge_panel(axes[0], run)
    gd = 2 / run.spec.lr
    key, _ = _sharpness_key(rows)
    shown = run.spec.rho is None or not squeezes(
        gd, [r.get(key) for r in rows] + [r.get("edge") for r in rows if r.get("edge")])
    axes[0].set_title("λ₁ and its edge" + ("" if shown else f" (2/η = {gd:g}, off the axis)"),
                      fontsize=10)
    train = run.train
    axes[1].plot([r["step"] for r in train], [r["loss"] for r in train], lw=LW_CURVE)
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")
    axes[1].set_title("loss", fontsize=10)
    axes[2].plot([r["step"] for r in train], [r["grad_norm"] for r in train], lw=1.0)
    axes[2].set_ylabel("‖g‖ (step's batch)")
    axes[2].set_yscale("log")
    axes[2].set_title("gradient norm", fontsize=10)
    axes[3].plot(steps, [r["align_grad"] for r in rows], "o-", ms=MS, lw=LW_CURVE,
                 label="|⟨g, v₁⟩|/‖g‖")
    if any(r.get("align_sam_grad") is not None for r in rows):
        axes[3].plot(steps, [r.get("align_sam_grad") for r in rows], "s-", ms=MS, lw=LW_CURVE,
                     label="SAM gradient")
    axes[3].set_ylabel("alignment with v₁")
    axes[3].set_ylim(0, 1.02)
    axes[3].legend(fontsize=8)
    axes[3].set_title("alignment", fontsize=10)
    for a in axes[1:]:
        a.set_xlabel("step")
    fig.suptitle(title or run.spec.label, fontsize=11)
    _save(fig, path)
    return path


def _edges_per_step(run: RunResult) -> list[tuple[int, float]]:
    from samkit.stability import momentum_edge, sam_edge, usam_edge

    lr, rho = run.spec.lr, run.spec.rho
    # the base optimizer's edge E; SAM over it is sam_edge(2/E, ...) (see edge_for)
    eff = 2.0 / float(momentum_edge(lr, run.spec.momentum))
    if run.spec.optimizer == "usam":
        return [(r["step"], float(usam_edge(eff, rho))) for r in run.train]
    return [(r["step"], float(sam_edge(eff, rho, r["grad_norm"]))) for r in run.train
            if math.isfinite(r["grad_norm"])]


def plot_overview(result: EOSResult, path: Path) -> Path:
    """As Long & Bartlett draw it: one panel per run (per ρ), each with λ₁, its edge and the
    2/η line, on a shared step axis; then λ₁/edge of every run in one panel."""
    from matplotlib.figure import Figure

    runs = result.runs
    n = len(runs) + 1
    cols = min(n, 4)
    nrows = -(-n // cols)
    fig = Figure(figsize=(3.9 * cols, 3.3 * nrows), constrained_layout=True)
    axes = list(fig.subplots(nrows, cols, squeeze=False).ravel())
    for ax, run in zip(axes, runs, strict=False):
        plot_edge_panel(ax, run, show_gd=True, legend=True)
        rho = "" if run.spec.rho is None else f", ρ = {run.spec.rho:g}"
        ax.set_title(f"{run.spec.label}: η = {run.spec.lr:g}{rho}", fontsize=10)
    ax = axes[len(runs)]
    for i, run in enumerate(runs):
        rows = [r for r in run.rows if r.get("ratio") is not None]
        ax.plot([r["step"] for r in rows], [r["ratio"] for r in rows], "o-", ms=3,
                lw=LW_CURVE, color=f"C{i % 10}", label=run.spec.label)
    ax.axhspan(EDGE_BAND[0], EDGE_BAND[1], color="0.85", zorder=0,
               label=f"at the edge [{EDGE_BAND[0]}, {EDGE_BAND[1]}]")
    ax.axhline(1.0, color="k", lw=LW_REF)
    ax.set_xlabel("step")
    ax.set_ylabel("λ₁ / edge")
    ax.set_title("λ₁ / edge", fontsize=10)
    ax.legend(fontsize=7)
    for extra in axes[n:]:
        extra.set_visible(False)
    description = getattr(result, "description", "")
    if description:
        fig.suptitle(description, fontsize=11)
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    experiment.save_figure(fig, path, dpi=110)


def write_report(result: EOSResult, command: str | None = None) -> None:
    summary = {"config": C.to_dict(result.config), "runs": [r.summary for r in
               result.runs], "wall_time": result.wall_time, "notes": result.notes,
               "edge_band": list(EDGE_BAND),
               "excess": excess_with_rho([r.summary for r in result.runs])}
    experiment.write_json(result.run_dir / "summary.json", summary, strict=False)
    text = [f"# samkit eos: {result.config.run_name}", ""]
    if command:
        text += ["```", command, "```", ""]
    text += [format_table(result), "",
             f"Median over the measurements of the second half of training; the edge is 2/η "
             f"for GD and the SAM-edge with that step's ‖g‖ for SAM. \"At the edge\": "
             f"λ₁/edge in [{EDGE_BAND[0]}, {EDGE_BAND[1]}] (the \"in band\" column applies it "
             "to the median of the second half; \"at edge since\" is the share of the "
             "measurements from the step it was reached on). "
             f"{len(result.runs)} runs in {result.wall_time:.0f} s.", ""]
    text += [tracker_sentence(result), ""]
    text += verdicts(result) + [""]
    text += [f"![{r.spec.label}]({r.spec.label}/eos.png)" for r in result.runs]
    text += ["", "![overview](overview.png)", ""]
    text += [f"note: {n}" for n in result.notes]
    experiment.write_markdown(result.run_dir / "report.md", text)
