"""Reference implementations of the SAM-family variants, written from the papers' formulas.

Everything works on one flat float64 vector ``w`` and a gradient function ``grad(w)``, one step
at a time, with plain SGD (``w <- w - lr d``) as the base optimizer. They share no code with
samkit: the tests compare samkit's foreach implementation against them.
"""

from __future__ import annotations

import math

import torch


def unit(v):
    n = float(v.norm())
    return torch.zeros_like(v) if n == 0 else v / n


def sam_step(w, grad, lr, rho):
    g = grad(w)
    return w - lr * grad(w + rho * unit(g))


def gsam_rho(lr, rho_max, rho_min, lr_max, lr_min):
    """rho_t = rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min), clipped."""
    if lr_max == lr_min:
        return rho_max
    frac = min(1.0, max(0.0, (lr - lr_min) / (lr_max - lr_min)))
    return rho_min + (rho_max - rho_min) * frac


def gsam_step(w, grad, lr, rho, alpha):
    """GSAM (Zhuang et al. 2022): d = g_p - alpha g_perp, g_perp = g - proj_{g_p} g."""
    g = grad(w)
    gp = grad(w + rho * unit(g))
    g_par = (g @ gp) / (gp @ gp) * gp
    return w - lr * (gp - alpha * (g - g_par))


class LookSAMRef:
    """LookSAM (Liu et al. 2022), Algorithm 1; counts gradient evaluations."""

    def __init__(self, rho, k, alpha):
        self.rho, self.k, self.alpha = rho, k, alpha
        self.t = 0
        self.gv = None
        self.passes = 0

    def step(self, w, grad, lr):
        g = grad(w)
        self.passes += 1
        if self.t % self.k == 0:
            gs = grad(w + self.rho * unit(g))
            self.passes += 1
            cos = (g @ gs) / (g.norm() * gs.norm())
            self.gv = gs - gs.norm() * cos * g / g.norm()
        else:
            gs = g + self.alpha * g.norm() / self.gv.norm() * self.gv
        self.t += 1
        return w - lr * gs


def fisher_eps(g, rho, eta):
    """Fisher SAM (Kim et al. 2022): F = 1 + eta g^2, eps = rho F^-1 g / sqrt(g^T F^-1 g)."""
    f = 1 + eta * g * g
    return rho * (g / f) / math.sqrt(float(g @ (g / f)))


class FriendlySAMRef:
    """F-SAM (Li et al. 2024), the form of the official code: d = g - sigma m, then m <- EMA."""

    def __init__(self, rho, sigma, lmbda):
        self.rho, self.sigma, self.lmbda = rho, sigma, lmbda
        self.m = None

    def step(self, w, grad, lr):
        g = grad(w)
        if self.m is None:
            self.m, d = g.clone(), g
        else:
            d = g - self.sigma * self.m
            self.m = self.lmbda * self.m + (1 - self.lmbda) * g
        return w - lr * grad(w + self.rho * unit(d))


def friendly_eps_mean_first(g, m_prev, rho, lmbda):
    """The brief's form: m <- lmbda m + (1 - lmbda) g, then eps along g - m (sigma = 1)."""
    m = lmbda * m_prev + (1 - lmbda) * g
    return rho * unit(g - m)


def esam_swp_eps(grads, rho, beta, keep):
    """ESAM's SWP: eps_i = keep_i / beta * rho g_i / ||g|| (one mask entry per tensor)."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [(1.0 / beta if k else 0.0) * rho * g / norm for g, k in zip(grads, keep, strict=True)]


def ae_decisions(sq_norms, c, delta):
    """AE-SAM (Jiang et al. 2023): EMA mean/variance of ||g||^2, SAM iff s >= mu + c sigma."""
    mean, var, out = None, 0.0, []
    for s in sq_norms:
        if mean is None:
            mean = s
        else:
            mean = delta * mean + (1 - delta) * s
            var = delta * var + (1 - delta) * (s - mean) ** 2
        out.append(s >= mean + c * math.sqrt(var))
    return out


def rst_decisions(n, p, seed):
    """RST (Zhao et al. 2022): SAM iff u_t < p, u_t from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return [float(torch.rand((), generator=gen)) < p for _ in range(n)]
