r"""``samkit correlate``: does adaptive sharpness track the generalization gap better than plain
sharpness?

The ASAM paper's first claim (Kwon et al., 2021, Section 3): because adaptive sharpness is
invariant to weight rescalings that leave the network's function unchanged, it correlates with
the generalization gap better than plain sharpness. This experiment tests the claim on a grid of
models, following Keskar et al. (2017), Jiang et al. (2020) and Kwon et al. (2021):

1. train one model per point of a grid over mini-batch size, initial learning rate, weight decay
   and dropout rate, every one to the same stopping rule: the full training loss (evaluation
   mode) at or below ``stop_loss``, checked after every epoch, within ``train.epochs`` epochs
   (models that miss it are reported and left out of the correlations); or, with
   ``stop_loss: null``, a fixed budget of ``train.epochs``;
2. measure each model: train and test loss and error, the gap (test error - train error, or the
   loss gap), sharpness and adaptive sharpness (:func:`samkit.sharpness`) at
   :math:`p = 2` and :math:`p = \infty` for a few radii ρ, and optionally the top Hessian
   eigenvalue λ₁ and the Hessian trace, all on a fixed set of training examples;
3. rank-correlate every measure with the gap: Kendall's :math:`\tau_b` with its p-value, and the
   granulated :math:`\Psi` of Jiang et al. (:mod:`samkit.stats`).

Adaptive sharpness uses element-wise :math:`T_w = \mathrm{diag}(|w| + \eta)` with ``eta = 0`` by
default, which makes it exactly invariant to such rescalings (``rescale`` adds a
function-preserving rescaled copy of every model to show it: the first hidden layer times α,
the next one divided by α).

Everything is cached under ``runs/<name>/models/<model>/`` (the trainer's checkpoint, the
model's ``spec.json`` and ``measures.json``, each written atomically): running the same command
again continues an interrupted study where it stopped, trains only what is missing and measures
only what is not in the cache. ``--jobs N`` trains and measures N models at once in separate
processes (one torch thread each). The study writes ``runs/<name>/report.md`` (the table sorted
by τ, the comparison of adaptive with plain sharpness, the models), ``scatter.png`` (one panel
per measure: the measure against the gap), ``results.csv`` and ``summary.json``.

References:
    J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
    N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy, P. T. P. Tang. On Large-Batch
    Training for Deep Learning: Generalization Gap and Sharp Minima. ICLR 2017.
    Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio. Fantastic Generalization
    Measures and Where to Find Them. ICLR 2020.
    M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion. A Modern Look at the
    Relationship between Sharpness and Generalization. ICML 2023.

The package, one module per part: ``config`` (the study's config, YAML and ``--set``), ``grid``
(one spec per grid point), ``cache`` (``spec.json`` and ``measures.json``), ``models`` (one model:
train, evaluate, measure; the worker's job), ``study`` (the grid in this process or a pool of
processes), ``stats`` (τ, Ψ, the comparison), ``report`` (tables, figure, files), ``cli``
(``samkit correlate``). The measures themselves are library code: :mod:`samkit.measures`.
"""

from samkit.experiments.correlate.cache import MeasureCache
from samkit.experiments.correlate.cli import add_parser, cmd_correlate, config_from_args, main
from samkit.experiments.correlate.config import (
    DEFAULT,
    DEFAULT_TRAIN,
    GAPS,
    QUICK,
    QUICK_TRAIN,
    CorrelateConfig,
    apply_preset,
    apply_study_overrides,
    config_from_dict,
    config_to_dict,
    field_help,
    load_correlate_config,
    preset_changes,
    with_fallback,
)
from samkit.experiments.correlate.grid import HYPERPARAMETERS, ModelSpec, grid, model_key
from samkit.experiments.correlate.models import (
    load_data,
    measure_batch,
    process_model,
    status_of,
    train_model,
)
from samkit.experiments.correlate.report import (
    format_comparison,
    format_models,
    format_table,
    plot_scatter,
    write_csv,
    write_report,
)
from samkit.experiments.correlate.stats import (
    CorrelateResult,
    Correlation,
    comparison,
    correlate,
    default_name,
    verdict,
    verdicts,
)
from samkit.experiments.correlate.study import run_correlate
from samkit.measures import (
    Measure,
    cache_key,
    evaluate,
    measure_model,
    measure_one,
    measures,
    rescale_relu,
)

__all__ = [
    "DEFAULT",
    "DEFAULT_TRAIN",
    "GAPS",
    "HYPERPARAMETERS",
    "QUICK",
    "QUICK_TRAIN",
    "CorrelateConfig",
    "CorrelateResult",
    "Correlation",
    "Measure",
    "MeasureCache",
    "ModelSpec",
    "add_parser",
    "apply_preset",
    "apply_study_overrides",
    "cache_key",
    "cmd_correlate",
    "comparison",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "correlate",
    "default_name",
    "evaluate",
    "field_help",
    "format_comparison",
    "format_models",
    "format_table",
    "grid",
    "load_correlate_config",
    "load_data",
    "main",
    "measure_batch",
    "measure_model",
    "measure_one",
    "measures",
    "model_key",
    "plot_scatter",
    "preset_changes",
    "process_model",
    "rescale_relu",
    "run_correlate",
    "status_of",
    "train_model",
    "verdict",
    "verdicts",
    "with_fallback",
    "write_csv",
    "write_report",
]
