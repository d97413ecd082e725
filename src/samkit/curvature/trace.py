r"""Hutchinson's estimator of the trace.

.. math::
    \operatorname{tr}(H) = \mathbb{E}_v\,[v^\top H v], \qquad v_i \in \{-1, +1\}
    \text{ i.i.d. uniform (Rademacher)},

estimated by the mean of ``samples`` draws, with standard error :math:`s/\sqrt{m}` (``s`` the
sample standard deviation). For Rademacher vectors
:math:`\operatorname{Var}(v^\top H v) = 2\sum_{i \ne j} H_{ij}^2`, the smallest variance among
vectors with independent entries (Hutchinson 1990).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from samkit.curvature.operator import as_operator, local_part, reduce_sum
from samkit.optim._validation import check_int


@dataclass(frozen=True)
class TraceResult:
    """Attributes:
    mean: the trace estimate.
    stderr: its standard error, ``std(samples, ddof=1) / sqrt(len(samples))``.
    samples: the ``(m,)`` float64 draws :math:`v^\\top H v` (on the CPU).
    matvecs: the products used (one per sample).
    """

    mean: float
    stderr: float
    samples: Tensor
    matvecs: int


def hessian_trace(H, samples: int = 100, seed: int = 0) -> TraceResult:
    r"""Estimate :math:`\operatorname{tr}(H)` by Hutchinson's method with Rademacher vectors.

    Args:
        H: a :class:`~samkit.curvature.HessianOperator`, any operator, or a square tensor.
        samples: the number of random vectors (>= 2, for the standard error).
        seed: seeds the vectors (drawn on the operator's device).

    The draws stay on the device until the end (no host sync per product).

    References:
        M. F. Hutchinson. A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines. Communications in Statistics, 1990.
    """
    op = as_operator(H)
    samples = check_int("samples", samples, 2)
    d = op.shape[0]
    generator = torch.Generator(device=op.device).manual_seed(int(seed))
    draws = torch.empty(samples, dtype=torch.float64, device=op.device)
    for i in range(samples):
        v = torch.randint(0, 2, (d,), generator=generator, device=op.device).to(op.dtype)
        v = local_part(op, v.mul_(2).sub_(1))  # this rank's part of it (FSDP2)
        draws[i] = reduce_sum(op, torch.dot(v, op @ v)).to(torch.float64)
    draws = draws.cpu()
    mean = float(draws.mean())
    stderr = float(draws.std(correction=1)) / math.sqrt(samples)
    return TraceResult(mean=mean, stderr=stderr, samples=draws, matvecs=samples)
