"""Parameter groups in the ASAM paper's setting."""

from __future__ import annotations

from torch import nn

from samkit.optim._validation import check_non_negative


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Split ``model``'s trainable parameters into normalized weights and unnormalized biases.

    Parameters whose name ends in ``bias`` get ``normalize=False`` (ASAM uses T = I for them, as
    the official ASAM code does); every other parameter gets ``normalize=True``. Both groups get
    ``weight_decay``. Pass the result to any ``torch.optim`` optimizer::

        base = torch.optim.SGD(samkit.param_groups(model, weight_decay=5e-4), lr=0.1)

    Empty groups are left out; a model with no trainable parameter raises ``ValueError``.
    """
    check_non_negative("weight_decay", weight_decay)
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.rsplit(".", 1)[-1].endswith("bias") else weights).append(p)
    groups = [
        {"params": ps, "weight_decay": weight_decay, "normalize": normalize}
        for ps, normalize in ((weights, True), (biases, False))
        if ps
    ]
    if not groups:
        raise ValueError(f"Invalid model: {type(model).__name__} has no trainable parameters")
    return groups
