"""Sharpness-aware optimizers: each wraps a torch.optim optimizer and shares its param groups."""

from samkit.optim.accumulation import accumulation_closure, m_sharpness_step
from samkit.optim.asam import ASAM
from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.batchnorm import disable_running_stats
from samkit.optim.bsam import BSAM, BSAMBase
from samkit.optim.esam import ESAM, ExampleLosses
from samkit.optim.fishersam import FisherSAM
from samkit.optim.friendlysam import FriendlySAM
from samkit.optim.gcsam import GCSAM
from samkit.optim.groups import param_groups
from samkit.optim.gsam import GSAM
from samkit.optim.kind import OptimizerKind, StepForm, kind_of
from samkit.optim.looksam import LookSAM
from samkit.optim.lossterm import LossTermOptimizer
from samkit.optim.msam import MSAM
from samkit.optim.onepass import OnePassOptimizer, at_weights
from samkit.optim.presets import SharpnessAware
from samkit.optim.registry import (
    OptimizerInfo,
    create_optimizer,
    describe_optimizers,
    list_ascents,
    list_descents,
    list_optimizers,
    list_schedules,
    optimizer_info,
    optimizer_options,
    register_ascent,
    register_optimizer,
    wrap_optimizer,
)
from samkit.optim.sam import SAM
from samkit.optim.schedules import (
    AESchedule,
    PeriodicSchedule,
    RandomSchedule,
    ae_sam,
    periodic_sam,
    rst_sam,
    with_schedule,
)
from samkit.optim.selecting import ExampleSelectingOptimizer
from samkit.optim.trajectory import MESA, SAF, TrajectoryLossOptimizer
from samkit.optim.usam import USAM
from samkit.optim.wrapper import WrappingOptimizer
from samkit.optim.wsam import WSAM

__all__ = [
    "ASAM",
    "BSAM",
    "BSAMBase",
    "GCSAM",
    "PeriodicSchedule",
    "WSAM",
    "ESAM",
    "GSAM",
    "MESA",
    "SAF",
    "SAM",
    "USAM",
    "AESchedule",
    "ExampleLosses",
    "ExampleSelectingOptimizer",
    "FisherSAM",
    "FriendlySAM",
    "MSAM",
    "LookSAM",
    "LossTermOptimizer",
    "OnePassOptimizer",
    "OptimizerInfo",
    "OptimizerKind",
    "StepForm",
    "WrappingOptimizer",
    "RandomSchedule",
    "SharpnessAware",
    "SharpnessAwareOptimizer",
    "TrajectoryLossOptimizer",
    "accumulation_closure",
    "ae_sam",
    "at_weights",
    "create_optimizer",
    "describe_optimizers",
    "disable_running_stats",
    "kind_of",
    "list_ascents",
    "list_descents",
    "list_optimizers",
    "list_schedules",
    "m_sharpness_step",
    "optimizer_info",
    "optimizer_options",
    "param_groups",
    "periodic_sam",
    "register_ascent",
    "register_optimizer",
    "rst_sam",
    "with_schedule",
    "wrap_optimizer",
]
