"""Curvature of a loss from Hessian-vector products: the Hessian, the Gauss-Newton matrix and
the Fisher (empirical, Monte-Carlo) as linear operators on one base, their top eigenvalues
(Lanczos, power iteration) and per-block spectra, trace (Hutchinson, Hutch++), spectral density
(stochastic Lanczos quadrature) and the Adam-preconditioned Hessian.

>>> from samkit.curvature import HessianOperator, top_eigenvalues, hessian_trace
>>> H = HessianOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
>>> top = top_eigenvalues(H, k=1, tol=1e-4)      # top.values, top.vectors, top.matvecs
>>> tr = hessian_trace(H, samples=100)           # tr.mean, tr.stderr
>>> Heff = effective_hessian(H, sam_optimizer)  # H + (rho/c) H M H of one SAM-family step
>>> print(block_spectra(H, blocks="module", k=3))  # lambda_1..3 of each layer's block
"""

from samkit.curvature.adam import PreconditionedOperator, adam_preconditioned
from samkit.curvature.blocks import BlockSpectra, BlockSpectrum, block_spectra
from samkit.curvature.density import SpectralDensity, plot_spectral_density, spectral_density
from samkit.curvature.effective import EffectiveHessian, effective_hessian
from samkit.curvature.eigen import EigenResult, top_eigenvalues
from samkit.curvature.fisher import EmpiricalFisherOperator, FisherProduct, MCFisherOperator
from samkit.curvature.ggn import GaussNewtonProduct, GGNOperator
from samkit.curvature.operator import (
    CurvatureOperator,
    DoubleBackward,
    ForwardOverReverse,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    Product,
    UnsupportedProduct,
    loss_and_gradient,
)
from samkit.curvature.trace import TraceResult, hessian_trace, hutchpp_trace

__all__ = [
    "BlockSpectra",
    "BlockSpectrum",
    "CurvatureOperator",
    "DoubleBackward",
    "EffectiveHessian",
    "EigenResult",
    "EmpiricalFisherOperator",
    "FisherProduct",
    "ForwardOverReverse",
    "GGNOperator",
    "GaussNewtonProduct",
    "HessianOperator",
    "LinearOperator",
    "MCFisherOperator",
    "MatrixOperator",
    "PreconditionedOperator",
    "Product",
    "SpectralDensity",
    "TraceResult",
    "UnsupportedProduct",
    "adam_preconditioned",
    "block_spectra",
    "effective_hessian",
    "hessian_trace",
    "hutchpp_trace",
    "loss_and_gradient",
    "plot_spectral_density",
    "spectral_density",
    "top_eigenvalues",
]
