r"""The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit probe :math:`v`, :math:`m` Lanczos steps give :math:`T_m = S\,\Theta\,S^\top`; the
nodes :math:`\theta_i` and weights :math:`\tau_i = s_{1i}^2` form the Gauss quadrature of the
spectral measure of :math:`v`, exact for polynomials of degree :math:`\le 2m - 1`:

.. math::
    v^\top f(H)\, v \approx \sum_{i=1}^m \tau_i f(\theta_i), \qquad
    \phi(t) = \frac{1}{d}\sum_j \delta(t - \lambda_j)
    \approx \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_i \tau_i^{(l)} g_\sigma(t - \theta_i^{(l)})

averaged over :math:`n_v` Rademacher probes, with a Gaussian :math:`g_\sigma` of width
:math:`\sigma` to smooth the density (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samkit.curvature.eigen import _BlockLanczos
from samkit.curvature.operator import as_operator, local_part
from samkit.optim._validation import check_int


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights, one row per probe (rows padded with weight 0).

    Attributes:
        nodes: ``(num_probes, num_steps)`` Ritz values :math:`\\theta_i`.
        weights: ``(num_probes, num_steps)`` weights :math:`\\tau_i` (each row sums to 1).
        dim: the dimension ``d`` of the operator.
        matvecs: the products used.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    matvecs: int

    def moment(self, power: int) -> float:
        r""":math:`\frac{1}{d}\operatorname{tr}(H^p)` estimated by the quadrature."""
        return float(np.mean(np.sum(self.weights * self.nodes**power, axis=1)))

    def trace(self) -> float:
        """The trace estimate :math:`d \\cdot` ``moment(1)``."""
        return self.dim * self.moment(1)

    def default_sigma(self) -> float:
        span = float(self.nodes[self.weights > 0].max() - self.nodes[self.weights > 0].min())
        return 0.01 * span if span > 0 else 1e-3 * max(1.0, float(np.abs(self.nodes).max()))

    def density(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        r""":math:`\phi(t)` on ``grid``, smoothed with a Gaussian of width ``sigma`` (default 1%
        of the spread of the nodes); it integrates to 1."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"Invalid sigma: {sigma!r} (allowed: a number > 0)")
        grid = np.asarray(grid, dtype=np.float64)
        diff = grid[:, None, None] - self.nodes[None]
        kernel = np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        return np.mean(np.sum(self.weights[None] * kernel, axis=2), axis=1)


def spectral_density(H, num_probes: int = 1, num_steps: int = 80, seed: int = 0) -> SpectralDensity:
    """Estimate the eigenvalue density of ``H`` by stochastic Lanczos quadrature.

    Args:
        H: a :class:`~samkit.curvature.HessianOperator`, any operator, or a square tensor.
        num_probes: the number of Rademacher probe vectors (>= 1).
        num_steps: Lanczos steps per probe (>= 1; at most ``d``). With ``num_steps = d`` the
            nodes are the exact eigenvalues. A run stops early at an invariant subspace (the
            quadrature is then exact).
        seed: seeds the probes.

    Each probe costs ``num_steps`` products and keeps ``num_steps`` vectors on the device (full
    reorthogonalization, so no spurious copies of the outliers): samkit's one Lanczos
    (:func:`~samkit.curvature.top_eigenvalues`' block Lanczos with a block of one vector, no
    restart, a stop at an invariant subspace).

    References:
        L. Lin, Y. Saad, C. Yang. Approximating spectral densities of large matrices. SIAM
        Review, 2016. B. Ghorbani, S. Krishnan, Y. Xiao. An investigation into neural net
        optimization via Hessian eigenvalue density. ICML 2019.
    """
    op = as_operator(H)
    num_probes = check_int("num_probes", num_probes, 1)
    num_steps = check_int("num_steps", num_steps, 1)
    d = op.shape[0]
    m = min(num_steps, d)
    generator = torch.Generator(device=op.device).manual_seed(int(seed))
    nodes = np.zeros((num_probes, m))
    weights = np.zeros((num_probes, m))
    matvecs = 0
    for p in range(num_probes):
        v = torch.randint(0, 2, (d,), generator=generator, device=op.device).to(op.dtype)
        v = local_part(op, v.mul_(2).sub_(1))  # this rank's part of it (FSDP2)
        run = _BlockLanczos(op, v[:, None], generator, max_basis=m, fill=False)
        while run.m < m and not run.exhausted:
            run.step()
        matvecs += run.counter.count
        theta, s, _ = run.ritz()  # C is the tridiagonal T of the probe's Lanczos run
        nodes[p, : run.m] = theta
        weights[p, : run.m] = s[0] ** 2
    return SpectralDensity(nodes=nodes, weights=weights, dim=d, matvecs=matvecs)


def plot_spectral_density(
    result: SpectralDensity,
    ax=None,
    sigma: float | None = None,
    num_points: int = 1000,
    log: bool = True,
):
    """Draw the smoothed density of ``result`` on a matplotlib ``ax`` (a new figure if None).

    ``log=True`` uses a log scale for the density (the outliers of a Hessian are orders of
    magnitude rarer than its bulk), with a floor of 1e-8. Returns the axes. Needs matplotlib
    (``pip install "samkit[experiments]"``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plot_spectral_density needs matplotlib: pip install "samkit[experiments]"'
        ) from err
    num_points = check_int("num_points", num_points, 2)
    sigma = result.default_sigma() if sigma is None else float(sigma)
    live = result.nodes[result.weights > 0]
    lo, hi = float(live.min()) - 5 * sigma, float(live.max()) + 5 * sigma
    grid = np.linspace(lo, hi, num_points)
    values = result.density(grid, sigma)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    if log:
        ax.semilogy(grid, np.maximum(values, 1e-8))
    else:
        ax.plot(grid, values)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"spectral density (SLQ, {result.nodes.shape[0]} probe(s), sigma={sigma:.3g})")
    return ax
