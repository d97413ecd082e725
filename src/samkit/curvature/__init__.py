"""Curvature of a loss from Hessian-vector products: the Hessian as a linear operator, its top
eigenvalues (Lanczos, power iteration), its trace (Hutchinson), its spectral density (stochastic
Lanczos quadrature) and the Adam-preconditioned Hessian.

>>> from samkit.curvature import HessianOperator, top_eigenvalues, hessian_trace
>>> H = HessianOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
>>> top = top_eigenvalues(H, k=1, tol=1e-4)      # top.values, top.vectors, top.matvecs
>>> tr = hessian_trace(H, samples=100)           # tr.mean, tr.stderr
>>> Heff = effective_hessian(H, sam_optimizer)  # H + (rho/c) H M H of one SAM-family step
"""

from samkit.curvature.adam import PreconditionedOperator, adam_preconditioned
from samkit.curvature.density import SpectralDensity, plot_spectral_density, spectral_density
from samkit.curvature.effective import EffectiveHessian, effective_hessian
from samkit.curvature.eigen import EigenResult, top_eigenvalues
from samkit.curvature.operator import HessianOperator, LinearOperator, MatrixOperator
from samkit.curvature.trace import TraceResult, hessian_trace

__all__ = [
    "EffectiveHessian",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "PreconditionedOperator",
    "SpectralDensity",
    "TraceResult",
    "adam_preconditioned",
    "effective_hessian",
    "hessian_trace",
    "plot_spectral_density",
    "spectral_density",
    "top_eigenvalues",
]
