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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samkit.curvature.operator import LinearOperator, as_operator

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
        method: ``"lanczos"`` or ``"power"``.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    matvecs: int
    converged: bool
    method: str


# -- argument checks ------------------------------------------------------------------------------


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok:
        ok = value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")
    return int(value)


def _check_tol(tol) -> float:
    try:
        ok = math.isfinite(float(tol)) and 0.0 < float(tol) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid tol: {tol!r} (allowed: a number > 0 and < 1)")
    return float(tol)


def _initial(op: LinearOperator, init, generator: torch.Generator) -> Tensor:
    """The start vector(s), ``(d,)`` or ``(d, j)``, on the operator's device and dtype."""
    d = op.shape[0]
    if init is None:
        return torch.randn(d, generator=generator, device=op.device, dtype=op.dtype)
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
    norms = torch.linalg.vector_norm(init, dim=0)
    if not bool(torch.all(torch.isfinite(norms)) and torch.all(norms > 0)):
        raise ValueError("Invalid init: a zero or non-finite start vector")
    return init / norms


# -- the Krylov basis ---------------------------------------------------------------------------


class _Basis:
    """Orthonormal rows kept in blocks, so memory grows with the iterations actually used."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = 32):
        self.dim, self.dtype, self.device, self.block = dim, dtype, device, block
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
        """Remove from ``w`` its components on the basis: classical Gram-Schmidt, twice ("twice
        is enough", Giraud et al. 2005). Returns the ``(size,)`` coefficients removed."""
        views = self.views()
        total = torch.zeros(self.size, dtype=w.dtype, device=w.device)
        for _ in range(2):
            coeffs = [b @ w for b in views]
            for b, h in zip(views, coeffs, strict=True):
                w.addmv_(b.T, h, alpha=-1)
            total += torch.cat(coeffs)
        return total

    def combine(self, s: Tensor) -> Tensor:
        """:math:`Q^\\top S` for ``S`` of shape ``(size, k)``: ``(d, k)``."""
        out = torch.zeros(self.dim, s.shape[1], dtype=self.dtype, device=self.device)
        start = 0
        for b in self.views():
            out.addmm_(b.T, s[start : start + b.shape[0]])
            start += b.shape[0]
        return out


class _HostMirror:
    """Copies of the Lanczos coefficients on the host.

    On CUDA each coefficient goes to pinned memory with a non-blocking copy and an event, and
    the host reads them one iteration late: the check waits only for the previous product while
    the current one is already queued, so the device never idles for a round trip.
    """

    def __init__(self, alpha: Tensor, beta: Tensor):
        self.alpha, self.beta = alpha, beta
        self.asynchronous = alpha.device.type == "cuda"
        self.lag = 1 if self.asynchronous else 0
        if self.asynchronous:
            n = alpha.shape[0]
            self.host = torch.empty(2, n, dtype=alpha.dtype, pin_memory=True)
            self.events: list = [None] * n

    def push(self, j: int) -> None:
        if self.asynchronous:
            self.host[0, j : j + 1].copy_(self.alpha[j : j + 1], non_blocking=True)
            self.host[1, j : j + 1].copy_(self.beta[j : j + 1], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.events[j] = event

    def read(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        if self.asynchronous:
            self.events[c - 1].synchronize()
            a, b = self.host[0, :c], self.host[1, :c]
        else:
            a, b = self.alpha[:c], self.beta[:c]
        return a.double().cpu().numpy().copy(), b.double().cpu().numpy().copy()

    def set_beta(self, j: int, value: float) -> None:
        self.beta[j] = value
        if self.asynchronous:
            self.host[1, j] = value


def _tridiagonal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c = len(a)
    t = np.diag(a)
    if c > 1:
        t += np.diag(b[: c - 1], 1) + np.diag(b[: c - 1], -1)
    return t


Check = Callable[[int, np.ndarray, np.ndarray], bool]


def lanczos(
    op: LinearOperator,
    v0: Tensor,
    max_steps: int,
    check: Check | None = None,
    generator: torch.Generator | None = None,
    restart: bool = True,
    lag: int | None = None,
) -> tuple[_Basis, np.ndarray, np.ndarray, int]:
    r"""Run up to ``max_steps`` Lanczos steps from ``v0`` with full reorthogonalization.

    ``check(c, alpha, beta)`` is called with the host copies of the first ``c`` coefficients
    (``beta[c-1]`` is :math:`\beta_c`, zero at a breakdown) and stops the run when it returns
    ``True``. At a breakdown (an invariant subspace, :math:`\beta \approx 0`) the run restarts
    from a random vector orthogonal to the basis (``restart=True``, needed for repeated
    eigenvalues) or stops (``restart=False``, as stochastic Lanczos quadrature wants).

    Returns the basis, the diagonal ``alpha`` and the off-diagonal ``beta`` (numpy, float64) and
    the number ``c`` of Lanczos vectors that ``T`` covers.
    """
    d = op.shape[0]
    max_steps = min(max_steps, d)
    dtype, device = op.dtype, op.device
    basis = _Basis(d, dtype, device)
    alpha = torch.zeros(max_steps, dtype=dtype, device=device)
    beta = torch.zeros(max_steps, dtype=dtype, device=device)
    mirror = _HostMirror(alpha, beta)
    lag = mirror.lag if lag is None else lag
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny

    q = v0 / torch.linalg.vector_norm(v0)
    basis.append(q)
    j = 0  # Lanczos steps done: alpha[:j], beta[:j] are set, the basis holds j (+1) vectors
    checked = 0
    while True:
        if j < max_steps:
            w = op @ q
            coeffs = basis.orthogonalize_(w)
            alpha[j] = coeffs[j]
            b = torch.linalg.vector_norm(w)
            beta[j] = b
            mirror.push(j)
            j += 1
            if j < max_steps:
                q = w / b.clamp_min(tiny)
                basis.append(q)
            c = j - lag
        else:
            c = j  # the end: wait for the last coefficients
        if c > checked:
            checked = c
            a_h, b_h = mirror.read(c)
            norm_t = max(np.abs(a_h).max(), np.abs(b_h).max(), tiny)
            broken = b_h[c - 1] <= 100 * eps * norm_t
            if broken:
                b_h[c - 1] = 0.0
            if check is not None and check(c, a_h, b_h):
                return basis, a_h, b_h, c
            if broken and c < max_steps:
                if not restart:
                    return basis, a_h, b_h, c
                # Restart in the orthogonal complement; T becomes block diagonal.
                basis.truncate(c)
                mirror.set_beta(c - 1, 0.0)
                r = torch.randn(d, generator=generator, device=device, dtype=dtype)
                basis.orthogonalize_(r)
                q = r / torch.linalg.vector_norm(r).clamp_min(tiny)
                basis.append(q)
                j = checked = c
                continue
        if j >= max_steps and c == j:
            return basis, a_h, b_h, c


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    key = -theta if which == "LA" else -np.abs(theta)
    return np.argsort(key, kind="stable")[:k]


def _lanczos_top(op, k, tol, which, max_iter, generator, init, lag=None) -> EigenResult:
    v0 = _initial(op, init, generator)
    if v0.dim() == 2:
        v0 = v0.sum(dim=1)
        if not bool(torch.linalg.vector_norm(v0) > 0):
            v0 = _initial(op, None, generator)
    state: dict = {}

    def check(c: int, a: np.ndarray, b: np.ndarray) -> bool:
        if c < k:
            return False
        theta, s = np.linalg.eigh(_tridiagonal(a, b))
        idx = _wanted(theta, k, which)
        res_all = np.abs(b[c - 1] * s[c - 1, :])
        res = res_all[idx]
        bounds = res.copy()
        for n, i in enumerate(idx):
            others = np.delete(np.arange(c), i)
            if len(others):
                gap = np.min(np.abs(theta[i] - theta[others]) - res_all[others])
                if gap > 0:
                    bounds[n] = min(res[n], res[n] ** 2 / gap)
        norm_t = max(np.abs(theta).max(), np.finfo(np.float64).tiny)
        scale = np.maximum(np.abs(theta[idx]), torch.finfo(op.dtype).eps * norm_t)
        state.update(theta=theta[idx], s=s[:, idx], res=res, bounds=bounds, c=c)
        state["converged"] = bool(np.all(bounds <= tol * scale))
        return state["converged"]

    counter = _Counter(op)
    basis, a, b, c = lanczos(counter, v0, max_iter, check, generator, restart=True, lag=lag)
    if state.get("c") != c:  # the run ended before k Ritz values existed
        check(c, a, b)
    s = torch.as_tensor(state["s"], dtype=op.dtype, device=op.device)
    basis.truncate(state["c"])
    vectors = basis.combine(s)
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=0).clamp_min(
        torch.finfo(op.dtype).tiny
    )
    return EigenResult(
        values=torch.as_tensor(state["theta"], dtype=torch.float64),
        vectors=vectors,
        residuals=torch.as_tensor(state["res"], dtype=torch.float64),
        error_bounds=torch.as_tensor(state["bounds"], dtype=torch.float64),
        matvecs=counter.count,
        converged=state["converged"] and len(state["theta"]) == k,
        method="lanczos",
    )


class _Counter:
    """Counts the products taken through it (whatever operator it wraps)."""

    def __init__(self, op):
        self.op, self.count = op, 0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def __matmul__(self, v: Tensor) -> Tensor:
        self.count += 1
        return self.op @ v


def _power_top(op, k, tol, which, max_iter, generator, init) -> EigenResult:
    d = op.shape[0]
    starts = _initial(op, init, generator) if init is not None else None
    counter = _Counter(op)
    tiny = torch.finfo(op.dtype).tiny
    found: list[tuple[float, Tensor, float, float, bool]] = []

    def start(i: int) -> Tensor:
        if starts is not None and starts.dim() == 2 and i < starts.shape[1]:
            return starts[:, i].clone()
        if starts is not None and starts.dim() == 1 and i == 0:
            return starts.clone()
        return torch.randn(d, generator=generator, device=op.device, dtype=op.dtype)

    def run(v: Tensor, shift: float) -> tuple[float, Tensor, float, float, bool]:
        """Power iteration on (I - QQ')(A + shift I)(I - QQ'); returns (theta, vector, true
        residual, deflated residual, converged)."""
        q = torch.stack([f[1] for f in found], dim=1) if found else None
        theta, res, true_res = 0.0, math.inf, math.inf
        for _ in range(max_iter):
            if q is not None:
                v = v - q @ (q.T @ v)
            v = v / torch.linalg.vector_norm(v).clamp_min(tiny)
            w = counter @ v
            if shift:
                w = w + shift * v
            t = torch.dot(v, w)
            r_true = torch.linalg.vector_norm(w - t * v)
            if q is not None:
                w = w - q @ (q.T @ w)
            r = torch.linalg.vector_norm(w - t * v)
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
) -> EigenResult:
    r"""The ``k`` largest eigenvalues of a symmetric operator and their eigenvectors.

    Args:
        H: a :class:`~samkit.curvature.HessianOperator` (or any :class:`LinearOperator`, or a
            dense symmetric ``(d, d)`` tensor).
        k: how many eigenpairs (1 <= k <= d).
        tol: the relative accuracy of the eigenvalues (0 < tol < 1): every pair stops with an
            error bound ``<= tol * |theta|`` (see the module docstring; Lanczos uses the gap to
            the other Ritz values, power iteration the residual alone).
        method: ``"lanczos"`` (full reorthogonalization, on the operator's device; the
            default) or ``"power"`` (power iteration with deflation, one host sync per
            product; for comparison).
        which: ``"LA"`` largest algebraic (the sharpness :math:`\lambda_{max}`) or ``"LM"``
            largest magnitude.
        max_iter: Lanczos: the largest Krylov dimension (default ``min(d, 300)``; memory
            ``max_iter`` vectors at most); power: the products per eigenvalue (default 1000).
        seed: seeds the random start vector (and restarts), on the operator's device.
        init: a start vector: the previous top eigenvector (warm start), a ``(d, j)`` matrix
            of them (Lanczos starts from their sum; power uses column ``i`` for pair ``i``), a
            list of parameter-shaped tensors, or a previous :class:`EigenResult`. Lanczos
            explores the Krylov space of ``init``, so an exact eigenvector gives that pair.

    Returns:
        An :class:`EigenResult`: ``values`` (largest first), ``vectors``, ``residuals``,
        ``error_bounds``, ``matvecs``, ``converged``.

    Single-vector Lanczos finds one copy of a repeated eigenvalue per invariant subspace it
    meets; it restarts after a breakdown, which recovers multiplicities in most cases.
    """
    op = as_operator(H)
    d = op.shape[0]
    k = _check_int("k", k, 1, d)
    tol = _check_tol(tol)
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (allowed: {', '.join(METHODS)})")
    if which not in WHICH:
        raise ValueError(f"Invalid which: {which!r} (allowed: {', '.join(WHICH)})")
    if max_iter is not None:
        max_iter = _check_int("max_iter", max_iter, k if method == "lanczos" else 1)
    generator = torch.Generator(device=op.device).manual_seed(int(seed))
    if method == "lanczos":
        steps = min(d, 300) if max_iter is None else min(max_iter, d)
        return _lanczos_top(op, k, tol, which, max(steps, k), generator, init)
    return _power_top(op, k, tol, which, 1000 if max_iter is None else max_iter, generator, init)
