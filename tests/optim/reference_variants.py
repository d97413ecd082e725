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


# ----------------------------------------------------------------- issue 23: per-tensor loops
# The references below work on a list of float64 tensors ``ws`` and ``grads(ws) -> list``.


def global_norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


class HeavyBallRef:
    """torch.optim.SGD's update, per tensor: d += wd w; b = d (first step) or mu b + d;
    w -= lr b."""

    def __init__(self, lr, momentum=0.0, weight_decay=0.0):
        self.lr, self.mu, self.wd = lr, momentum, weight_decay
        self.bufs = None

    def step(self, ws, ds):
        ds = [d + self.wd * w for w, d in zip(ws, ds, strict=True)]
        if self.bufs is None:
            self.bufs = [d.clone() for d in ds]
        else:
            self.bufs = [self.mu * b + d for b, d in zip(self.bufs, ds, strict=True)]
        return [w - self.lr * b for w, b in zip(ws, self.bufs, strict=True)]


def centralize(g):
    """Gradient centralization (Yong et al. 2020): a weight's gradient minus its mean over each
    output unit (all dimensions but the first); 1-d tensors unchanged."""
    if g.dim() <= 1:
        return g.clone()
    rows = g.reshape(g.shape[0], -1)
    return (rows - rows.mean(dim=1, keepdim=True)).reshape(g.shape)


def gcsam_step(ws, grads, base, rho, raw_norm=False):
    """GCSAM (Hassan et al. 2025): eps = rho GC(g) / ||GC(g)||; descend with g at w + eps.
    ``raw_norm``: divide by ||g|| instead (pytorch_optimizer's SAM(use_gc=True))."""
    g = grads(ws)
    gc = [centralize(t) for t in g]
    norm = global_norm(g if raw_norm else gc)
    gp = grads([w + rho * t / norm for w, t in zip(ws, gc, strict=True)])
    return base.step(ws, gp)


def wsam_step(ws, grads, base, rho, gamma, decouple):
    """WSAM (Yue et al. 2023, Algorithm 1 and the atorch code): alpha = gamma / (1 - gamma);
    coupled: base step with g + alpha (g_p - g); decoupled: base step with g, then
    w -= lr alpha (g_p - g)."""
    alpha = gamma / (1 - gamma)
    g = grads(ws)
    norm = global_norm(g)
    gp = grads([w + rho * t / norm for w, t in zip(ws, g, strict=True)])
    if not decouple:
        return base.step(ws, [q + alpha * (p - q) for p, q in zip(gp, g, strict=True)])
    ws = base.step(ws, g)
    return [w - base.lr * alpha * (p - q) for w, p, q in zip(ws, gp, g, strict=True)]


class BSAMRef:
    """bSAM (Moellenhoff & Khan 2023), the official code's build_bsam_optimizer, per tensor:
    theta = w + xi / sqrt(N s); g = grad(theta); eps = rho g / s; g_e = grad(w + eps);
    m = b1 m + (1 - b1)(g_e + delta w); w -= lr m / s;
    s = b2 s + (1 - b2)(sqrt(s)|g| + delta + damp).
    The noise xi: torch.randn per tensor, in order, from a generator seeded with ``seed``."""

    def __init__(self, ws, lr, rho, num_data, beta1, beta2, delta, damping, s0, seed):
        self.lr, self.rho, self.n = lr, rho, num_data
        self.b1, self.b2, self.delta, self.damping = beta1, beta2, delta, damping
        self.s = [torch.full_like(w, s0) for w in ws]
        self.m = [torch.zeros_like(w) for w in ws]
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, ws, grads):
        xi = [torch.randn(w.shape, generator=self.gen, dtype=w.dtype) for w in ws]
        theta = [w + x / torch.sqrt(self.n * s) for w, x, s in zip(ws, xi, self.s, strict=True)]
        g = grads(theta)
        ge = grads([w + self.rho * t / s for w, t, s in zip(ws, g, self.s, strict=True)])
        self.m = [self.b1 * m + (1 - self.b1) * (e + self.delta * w)
                  for m, e, w in zip(self.m, ge, ws, strict=True)]
        new = [w - self.lr * m / s for w, m, s in zip(ws, self.m, self.s, strict=True)]
        self.s = [self.b2 * s
                  + (1 - self.b2) * (torch.sqrt(s) * t.abs() + self.delta + self.damping)
                  for s, t in zip(self.s, g, strict=True)]
        return new


def periodic_decisions(n, interval):
    """Composer's SAMOptimizer: step t (from 0) is a SAM step iff (t + 1) % interval == 0."""
    return [(t + 1) % interval == 0 for t in range(n)]
