"""The training config, re-exported from :mod:`samkit.config` (its home since the redesign).

``from samkit.train.config import TrainConfig, load_config`` keeps working.
"""

from samkit.config import (
    FIELDS,
    LR_SCHEDULES,
    PERTURBATIONS,
    TrainConfig,
    apply_overrides,
    check_value,
    field_help,
    from_dict,
    load_config,
    parse_override,
    resolved_dict,
    save_config,
    steps_per_epoch,
    to_dict,
    total_steps,
)

__all__ = [
    "FIELDS",
    "LR_SCHEDULES",
    "PERTURBATIONS",
    "TrainConfig",
    "apply_overrides",
    "check_value",
    "field_help",
    "from_dict",
    "load_config",
    "parse_override",
    "resolved_dict",
    "save_config",
    "steps_per_epoch",
    "to_dict",
    "total_steps",
]
