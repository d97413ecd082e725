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
    """Fill ``result.correlations`` (sorted by τ, largest first) and ``hparam_taus``."""
    from samkit.stats import granulated_kendall, kendall_tau

    cfg = result.config
    rows = result.included
    gap_key = f"gap_{cfg.gap}"
    other_key = "gap_loss" if cfg.gap == "error" else "gap_error"
    gap = [r[gap_key] for r in rows]
    other = [r[other_key] for r in rows]
    groups = [{k: r[k] for k in (*HYPERPARAMETERS, *(("alpha",) if cfg.rescale else ()))}
              for r in rows]
    out = []
    for measure in measures(cfg):
        x = [r.get(measure.key, math.nan) for r in rows]
        k = kendall_tau(x, gap)
        k2 = kendall_tau(x, other)
        psi, per = granulated_kendall(x, gap, groups)
        out.append(Correlation(measure, k.tau, k.pvalue, k.n, psi, per, k2.tau, k2.pvalue))
    out.sort(key=lambda c: (-c.tau if not math.isnan(c.tau) else math.inf))
    result.correlations = out
    result.hparam_taus = {}
    for key in HYPERPARAMETERS:
        k = kendall_tau([r[key] for r in rows], gap)
        result.hparam_taus[key] = {"tau": k.tau, "pvalue": k.pvalue, "n": k.n}


def comparison(result: CorrelateResult) -> list[dict[str, Any]]:
    """Adaptive against plain sharpness at each p: the best and the mean τ over the radii."""
    out = []
    for p in (2, math.inf):
        entry: dict[str, Any] = {"p": "2" if p == 2 else "inf"}
        for family in ("sharpness", "adaptive"):
            taus = [c.tau for c in result.correlations
                    if c.measure.family == family and c.measure.p == p and not math.isnan(c.tau)]
            psis = [c.psi for c in result.correlations
                    if c.measure.family == family and c.measure.p == p and not math.isnan(c.psi)]
            entry[family] = {
                "best_tau": max(taus) if taus else math.nan,
                "mean_tau": sum(taus) / len(taus) if taus else math.nan,
                "mean_psi": sum(psis) / len(psis) if psis else math.nan,
                "count": len(taus),
            }
        out.append(entry)
    return out



def verdict(result: CorrelateResult) -> str:
    """One sentence per p: is adaptive sharpness's τ higher than plain sharpness's?"""
    parts = []
    for e in comparison(result):
        s, a = e["sharpness"], e["adaptive"]
        if math.isnan(s["best_tau"]) or math.isnan(a["best_tau"]):
            parts.append(f"p={e['p']}: not enough data to compare.")
            continue
        best = "higher" if a["best_tau"] > s["best_tau"] else "not higher"
        mean = "higher" if a["mean_tau"] > s["mean_tau"] else "not higher"
        parts.append(
            f"p={e['p']}: adaptive sharpness's best τ over ρ is {best} than plain sharpness's "
            f"({a['best_tau']:+.3f} vs {s['best_tau']:+.3f}); its mean τ over ρ is {mean} "
            f"({a['mean_tau']:+.3f} vs {s['mean_tau']:+.3f})."
        )
    return " ".join(parts)
