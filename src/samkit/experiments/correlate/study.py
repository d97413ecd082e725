"""The study: every model of the grid (continuing from the cache), in this process or in a
pool of ``jobs`` worker processes, then the statistics and the report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from samkit.experiments import base
from samkit.experiments.correlate.config import DEFAULT, CorrelateConfig, config_to_dict
from samkit.experiments.correlate.grid import grid
from samkit.experiments.correlate.models import model_job
from samkit.experiments.correlate.report import write_report
from samkit.experiments.correlate.stats import CorrelateResult, correlate, default_name
from samkit.measures import measures

# What a study writes in its folder (models/: one training run per grid point).
CORRELATE_FILES = ("config.json", "config.yaml", "report.md", "summary.json", "results.csv",
                   "scatter.png", "models")


def run_correlate(
    config: CorrelateConfig = DEFAULT,
    name: str | None = None,
    jobs: int = 1,
    overwrite: bool = False,
    verbose: int = 1,
    command: str | None = None,
    notes: Sequence[str] = (),
    quick: bool = False,
) -> CorrelateResult:
    """Train and measure every model of the grid (continuing from the cache), then correlate and
    write the report. ``jobs > 1`` runs that many models at once in separate processes."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs!r} (allowed: an integer >= 1)")
    name = name or default_name(config, quick)
    run_dir = base.run_dir_of(config.train.out_dir, name)
    specs = grid(config, run_dir)
    # an existing study of this name is its cache: continued unless --overwrite
    with base.RunDir(run_dir, "correlate", CORRELATE_FILES, overwrite=overwrite, keep=True) as run:
        base.load_data(config.train, "cpu", cache=True)  # the old run goes once data load
        run.start()
        return _run(config, name, jobs, verbose, command, notes, run_dir, specs)


def _run(config, name, jobs, verbose, command, notes, run_dir, specs) -> CorrelateResult:
    base.write_json(run_dir / "config.json", config_to_dict(config))
    base.save_experiment_config(config, run_dir / "config.yaml", config_to_dict(config))
    result = CorrelateResult(name, run_dir, config, notes=list(notes))
    done = sum(1 for s in specs if (s.run_dir / "measures.json").is_file())
    if verbose:
        print(f"samkit correlate: {len(specs)} models, {len(measures(config))} measures each, "
              f"{jobs} job(s) -> {run_dir}" + (f" ({done} started before: continuing)"
                                                if done else ""), flush=True)
    start = time.perf_counter()
    by_key: dict[str, list[dict[str, Any]]] = {}

    def report_progress(i: int, rows: list[dict[str, Any]]) -> None:
        if not verbose:
            return
        r = rows[0]
        what = "trained" if r["_trained"] else "cached"
        gap = r["gap_error"]
        print(f"[{i}/{len(specs)}] {r['model']}: {r['status']} after {r['epochs']} epochs "
              f"({what}), train err {100 * r['train_err']:.2f}%, test err "
              f"{100 * r['test_err']:.2f}%, gap {100 * gap:.2f}%, {r['_computed']} new "
              f"measures, {r['_wall']:.1f} s", flush=True)

    # one thread per process when several run at once (unless the config says otherwise)
    threads = config.train.threads or (1 if jobs > 1 else None)
    from samkit.config import check_threads

    check_threads(threads, "train.threads")  # before any job starts
    done_count = 0

    def collect(i: int, rows: list[dict[str, Any]]) -> None:
        nonlocal done_count
        done_count += 1
        by_key[specs[i].key] = rows
        report_progress(done_count, rows)

    base.map_jobs(model_job, [(spec, config, threads) for spec in specs], jobs,
                  on_done=collect)
    result.wall_time = time.perf_counter() - start
    for spec in specs:
        for row in by_key[spec.key]:
            result.rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    statuses = [r["status"] for r in result.rows if r["alpha"] == 1.0]
    missed = statuses.count("unconverged")
    diverged = statuses.count("diverged")
    if missed and config.stop_loss is not None:
        result.notes.append(
            f"{missed} of {len(statuses)} models did not reach the training loss "
            f"{config.stop_loss:g} within {config.train.epochs} epochs"
            + (" (included anyway: include_unconverged)" if config.include_unconverged
               else "; they are left out of the correlations")
        )
    if diverged:
        result.notes.append(f"{diverged} models diverged (non-finite loss); left out")
    correlate(result)
    write_report(result, command=command)
    return result
