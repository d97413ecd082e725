r"""Extreme eigenvalues of a symmetric operator from matrix-vector products.

* **Lanczos** with full reorthogonalization: after :math:`m` products the Krylov basis
  :math:`Q_m` (orthonormal, kept on the operator's device) and the tridiagonal
  :math:`T_m = Q_m^\top A Q_m` give Ritz pairs :math:`(\theta_i, Q_m s_i)` whose residual is
  :math:`\|A y_i - \theta_i y_i\| = \beta_m |s_{m,i}|`, known without another product.
* **Power iteration** with deflation (each new vector is kept orthogonal to the pairs already
  found), for comparison; a shift turns "largest magnitude" into "largest algebraic".

The stopping test bounds the eigenvalue error. For a unit Ritz vector with residual
:math:`r = \|A y - \theta y\|` there is an eigenvalue :math:`\lambda` with

.. math::
    |\lambda - \theta| \le \min\big(r,\; r^2/\gamma\big)

where :math:`\gamma` is the gap between :math:`\theta` and the rest of the spectrum
(Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, ch. 10-11). Lanczos estimates
:math:`\gamma` from the other Ritz values, each moved towards :math:`\theta` by its own residual
(:math:`\gamma = \min_{j \ne i} |\theta_i - \theta_j| - r_j`; without a positive gap only
:math:`r` is used), and stops when every wanted pair has ``bound <= tol * |theta|``: the
eigenvalues are then accurate to ``tol`` relative, while the eigenvectors are only accurate
to about :math:`r/\gamma \approx \sqrt{\mathrm{tol}}` (ask for a smaller ``tol`` when the
vectors matter). Power iteration has no gap estimate and stops on the residual alone,
:math:`r \le \mathrm{tol}\,|\theta|` (the test of ARPACK / ``scipy.sparse.linalg.eigsh``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samkit.curvature.operator import (
    LinearOperator,
    as_operator,
    local_dim,
    local_part,
    reduce_sum,
)
from samkit.optim._validation import check_int

METHODS = ("lanczos", "power")
WHICH = ("LA", "LM")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs found by :func:`top_eigenvalues`.

    Attributes:
        values: ``(k,)`` float64 on the CPU, largest first (by value for ``which="LA"``, by
            magnitude for ``"LM"``).
        vectors: ``(d, k)`` unit eigenvectors, in the operator's dtype on its device (use
            ``H.unflatten(result.vectors[:, i])`` for parameter-shaped tensors).
        residuals: ``(k,)`` float64, :math:`\\|A y_i - \\theta_i y_i\\|`.
        error_bounds: ``(k,)`` float64, the bounds on :math:`|\\lambda_i - \\theta_i|` that the
            stopping test used (the residuals for power iteration).
        matvecs: the products used.
        converged: whether every pair met the tolerance within ``max_iter``.
        method: ``"lanczos"``, ``"power"`` or ``"rayleigh-ritz"``
            (:func:`samkit.curvature.effective.effective_top_on_krylov`).
        basis, image: with ``keep_basis=True`` (Lanczos): the orthonormal Krylov basis
            :math:`Q` (``(d, m)``) of the final space and :math:`AQ` (``(d, m)``, from the
            recurrence, no extra products), so that another operator built from ``A`` can be
            projected on the same space; ``None`` otherwise.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    matvecs: int
    converged: bool
    method: str
    basis: Tensor | None = None
    image: Tensor | None = None


# -- vectors held whole or in parts (FSDP2) -------------------------------------------------------


def _random(op, generator: torch.Generator) -> Tensor:
    """A standard normal vector, drawn in full (``d`` entries) and cut to this rank's part: the
    same vector and the same generator state on every rank and at every world size."""
    v = torch.randn(op.shape[0], generator=generator, device=op.device, dtype=op.dtype)
    return local_part(op, v)


def _norms(op, w: Tensor) -> Tensor:
    """Column norms (or the norm) of local parts, over the ranks."""
    return reduce_sum(op, w.pow(2).sum(dim=0)).sqrt()


# -- argument checks ------------------------------------------------------------------------------


def _check_tol(tol) -> float:
    try:
        ok = math.isfinite(float(tol)) and 0.0 < float(tol) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid tol: {tol!r} (allowed: a number > 0 and < 1)")
    return float(tol)


def _initial(op: LinearOperator, init, generator: torch.Generator) -> Tensor:
    """The start vector(s), ``(d,)`` or ``(d, j)`` (this rank's part of them for a sharded
    operator), on the operator's device and dtype."""
    d = local_dim(op)
    if init is None:
        return _random(op, generator)
    if isinstance(init, EigenResult):
        init = init.vectors
    if isinstance(init, (list, tuple)):
        init = op.flatten(init)
    if not isinstance(init, Tensor) or init.dim() not in (1, 2) or init.shape[0] != d:
        shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
        raise ValueError(
            f"Invalid init: {shape} (allowed: a vector ({d},), a matrix ({d}, j), a list of "
            "tensors shaped like the parameters, or an EigenResult)"
        )
    init = init.detach().to(op.device, op.dtype)
    norms = _norms(op, init)
    if not bool(torch.all(torch.isfinite(norms)) and torch.all(norms > 0)):
        raise ValueError("Invalid init: a zero or non-finite start vector")
    return init / norms


