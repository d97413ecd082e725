"""λ_max(H_eff)/edge for SGD, SAM, ASAM, GSAM and FisherSAM on the default ``samkit eos``
setting (2,000 Fashion-MNIST images, MLP 2×128 tanh, square loss, full batch, η = 0.1, 1,500
steps, λ at most every 10 steps within the tracker's 25 % time budget).

For every sharpness-aware run the tracker records λ_max of the effective Hessian of the step,
:math:`H + (\\rho/c) H M H` (``samkit.curvature.effective_hessian``), against the *base*
optimizer's edge 2/η; for GD the effective Hessian is H itself and the ratio is λ₁/(2/η).
Needs the effective Hessian in the tracker (rows with ``eff_ratio``); without it the table says
so. Each run is one ``samkit eos`` call (figures and report in ``<out>/family-<name>/``)::

    python benchmarks/eos_family.py --out runs --threads 1
    python benchmarks/eos_family.py --steps 60 --every 10     # a quick look

The ρ of each: SAM, GSAM and FisherSAM 0.05 (the eos default), ASAM 0.5 with its η_T = 0.01
(the ASAM paper's tenfold radius for its rescaled ball); GSAM with a constant ρ_t = ρ
(rho_max = rho_min) and its default α = 0.1.
"""

from __future__ import annotations

import argparse
import math
import time

RUNS = (("sgd", None), ("sam", 0.05), ("asam", 0.5), ("gsam", 0.05), ("fishersam", 0.05))


def _fmt(value, spec=".3f"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def main(argv=None) -> int:
    from samkit.experiments.eos import EOSConfig, run_eos

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs")
    p.add_argument("--steps", type=int, default=EOSConfig().steps)
    p.add_argument("--every", type=int, default=EOSConfig().every)
    p.add_argument("--budget", type=lambda t: None if t.lower() == "none" else float(t),
                   default=EOSConfig().budget, help="the tracker's share of each run (none: "
                   "every --every steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="a subset of: sgd sam asam gsam "
                   "fishersam")
    args = p.parse_args(argv)
    lines = ["| run | ρ | median λ₁ | median λ_max(H_eff) | base edge | median λ_eff/edge "
             "(2nd half) | max | reached (step) | at edge since | last at edge | median "
             "λ₁/closed-form edge | measurements | Hv each | time (tracker) |",
             "|" + "---|" * 14]
    verdicts = []
    start = time.perf_counter()
    for name, rho in RUNS:
        if args.only and name not in args.only:
            continue
        config = EOSConfig(
            gd=name == "sgd", rhos=() if rho is None else (rho,),
            ascent="sam" if name == "sgd" else name, steps=args.steps, every=args.every,
            budget=args.budget,
            device=args.device, threads=args.threads, out_dir=args.out, name=f"family-{name}")
        run = run_eos(config, verbose=0).runs[0]
        s = run.summary
        rows = [r for r in run.rows if "lambda1" in r]
        hv = sum(r["matvecs"] for r in rows) / max(len(rows), 1)
        if name == "sgd":  # H_eff = H: the ratio is λ₁/(2/η)
            eff = {k: s.get(k[4:] if k.startswith("eff_") else k) for k in
                   ("eff_max_ratio", "eff_first_crossing_step",
                    "eff_fraction_at_edge_after_crossing", "eff_last_step_at_edge",
                    "eff_verdict")}
            eff.update(median_eff_ratio=s["median_ratio"], median_lambda_eff=s["median_lambda1"],
                       base_edge=s["gd_edge"])
        else:
            eff = s
        frac = eff.get("eff_fraction_at_edge_after_crossing")
        lines.append(
            f"| {s['label']} | {_fmt(rho, 'g')} | {_fmt(s['median_lambda1'], '.2f')} "
            f"| {_fmt(eff.get('median_lambda_eff'), '.2f')} | {_fmt(eff.get('base_edge'), '.2f')} "
            f"| **{_fmt(eff.get('median_eff_ratio'))}** | {_fmt(eff.get('eff_max_ratio'))} "
            f"| {_fmt(eff.get('eff_first_crossing_step'), 'd')} "
            f"| {'-' if frac is None else f'{100 * frac:.0f} %'} "
            f"| {_fmt(eff.get('eff_last_step_at_edge'), 'd')} | {_fmt(s['median_ratio'])} "
            f"| {len(rows)} | {hv:.1f} | {s['seconds']:.0f} s ({s['tracker_seconds']:.0f} s) |")
        verdict = eff.get("eff_verdict") or "no effective-Hessian rows (eff_ratio) recorded"
        verdicts.append(f"* **{s['label']}**: {verdict}.")
        print(lines[-1], "\n", verdicts[-1], flush=True)  # as it goes
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))
    print(f"\n{len(verdicts)} runs in {time.perf_counter() - start:.0f} s; band "
          "[0.9, 1.1]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
