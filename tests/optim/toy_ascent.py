"""A toy ascent registered by tests/optim/conftest.py: one function and one registry line, so
that every shared property test over ``samkit.list_optimizers()`` picks it up."""

import torch

from samkit.optim.ascents import Ascent


def sign_direction(optimizer, buckets, options):
    """eps = rho sign(g) / sqrt(d) (||eps|| <= rho)."""
    d = sum(p.numel() for b in buckets for p in b.params)
    for b in buckets:
        torch._foreach_sign_(b.grads)
        torch._foreach_mul_(b.grads, float(b.group["rho"]) / d**0.5)


TOY = Ascent(
    "toysign", sign_direction, "toy: eps = rho sign(g) / sqrt(d)", rho=0.1,
    edge_note="no closed-form edge for the toy sign ascent",
    effective_note="sign(g) is not of the form M g",
)  # fmt: skip
