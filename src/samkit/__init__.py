"""samkit: sharpness-aware training and sharpness measurement for PyTorch.

>>> import samkit
>>> base = torch.optim.SGD(samkit.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
>>> opt = samkit.ASAM(base, rho=0.5, eta=0.01)
>>> samkit.sharpness(model, loss_fn, (x, y), rho=0.5, adaptive=True).value

Subpackages: ``samkit.optim`` (the optimizers), ``samkit.curvature`` (Hessian operator,
eigenvalues, trace, spectral density), ``samkit.stability`` (edges), ``samkit.data``,
``samkit.models``, ``samkit.train`` and ``samkit.experiments`` (the experiment runner),
``samkit.distributed`` (DDP perturbation modes) and ``samkit.integrations`` (Lightning,
Hugging Face).
"""

from typing import TYPE_CHECKING

# The names below are imported on first use (PEP 562): ``import samkit`` costs torch and little
# else, and a program (or a test) that needs only ``samkit.data`` does not load the optimizers
# and the curvature code. ``samkit.sharpness(...)`` and ``samkit.SharpnessResult`` live in the
# private module samkit._sharpness, so the name ``samkit.sharpness`` means the function alone.
_OPTIM = (
    "ASAM", "BSAM", "ESAM", "GCSAM", "GSAM", "MESA", "MSAM", "SAF", "SAM", "USAM", "WSAM",
    "AESchedule", "ExampleLosses", "PeriodicSchedule",
    "FisherSAM", "FriendlySAM", "LookSAM", "RandomSchedule", "SharpnessAware",
    "SharpnessAwareOptimizer", "accumulation_closure", "ae_sam", "at_weights", "create_optimizer",
    "disable_running_stats", "list_ascents", "list_descents", "list_optimizers",
    "list_schedules", "m_sharpness_step", "param_groups", "register_optimizer", "rst_sam",
    "with_schedule",
)
_HOME = {
    **dict.fromkeys(_OPTIM, "samkit.optim"),
    "SharpnessResult": "samkit._sharpness",
    "sharpness": "samkit._sharpness",
}

if TYPE_CHECKING:
    from samkit import curvature, distributed, stability
    from samkit._sharpness import SharpnessResult, sharpness
    from samkit.optim import (
        ASAM,
        BSAM,
        ESAM,
        GCSAM,
        GSAM,
        MESA,
        MSAM,
        SAF,
        SAM,
        USAM,
        WSAM,
        AESchedule,
        ExampleLosses,
        FisherSAM,
        FriendlySAM,
        LookSAM,
        PeriodicSchedule,
        RandomSchedule,
        SharpnessAware,
        SharpnessAwareOptimizer,
        accumulation_closure,
        ae_sam,
        at_weights,
        create_optimizer,
        disable_running_stats,
        list_ascents,
        list_descents,
        list_optimizers,
        list_schedules,
        m_sharpness_step,
        param_groups,
        register_optimizer,
        rst_sam,
        with_schedule,
    )

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "BSAM",
    "ESAM",
    "GCSAM",
    "GSAM",
    "MESA",
    "SAF",
    "SAM",
    "USAM",
    "WSAM",
    "AESchedule",
    "ExampleLosses",
    "FisherSAM",
    "FriendlySAM",
    "LookSAM",
    "MSAM",
    "PeriodicSchedule",
    "RandomSchedule",
    "SharpnessAware",
    "SharpnessAwareOptimizer",
    "SharpnessResult",
    "accumulation_closure",
    "ae_sam",
    "at_weights",
    "create_optimizer",
    "curvature",
    "disable_running_stats",
    "distributed",
    "list_ascents",
    "list_descents",
    "list_optimizers",
    "list_schedules",
    "m_sharpness_step",
    "param_groups",
    "register_optimizer",
    "rst_sam",
    "sharpness",
    "stability",
    "with_schedule",
]


def __getattr__(name: str):
    import importlib

    home = _HOME.get(name)
    if home is None:  # a subpackage or module: samkit.curvature, samkit.optim, ...
        import importlib.util

        if name.startswith("_") or importlib.util.find_spec(f"samkit.{name}") is None:
            raise AttributeError(f"module 'samkit' has no attribute {name!r}")
        return importlib.import_module(f"samkit.{name}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_run(path, map_location="cpu"):
    """``config, metrics, model = samkit.load_run("runs/<name>")``: a run's resolved config, its
    metrics records and its model with the trained weights (:func:`samkit.train.load_run`)."""
    from samkit.train.loadrun import load_run as _load_run

    return _load_run(path, map_location)
