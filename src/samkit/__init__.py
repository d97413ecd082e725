"""samkit: sharpness-aware training and sharpness measurement for PyTorch.

>>> import samkit
>>> base = torch.optim.SGD(samkit.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
>>> opt = samkit.ASAM(base, rho=0.5, eta=0.01)
"""

from samkit.optim import (
    ASAM,
    SAM,
    USAM,
    SharpnessAwareOptimizer,
    accumulation_closure,
    create_optimizer,
    disable_running_stats,
    list_optimizers,
    m_sharpness_step,
    param_groups,
    register_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "SAM",
    "USAM",
    "SharpnessAwareOptimizer",
    "accumulation_closure",
    "create_optimizer",
    "disable_running_stats",
    "list_optimizers",
    "m_sharpness_step",
    "param_groups",
    "register_optimizer",
]
