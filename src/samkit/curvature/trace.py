r"""Hutchinson's estimator of the trace, and Hutch++ (:func:`hutchpp_trace`).

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

from samkit.curvature.eigen import _orthonormal_block
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


def hutchpp_trace(H, matvecs: int = 99, seed: int = 0) -> TraceResult:
    r"""Estimate :math:`\operatorname{tr}(H)` by Hutch++ with ``matvecs`` products.

    The products are split in three: :math:`s = \lfloor m/3 \rfloor` Rademacher columns
    :math:`S`, an orthonormal basis :math:`Q` of :math:`HS` (its top-:math:`s` range, found
    with :math:`s` products), the trace of :math:`H` on that range exactly (:math:`s` more),
    and Hutchinson with the remaining :math:`r = m - 2s` Rademacher vectors :math:`g_i` on
    the rest, projected off :math:`Q`:

    .. math::
        \widehat{\operatorname{tr}}(H) = \operatorname{tr}(Q^\top H Q)
        + \frac{1}{r}\sum_{i=1}^{r} g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i .

    Unbiased for any :math:`Q`; for a positive semi-definite :math:`H` the relative error is
    :math:`O(1/m)` with high probability, against :math:`O(1/\sqrt{m})` for Hutchinson: the
    few large eigenvalues, which make most of Hutchinson's variance, are taken exactly. It
    gains most when the spectrum decays (a network's Hessian: a few outliers over a bulk
    near zero); on a flat spectrum it is no better than Hutchinson with :math:`r` vectors. If
    :math:`\operatorname{rank}(H) \le s` the estimate is exact (up to rounding).

    The result has the form of :func:`hessian_trace`'s: ``samples`` holds the :math:`r`
    draws :math:`\operatorname{tr}(Q^\top H Q) + g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i`
    (their mean is the estimate) and ``stderr`` is their standard error: the error of the
    Hutchinson part given :math:`Q`, the only random part once :math:`Q` is fixed.

    Args:
        H: a :class:`~samkit.curvature.HessianOperator`, any operator, or a square tensor.
        matvecs: the products in all (>= 4: a sketch of at least 1 column and at least 2
            Hutchinson vectors for the standard error). The three parts are applied as
            ``(d, s)`` and ``(d, r)`` blocks (one batched product per batch where the
            operator has one).
        seed: seeds the vectors, drawn on the operator's device from one generator (the
            sketch first, then the Hutchinson vectors): the same vectors on every process.

    Under a process group (an operator of the union of the ranks' data: DDP, FSDP2) the
    estimate is that of the union, the same on every rank; an FSDP2 operator's blocks are held
    in shards like its vectors (each drawn in full and cut), :math:`Q` orthonormalized with
    the dots summed over the ranks.

    References:
        R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff. Hutch++: Optimal Stochastic Trace
        Estimation. SIAM Symposium on Simplicity in Algorithms (SOSA), 2021.
    """
    op = as_operator(H)
    m = check_int("matvecs", matvecs, 4)
    d = op.shape[0]
    s = m // 3
    r = m - 2 * s
    generator = torch.Generator(device=op.device).manual_seed(int(seed))

    def rademacher(cols: int) -> Tensor:
        v = torch.randint(0, 2, (d, cols), generator=generator, device=op.device).to(op.dtype)
        return local_part(op, v.mul_(2).sub_(1))  # drawn in full, this rank's rows kept

    sketch = rademacher(s)
    probes = rademacher(r)
    Y = op @ sketch
    # Q: an orthonormal basis of H S (Gram-Schmidt twice, the dots summed over the ranks for
    # sharded vectors; columns in the span of the ones before are dropped)
    norm = float(reduce_sum(op, Y.pow(2).sum(dim=0)).max().sqrt())
    Q, _ = _orthonormal_block(None, Y, norm, generator, fill=False, op=op)
    if Q.shape[1]:
        head = reduce_sum(op, torch.sum(Q * (op @ Q), dtype=torch.float64))  # tr(Q^T H Q)
        for _ in range(2):  # twice: orthogonal to Q to rounding
            probes = probes - Q @ reduce_sum(op, Q.T @ probes)
    else:
        head = torch.zeros((), dtype=torch.float64, device=op.device)
    tail = reduce_sum(op, torch.sum(probes * (op @ probes), dim=0, dtype=torch.float64))
    draws = (head + tail).cpu()
    mean = float(draws.mean())
    stderr = float(draws.std(correction=1)) / math.sqrt(r)
    return TraceResult(mean=mean, stderr=stderr, samples=draws, matvecs=m)
