"""Reference implementations written from the papers' formulas, one tensor at a time, float64.

They share no code with samkit: the tests compare samkit's foreach kernels against them.
"""

from __future__ import annotations

import math

import torch


def sam_eps(grads, rho):
    """SAM (Foret et al.): eps = rho g / ||g||_2 over all tensors; 0 for a zero gradient."""
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    if norm == 0:
        return [torch.zeros_like(g) for g in grads]
    return [rho * g / norm for g in grads]


def usam_eps(grads, rho):
    return [rho * g for g in grads]


def t_diag(w, eta, normalization, normalize):
    """ASAM's T_w: |w| + eta, or ||w_i|| + eta per output filter; 1 where not normalized."""
    if not normalize:
        return torch.ones_like(w)
    if normalization == "elementwise":
        return w.abs() + eta
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        out[i] = w[i].norm() + eta
    return out


def asam_eps(params, grads, rho, eta, p=2, normalization="elementwise", normalize=None):
    """ASAM (Kwon et al.): p=2: eps = rho T^2 g / ||T g||; p=inf: eps = rho T sign(g)."""
    normalize = normalize or [True] * len(params)
    ts = [t_diag(w, eta, normalization, n) for w, n in zip(params, normalize, strict=True)]
    if p == 2:
        norm = math.sqrt(sum(float(((t * g) ** 2).sum()) for t, g in zip(ts, grads, strict=True)))
        if norm == 0:
            return [torch.zeros_like(g) for g in grads]
        return [rho * t * t * g / norm for t, g in zip(ts, grads, strict=True)]
    return [rho * t * torch.sign(g) for t, g in zip(ts, grads, strict=True)]