# -- the Krylov basis ---------------------------------------------------------------------------


class _Basis:
    """Orthonormal rows kept in blocks, so memory grows with the iterations actually used."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = 32,
                 reduce=None):
        self.dim, self.dtype, self.device, self.block = dim, dtype, device, block
        self.reduce = reduce or (lambda t: t)  # local dots summed over the ranks (FSDP2)
        self.blocks: list[Tensor] = []
        self.size = 0

    def views(self) -> list[Tensor]:
        out = []
        for i, b in enumerate(self.blocks):
            rows = min(self.block, self.size - i * self.block)
            if rows > 0:
                out.append(b[:rows])
        return out

    def append(self, v: Tensor) -> None:
        if self.size == len(self.blocks) * self.block:
            self.blocks.append(
                torch.empty(self.block, self.dim, dtype=self.dtype, device=self.device)
            )
        self.blocks[self.size // self.block][self.size % self.block].copy_(v)
        self.size += 1

    def truncate(self, size: int) -> None:
        self.size = size
        del self.blocks[-(-size // self.block) :]  # drop the blocks left empty

    def orthogonalize_(self, w: Tensor) -> Tensor:
        """Remove from ``w`` (a ``(d,)`` vector or a ``(d, p)`` block) its components on the
        basis: classical Gram-Schmidt, twice ("twice is enough", Giraud et al. 2005). Returns
        the coefficients removed, ``(size,)`` or ``(size, p)``."""
        views = self.views()
        shape = (self.size,) if w.dim() == 1 else (self.size, w.shape[1])
        total = torch.zeros(shape, dtype=w.dtype, device=w.device)
        if not views:
            return total
        update = w.addmv_ if w.dim() == 1 else w.addmm_
        if len(views) == 1:  # the first 32 vectors: no concatenation and split of coefficients
            (b,) = views
            for _ in range(2):
                h = self.reduce(b @ w)
                update(b.T, h, alpha=-1)
                total += h
            return total
        sizes = [b.shape[0] for b in views]
        for _ in range(2):
            coeffs = list(torch.split(self.reduce(torch.cat([b @ w for b in views])), sizes))
            for b, h in zip(views, coeffs, strict=True):
                update(b.T, h, alpha=-1)
            total += torch.cat(coeffs)
        return total

    def rows(self, start: int, stop: int) -> Tensor:
        """Basis vectors ``start .. stop-1`` as the columns of a ``(d, stop - start)`` tensor."""
        return torch.stack(
            [self.blocks[i // self.block][i % self.block] for i in range(start, stop)], dim=1
        )

    def combine(self, s: Tensor, count: int | None = None) -> Tensor:
        """:math:`Q^\\top S` over the first ``count`` vectors (default all), for ``S`` of shape
        ``(count, k)``: ``(d, k)``."""
        count = self.size if count is None else count
        out = torch.zeros(self.dim, s.shape[1], dtype=self.dtype, device=self.device)
        start = 0
        for b in self.views():
            if start >= count:
                break
            b = b[: count - start]
            out.addmm_(b.T, s[start : start + b.shape[0]])
            start += b.shape[0]
        return out


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    key = -theta if which == "LA" else -np.abs(theta)
    return np.argsort(key, kind="stable")[:k]


# -- block Lanczos with thick restarts (top_eigenvalues) ------------------------------------------


def _orthonormal_block(
    basis: _Basis, w: Tensor, norm_t: float, generator: torch.Generator, fill: bool = True,
    op=None,
) -> tuple[Tensor, np.ndarray]:
    """Orthonormalize the columns of ``w`` ``(d, p)`` (already orthogonal to ``basis``) among
    themselves: ``w = Q R``. A column that is (numerically) in the span of the basis and the
    columns before it is an invariant direction: its diagonal entry of ``R`` is 0 and, with
    ``fill``, it is replaced by a random unit vector orthogonal to everything, so the space
    keeps growing; without ``fill`` it is dropped (``Q`` has fewer columns). Returns ``Q``
    ``(d, q)`` and ``R`` ``(p, p)`` (float64, host; row ``i`` belongs to the ``i``-th kept
    column). ``op`` (the operator) says how vectors are held: whole, or in parts over the
    ranks (FSDP2; the dots are then summed over the ranks, random columns drawn in full)."""
    local, p = w.shape
    d = op.shape[0] if op is not None else local
    reduce = (lambda t: reduce_sum(op, t)) if op is not None else (lambda t: t)
    eps = torch.finfo(w.dtype).eps
    tiny = torch.finfo(w.dtype).tiny
    r = np.zeros((p, p))
    cols: list[Tensor] = []
    for i in range(p):
        col = w[:, i].clone()
        row = len(cols)
        for _ in range(2):
            for j, q in enumerate(cols):
                h = reduce(torch.dot(q, col))
                col.sub_(q * h)
                r[j, i] += float(h)
        norm = float(reduce(torch.dot(col, col)).sqrt())
        if norm > 100 * eps * max(norm_t, tiny) * math.sqrt(d):
            r[row, i] = norm
            cols.append(col / norm)
            continue
        if not fill:
            continue
        for _ in range(3):  # a random direction orthogonal to the basis and the block
            if op is not None:
                col = _random(op, generator)
            else:
                col = torch.randn(d, generator=generator, device=w.device, dtype=w.dtype)
            basis.orthogonalize_(col)
            for _ in range(2):
                for q in cols:
                    col.sub_(q * reduce(torch.dot(q, col)))
            norm = float(reduce(torch.dot(col, col)).sqrt())
            if norm > 1e-3:
                break
        cols.append(col / max(norm, tiny))
    if not cols:
        return w.new_zeros(local, 0), r
    return torch.stack(cols, dim=1), r


class _BlockLanczos:
    r"""samkit's one Lanczos: block Lanczos with full reorthogonalization (classical
    Gram-Schmidt twice against the whole basis) and thick restarts, serving both
    :func:`top_eigenvalues` (block ``p``, restarts, a random direction at a breakdown) and
    :func:`~samkit.curvature.spectral_density` (``p = 1`` from the probe, no restart, a stop at
    an invariant subspace: then :math:`C` is the tridiagonal :math:`T_m`).

    The coefficients :math:`C = Q^\top A Q` of the processed columns (and the coupling ``E``
    of the last new block, rows ``m .. n-1``) are kept on the host in float64; the basis rows
    ``m .. n-1`` are the pending block. With ``A Q_m = Q_n C[:n, :m]``, the Ritz pairs of the
    space come from ``eigh`` of the symmetrized :math:`C_{mm}`, the residual of pair ``i`` is
    :math:`\|E s_i\|`.
    """

    def __init__(self, op, start: Tensor, generator: torch.Generator, max_basis: int,
                 fill: bool = True) -> None:
        d = op.shape[0]
        self.op, self.generator, self.fill = op, generator, fill
        self.counter = _Counter(op)
        self.d, self.dtype, self.device = d, op.dtype, op.device
        self.p = start.shape[1]
        self.basis = _Basis(local_dim(op), op.dtype, op.device, reduce=lambda t: reduce_sum(op, t))
        q0, _ = _orthonormal_block(self.basis, start, 1.0, generator, op=op)
        for i in range(q0.shape[1]):
            self.basis.append(q0[:, i])
        size = max_basis + 2 * self.p
        self.c = np.zeros((size, size))
        self.m = 0  # processed columns; the pending block is basis rows m .. n-1
        self.n = q0.shape[1]
        self.norm_t = 0.0

    @property
    def exhausted(self) -> bool:
        """The space is invariant (no pending block) or all of ``R^d``."""
        return self.m >= self.d or self.n == self.m

    def step(self) -> None:
        """One block product: the pending block is processed and the next one appended."""
        m, n = self.m, self.n
        pend = self.basis.rows(m, n)  # (d, pb)
        pb = pend.shape[1]
        w = self.counter @ pend
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                "Invalid operator: a product returned non-finite values (check the weights "
                "and the data for NaN / inf)"
            )
        coeffs = self.basis.orthogonalize_(w)  # (n, pb)
        self.c[:n, m : m + pb] = coeffs.double().cpu().numpy()
        m += pb
        self.norm_t = max(self.norm_t, float(np.abs(self.c[:m, :m]).max()))
        room = min(self.p, self.d - n)
        if room > 0:
            qn, r = _orthonormal_block(self.basis, w, self.norm_t, self.generator, self.fill,
                                       op=self.op)
            rows = min(room, qn.shape[1])
            self.c[n : n + rows, m - pb : m] = r[:rows]
            for i in range(rows):
                self.basis.append(qn[:, i])
            n += rows
        self.m, self.n = m, n

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r"""Ritz values (ascending), the eigenvectors ``S`` of :math:`C_{mm}` and every pair's
        residual :math:`\|E s_i\|`."""
        m, n = self.m, self.n
        t = self.c[:m, :m]
        # torch's LAPACK on the host (it keeps to torch's thread count; numpy's OpenBLAS pool
        # spun for 10-30 ms per call on a busy machine)
        theta, s = (a.numpy() for a in torch.linalg.eigh(torch.from_numpy(0.5 * (t + t.T))))
        res = np.linalg.norm(self.c[m:n, :m] @ s, axis=0) if n > m else np.zeros(m)
        return theta, s, res

    def restart(self, theta: np.ndarray, s: np.ndarray) -> None:
        """Thick restart: keep the Ritz vectors ``Q S`` (``A Y = Y Θ + Q_new E S``) and the
        pending block."""
        m, n = self.m, self.n
        keep = s.shape[1]
        y = self.basis.combine(torch.as_tensor(s, dtype=self.dtype, device=self.device), m)
        pending = self.basis.rows(m, n).clone()
        e = self.c[m:n, :m] @ s
        self.basis.truncate(0)
        for i in range(keep):
            self.basis.append(y[:, i])
        for i in range(pending.shape[1]):
            self.basis.append(pending[:, i])
        c_new = np.zeros_like(self.c)
        c_new[:keep, :keep] = np.diag(theta)
        c_new[keep : keep + pending.shape[1], :keep] = e
        self.c = c_new
        self.m, self.n = keep, keep + pending.shape[1]


def _block_lanczos_top(
    op,
    k: int,
    tol: float,
    which: str,
    max_products: int,
    generator: torch.Generator,
    init,
    block: int,
    min_dim: int,
    max_basis: int,
    lag: int = 0,
    keep_basis: bool = False,
) -> EigenResult:
    r"""The top-``k`` driver of :class:`_BlockLanczos`: blocks of ``block`` columns, a stop
    when every wanted Ritz pair meets the test of :func:`top_eigenvalues` with at least
    ``min_dim`` products explored, a thick restart (the best Ritz vectors kept) when the basis
    would exceed ``max_basis`` vectors. ``lag=1`` checks one block late (the CUDA pattern: the
    next product is queued before the host reads the coefficients); the answer is the same,
    one block later.
    """
    d = op.shape[0]
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps

    start = _initial(op, init, generator)
    cols = [start] if start.dim() == 1 else list(start.unbind(1))
    p = max(block, len(cols))
    p = min(p, d)
    cols = cols[:p]
    while len(cols) < p:
        cols.append(_random(op, generator))
    run = _BlockLanczos(op, torch.stack(cols, dim=1), generator, max_basis)
    counter = run.counter
    reached = False  # min_dim products (Krylov directions) have been explored
    state: dict = {}
    snapshots: list[dict] = []

    def evaluate() -> dict:
        m_ = run.m
        theta, s, res_all = run.ritz()
        idx = _wanted(theta, min(k, m_), which)
        nt = max(float(np.abs(theta).max()) if m_ else 0.0, np.finfo(np.float64).tiny)
        floor = math.sqrt(m_) * eps * nt  # rounding in the products and Gram-Schmidt
        bounds = res_all[idx] + floor
        scale = np.abs(theta[idx])
        # a relative test, and for an eigenvalue at the rounding level (|theta| <= floor) an
        # absolute one: its residual must be at the rounding level too
        passed = (bounds <= tol * scale) | ((scale <= floor) & (res_all[idx] <= floor))
        ok = bool(len(idx) == k and np.all(passed))
        return dict(theta=theta, s=s, idx=idx, res=res_all[idx], bounds=bounds, m=m_, ok=ok,
                    norm=nt)

    while True:
        run.step()
        if counter.count >= min_dim or run.m >= d:  # restarts keep the explored space's best
            reached = True
        out_of_room = run.exhausted or counter.count + p > max_products
        restarts = run.n + p > max_basis and max_basis < d and run.m > k
        if not (lag or reached or out_of_room or restarts):
            continue  # nothing below reads the Ritz pairs of this block (no eigh, no residuals)
        current = evaluate()
        current["reached"] = reached
        snapshots.append(current)
        if lag:  # read the state one block late (the product of this block is already queued)
            judged = snapshots[-2] if len(snapshots) > 1 else None
        else:
            judged = current
        if judged is not None and judged["reached"] and judged["ok"]:
            state = judged
            break
        if out_of_room:
            # the space is exhausted (exact up to rounding) or the budget is spent
            state = dict(current, ok=current["ok"] and reached)
            break
        snapshots = snapshots[-1:]
        if restarts:  # thick restart
            theta, s = current["theta"], current["s"]  # Ritz vectors
            order = _wanted(theta, len(theta), which)
            keep = max(k, min(run.m - p, max_basis // 2, max_basis - 2 * p))
            sel = order[:keep]
            run.restart(theta[sel], s[:, sel])
            snapshots = []

    basis, c_mat, m, n = run.basis, run.c, run.m, run.n
    sel = state["idx"]
    s = torch.as_tensor(state["s"][:, sel], dtype=dtype, device=device)
    vectors = basis.combine(s, state["m"])
    vectors = vectors / _norms(op, vectors).clamp_min(torch.finfo(dtype).tiny)
    basis_q = image = None
    if keep_basis:  # A Q_m = Q_n C[:n, :m] (the recurrence, restarts included)
        basis_q = basis.rows(0, m)
        image = basis.combine(torch.as_tensor(c_mat[:n, :m], dtype=dtype, device=device), n)
    return EigenResult(
        values=torch.as_tensor(state["theta"][sel], dtype=torch.float64),
        vectors=vectors,
        residuals=torch.as_tensor(state["res"], dtype=torch.float64),
        error_bounds=torch.as_tensor(state["bounds"], dtype=torch.float64),
        matvecs=counter.count,
        converged=bool(state["ok"]) and len(sel) == k,
        method="lanczos",
        basis=basis_q,
        image=image,
    )


def _lanczos_top(op, k, tol, which, max_iter, generator, init, lag=None) -> EigenResult:
    """The Lanczos path of :func:`top_eigenvalues` with its defaults (block ``k``)."""
    d = op.shape[0]
    p = k
    min_dim = min(d, max(2 * k + 1, 20))
    return _block_lanczos_top(
        op, k, tol, which, max_iter, generator, init, p, min_dim,
        _default_basis(d, k, p, min_dim), lag=lag or 0,
    )


def _default_basis(d: int, k: int, p: int, min_dim: int) -> int:
    return min(d, max(3 * min_dim, k + 3 * p, min_dim + 2 * p))


class _Counter:
    """Counts the products taken through it (whatever operator it wraps)."""

    def __init__(self, op):
        self.op, self.count = op, 0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.local_dim = local_dim(op)
        self.sharding = getattr(op, "sharding", None)

    def reduce_sum(self, t: Tensor) -> Tensor:
        return reduce_sum(self.op, t)

    def local_part(self, v: Tensor) -> Tensor:
        return local_part(self.op, v)

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() == 2:
            self.count += v.shape[1]
            if isinstance(self.op, LinearOperator):
                return self.op @ v
            return torch.stack([self.op @ v[:, j] for j in range(v.shape[1])], dim=1)
        self.count += 1
        return self.op @ v


def _power_top(op, k, tol, which, max_iter, generator, init) -> EigenResult:
    starts = _initial(op, init, generator) if init is not None else None
    counter = _Counter(op)
    def reduce(t: Tensor) -> Tensor:
        return reduce_sum(op, t)

    tiny = torch.finfo(op.dtype).tiny
    found: list[tuple[float, Tensor, float, float, bool]] = []

    def start(i: int) -> Tensor:
        if starts is not None and starts.dim() == 2 and i < starts.shape[1]:
            return starts[:, i].clone()
        if starts is not None and starts.dim() == 1 and i == 0:
            return starts.clone()
        return _random(op, generator)

    def run(v: Tensor, shift: float) -> tuple[float, Tensor, float, float, bool]:
        """Power iteration on (I - QQ')(A + shift I)(I - QQ'); returns (theta, vector, true
        residual, deflated residual, converged)."""
        q = torch.stack([f[1] for f in found], dim=1) if found else None
        theta, res, true_res = 0.0, math.inf, math.inf
        for _ in range(max_iter):
            if q is not None:
                v = v - q @ reduce(q.T @ v)
            v = v / _norms(op, v).clamp_min(tiny)
            w = counter @ v
            if shift:
                w = w + shift * v
            t = reduce(torch.dot(v, w))
            r_true = _norms(op, w - t * v)
            if q is not None:
                w = w - q @ reduce(q.T @ w)
            r = _norms(op, w - t * v)
            theta, res, true_res = float(t) - shift, float(r), float(r_true)  # host sync
            if res <= tol * max(abs(theta), tiny):
                return theta, v, true_res, res, True
            v = w
        return theta, v, true_res, res, False

    shift = 0.0
    if which == "LA":
        first = run(start(0), 0.0)
        if first[0] >= 0:
            found.append(first)
            shift = first[0]  # A + shift I has its spectrum in [0, 2 shift]: order by value
        else:
            shift = -first[0]
    while len(found) < k:
        found.append(run(start(len(found)), shift))
    if which == "LA":
        found.sort(key=lambda f: -f[0])
    else:
        found.sort(key=lambda f: -abs(f[0]))
    return EigenResult(
        values=torch.tensor([f[0] for f in found], dtype=torch.float64),
        vectors=torch.stack([f[1] for f in found], dim=1),
        residuals=torch.tensor([f[2] for f in found], dtype=torch.float64),
        error_bounds=torch.tensor([f[3] for f in found], dtype=torch.float64),
        matvecs=counter.count,
        converged=all(f[4] for f in found),
        method="power",
    )


def top_eigenvalues(
    H,
    k: int = 1,
    tol: float = 1e-4,
    method: str = "lanczos",
    which: str = "LA",
    max_iter: int | None = None,
    seed: int = 0,
    init: Tensor | Sequence[Tensor] | EigenResult | None = None,
    block_size: int | None = None,
    min_dim: int | None = None,
    max_basis: int | None = None,
    keep_basis: bool = False,
) -> EigenResult:
    r"""The ``k`` largest eigenvalues of a symmetric operator and their eigenvectors.

    Lanczos (the default) is **block** Lanczos with full reorthogonalization and thick
    (Krylov-Schur) restarts. It stops when, with at least ``min_dim`` Krylov vectors explored,
    every wanted Ritz pair has

    .. math::
        r_i + \sqrt{m}\,\varepsilon\,\|T\| \le \mathrm{tol}\,|\theta_i|,
        \qquad r_i = \|A y_i - \theta_i y_i\|

    (ARPACK's residual test, plus an estimate of the rounding error of the products in the
    operator's dtype; :math:`\varepsilon` its machine epsilon, :math:`m` the basis size).

    What ``converged=True`` guarantees: each returned :math:`\theta_i` is within
    ``error_bounds[i] <= tol * |theta_i|`` of an eigenvalue of ``A`` (a residual bound, no gap
    estimate is used). That no larger eigenvalue was skipped is what a Krylov method can
    know and no more: the space explored had at least ``min_dim`` dimensions (ARPACK's
    ``max(2k + 1, 20)``) from a random start block, and the block has ``k`` columns, so an
    eigenvalue repeated up to ``k`` times is found with all its copies (single-vector Lanczos
    sees one copy per invariant subspace; block Lanczos was chosen over implicit restarts
    because it needs no luck with rounding to find the copies, at no extra cost for ``k = 1``).
    ``converged=False`` comes with a ``UserWarning``; the values are then the best Ritz values
    found, without a guarantee.

    Args:
        H: a :class:`~samkit.curvature.HessianOperator` (or any :class:`LinearOperator`, or a
            dense symmetric ``(d, d)`` tensor).
        k: how many eigenpairs (1 <= k <= d).
        tol: the relative accuracy of the eigenvalues (0 < tol < 1), see above. In float32
            the rounding term keeps ``tol`` below about ``1e-6`` from being reached
            (``converged=False``); use a float64 operator for more.
        method: ``"lanczos"`` (on the operator's device; the default) or ``"power"`` (power
            iteration with deflation, residual test, one host sync per product; for
            comparison).
        which: ``"LA"`` largest algebraic (the sharpness :math:`\lambda_{max}`) or ``"LM"``
            largest magnitude.
        max_iter: Lanczos: the most products in all (default ``300 * block_size``); power: the
            products per eigenvalue (default 1000).
        seed: seeds the random start vectors (and restarts), on the operator's device.
        init: start vector(s): the previous top eigenvector (warm start), a ``(d, j)`` matrix of
            them, a list of parameter-shaped tensors, or a previous :class:`EigenResult`.
            Lanczos puts them in its start block (filled up with random vectors to
            ``block_size`` columns; the block grows to ``j`` columns if ``j`` is larger);
            power iteration uses column ``i`` for pair ``i``.
        block_size: Lanczos' block size (default ``k``). A warm start with
            ``block_size > j`` keeps random directions in the block, so an eigenvalue that
            has overtaken the warm-started one is seen (what :class:`~samkit.train.EdgeTracker`
            does).
        min_dim: the fewest Krylov vectors before any stop (default ``max(2k + 1, 20)``,
            at most ``d``). Smaller values save products and weaken the guarantee above.
        max_basis: the most basis vectors kept (memory ``max_basis * d``; default
            ``max(3 * min_dim, k + 3 * block_size)``, at most ``d``); when full, the best
            Ritz vectors are kept and the run goes on (thick restart).
        keep_basis: Lanczos: also return the final Krylov basis :math:`Q` and :math:`AQ`
            (``result.basis``, ``result.image``; memory ``2 m d``), e.g. to project an
            operator built from ``A`` on the same space without new products.

    Returns:
        An :class:`EigenResult`: ``values`` (largest first), ``vectors``, ``residuals``,
        ``error_bounds``, ``matvecs``, ``converged``.

    Raises:
        ValueError: bad arguments, or a product that returns non-finite values.

    References:
        G. H. Golub, R. Underwood. The block Lanczos method for computing eigenvalues. 1977.
        K. Wu, H. Simon. Thick-restart Lanczos method for large symmetric eigenvalue
        problems. SIAM J. Matrix Anal. Appl. 22(2), 2000. R. B. Lehoucq, D. C. Sorensen,
        C. Yang. ARPACK Users' Guide. SIAM 1998.
    """
    op = as_operator(H)
    d = op.shape[0]
    k = check_int("k", k, 1, d)
    tol = _check_tol(tol)
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (allowed: {', '.join(METHODS)})")
    if which not in WHICH:
        raise ValueError(f"Invalid which: {which!r} (allowed: {', '.join(WHICH)})")
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter, k if method == "lanczos" else 1)
    p = k if block_size is None else check_int("block_size", block_size, 1, d)
    dims = min(d, max(2 * k + 1, 20)) if min_dim is None else check_int("min_dim", min_dim, 1)
    dims = min(dims, d)
    if max_basis is None:
        basis = _default_basis(d, k, p, dims)
    else:
        basis = min(d, check_int("max_basis", max_basis, k + 2 * p))
    generator = torch.Generator(device=op.device).manual_seed(int(seed))
    if method == "lanczos":
        products = 300 * p if max_iter is None else max_iter
        result = _block_lanczos_top(op, k, tol, which, products, generator, init, p, dims, basis,
                                    keep_basis=keep_basis)
    else:
        result = _power_top(
            op, k, tol, which, 1000 if max_iter is None else max_iter, generator, init
        )
    if not result.converged:
        warnings.warn(
            f"top_eigenvalues did not converge: {result.matvecs} products, error bounds "
            f"{result.error_bounds.tolist()} against tol * |theta| = "
            f"{(tol * result.values.abs()).tolist()} (raise max_iter, or loosen tol)",
            UserWarning,
            stacklevel=2,
        )
    return result
