"""Experiments built on the trainer: each is a config, a set of runs and a report.

``base`` holds what they share (subcommand registration, run directory, finished runs, data and
its fallback, figures, strict JSON, the report files); ``train``, ``compare``, ``eos`` (with
``eos_report``) and the ``correlate`` package each register their ``samkit`` subcommand.
"""

from samkit.experiments.compare import (
    DEFAULT,
    DEFAULT_OPTIMIZERS,
    DEFAULT_SEEDS,
    CompareResult,
    format_table,
    run_compare,
    with_fallback,
    write_report,
)
from samkit.experiments.correlate import (
    CorrelateConfig,
    load_correlate_config,
    measure_model,
    rescale_relu,
    run_correlate,
)
from samkit.experiments.eos import EOSConfig, run_eos

__all__ = [
    "DEFAULT",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_SEEDS",
    "CompareResult",
    "CorrelateConfig",
    "EOSConfig",
    "load_correlate_config",
    "measure_model",
    "rescale_relu",
    "run_correlate",
    "run_eos",
    "format_table",
    "run_compare",
    "with_fallback",
    "write_report",
]
