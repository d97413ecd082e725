"""The study's statistics: Kendall τ and the granulated Ψ of every measure against the gap,
and adaptive against plain sharpness."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samkit.experiments.correlate.config import CorrelateConfig
from samkit.experiments.correlate.grid import HYPERPARAMETERS
from samkit.measures import Measure, measures
from samkit.stats import Interval


@dataclass
class Correlation:
    measure: Measure
    tau: float
    pvalue: float
    n: int
    psi: float
    psi_per: dict
    tau_other: float  # τ against the other gap (loss gap when ranking the error gap, and back)
    pvalue_other: float
    interval: Interval | None = None  # τ's bootstrap interval over the models
    interval_other: Interval | None = None


@dataclass
class CorrelateResult:
    name: str
    run_dir: Path
    config: CorrelateConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    correlations: list[Correlation] = field(default_factory=list)
    hparam_taus: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def included(self) -> list[dict[str, Any]]:
        """The rows the correlations use."""
        allowed = {"converged"} | ({"unconverged"} if self.config.include_unconverged else set())
        return [r for r in self.rows if r["status"] in allowed]


def default_name(config: CorrelateConfig, quick: bool = False) -> str:
    """``correlate[-quick]-<data>-<model>``, and a digest of the settings that differ from the
    study's defaults (:func:`~samkit.config.settings_digest`): other studies, other folders."""
    from samkit.config import settings_digest, to_dict
    from samkit.experiments.correlate.config import DEFAULT, QUICK

    def settings(c: CorrelateConfig) -> dict:
        values = to_dict(c)
        train = values.pop("train")
        for key in ("out_dir", "device", "threads", "data_dir", "name"):
            train.pop(key, None)
        return {**values, **{f"train.{k}": v for k, v in train.items()}}

    stem = f"correlate{'-quick' if quick else ''}-{config.train.dataset}-{config.train.model}"
    return stem + settings_digest(settings(config), settings(QUICK if quick else DEFAULT),
                                  ("train.dataset", "train.model"))



def correlate(result: CorrelateResult) -> None:
    """Fill ``result.correlations`` (sorted by τ, largest first, each with its bootstrap
    interval over the models) and ``hparam_taus``."""
    from samkit.stats import granulated_kendall, kendall_interval, kendall_tau

    cfg = result.config
    rows = result.included
    gap_key = f"gap_{cfg.gap}"
    other_key = "gap_loss" if cfg.gap == "error" else "gap_error"
    gap = [r[gap_key] for r in rows]
    other = [r[other_key] for r in rows]
    groups = [{k: r[k] for k in (*HYPERPARAMETERS, *(("alpha",) if cfg.rescale else ()))}
              for r in rows]
    boot = {"n_resamples": cfg.resamples, "seed": cfg.seed}
    out = []
    for measure in measures(cfg):
        x = [r.get(measure.key, math.nan) for r in rows]
        k = kendall_tau(x, gap)
        k2 = kendall_tau(x, other)
        psi, per = granulated_kendall(x, gap, groups)
        out.append(Correlation(measure, k.tau, k.pvalue, k.n, psi, per, k2.tau, k2.pvalue,
                               kendall_interval(x, gap, **boot),
                               kendall_interval(x, other, **boot)))
    out.sort(key=lambda c: (-c.tau if not math.isnan(c.tau) else math.inf))
    result.correlations = out
    result.hparam_taus = {}
    for key in HYPERPARAMETERS:
        x = [r[key] for r in rows]
        k = kendall_tau(x, gap)
        result.hparam_taus[key] = {"tau": k.tau, "pvalue": k.pvalue, "n": k.n,
                                   "interval": kendall_interval(x, gap, **boot).to_dict()}


def _best(correlations: list[Correlation]) -> Correlation | None:
    defined = [c for c in correlations if not math.isnan(c.tau)]
    return max(defined, key=lambda c: c.tau) if defined else None


def comparison(result: CorrelateResult) -> list[dict[str, Any]]:
    """Adaptive against plain sharpness within each group of the same kind, p and quantity
    (e.g. worst-case p = 2, loss increase): each family's best τ over the radii (with its
    interval) and mean τ, the differences adaptive − plain of the best and of the mean with
    their paired bootstrap intervals over the models (the best and the mean recomputed in every
    resample), their verdicts, and each family's mean Ψ."""
    from samkit.stats import kendall_group_difference_interval, verdict

    cfg = result.config
    rows = result.included
    gap = [r[f"gap_{cfg.gap}"] for r in rows]
    by_group: dict[str, dict[str, list[Correlation]]] = {}
    for c in result.correlations:
        if c.measure.family in ("sharpness", "adaptive"):
            by_group.setdefault(c.measure.group, {}).setdefault(c.measure.family, []).append(c)
    from samkit.measures import KINDS

    def order(group: str) -> tuple:  # worst p=2, p=∞, average Gaussian, uniform; loss first
        m = by_group[group].get("adaptive", by_group[group].get("sharpness"))[0].measure
        return (KINDS.index(m.kind), m.p or 0, m.quantity != "loss")

    out = []
    for group in sorted(by_group, key=order):
        families = by_group[group]
        if set(families) != {"sharpness", "adaptive"}:
            continue
        entry: dict[str, Any] = {"group": group}
        for family in ("sharpness", "adaptive"):
            cs = families[family]
            taus = [c.tau for c in cs if not math.isnan(c.tau)]
            psis = [c.psi for c in cs if not math.isnan(c.psi)]
            best = _best(cs)
            entry[family] = {
                "best_tau": best.tau if best else math.nan,
                "best_measure": best.measure.label if best else None,
                "best_interval": best.interval.to_dict() if best and best.interval else None,
                "mean_tau": sum(taus) / len(taus) if taus else math.nan,
                "mean_psi": sum(psis) / len(psis) if psis else math.nan,
                "count": len(taus),
            }
        xs = {f: [[r.get(c.measure.key, math.nan) for r in rows] for c in families[f]]
              for f in families}
        for reduce in ("max", "mean"):
            interval = kendall_group_difference_interval(
                xs["adaptive"], xs["sharpness"], gap, reduce=reduce, n_resamples=cfg.resamples,
                seed=cfg.seed)
            name = "best" if reduce == "max" else "mean"
            entry[f"{name}_difference"] = interval.to_dict()
            entry[f"{name}_verdict"] = verdict(interval)
        out.append(entry)
    return out


def _interval(d: dict[str, Any]) -> Interval:
    return Interval(**d)


def verdicts(result: CorrelateResult, entries: list[dict[str, Any]] | None = None) -> list[str]:
    """One sentence per comparison group, generated from the intervals: is adaptive
    sharpness's τ with the gap better, worse or not distinguishable from plain sharpness's?"""
    from samkit.stats import verdict_sentence

    out = []
    for e in comparison(result) if entries is None else entries:
        best = verdict_sentence(
            "adaptive", "plain sharpness", "best τ over the radii",
            _interval(e["best_difference"]))
        mean = verdict_sentence(
            "adaptive", "plain sharpness", "mean τ over the radii",
            _interval(e["mean_difference"]))
        out.append(f"{e['group']}: {best} {mean[0].upper()}{mean[1:]}")
    return out


def verdict(result: CorrelateResult) -> str:
    """:func:`verdicts` as one paragraph (or why there is nothing to compare)."""
    parts = verdicts(result)
    return " ".join(parts) if parts else (
        "No group has both adaptive and plain sharpness measures: nothing to compare.")
