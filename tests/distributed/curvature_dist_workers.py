"""Curvature measurements in 2 or 3 gloo processes on CPU (spawned by test_curvature_dist.py).

Imported by name (its folder is on sys.path) so that spawned children can unpickle the worker.
:func:`measure` runs every measurement of the issue (λ1..λ3, trace, density moments, GGN,
the empirical and Monte-Carlo Fisher, Hutch++, per-module spectra, effective Hessian of SAM
and ASAM, the Adam-preconditioned Hessian, sharpness plain / adaptive
with p = 2 and ∞, the loss and gradient); the workers run it on a DDP-wrapped and an FSDP2
model with uneven shards, the test process on one process over the union of the shards.
"""

from __future__ import annotations

import math
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

N = 23  # examples in all
SHARDS = {2: [14, 9], 3: [9, 8, 6]}  # uneven shards per world size


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def shard(rank: int, world: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s examples as two batches of different sizes."""
    x, y = data(dtype)
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    xs, ys = x[start : start + sizes[rank]], y[start : start + sizes[rank]]
    cut = (len(ys) + 1) // 3
    return [(xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])]


def union(world: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's batches, in rank order: what one process over all the data sees."""
    return [b for r in range(world) for b in shard(r, world, dtype)]


def make_mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


def measure(model: nn.Module, batches, params=None, **group) -> dict:
    """Every measurement of the issue on ``model`` over ``batches`` (the default process group
    unless ``group`` says otherwise). ``params``: the parameters the optimizers hold (default:
    ``model.parameters()``)."""
    import samkit
    from samkit.curvature import (
        EmpiricalFisherOperator,
        GGNOperator,
        HessianOperator,
        MCFisherOperator,
        adam_preconditioned,
        block_spectra,
        effective_hessian,
        hessian_trace,
        hutchpp_trace,
        spectral_density,
        top_eigenvalues,
    )
    from samkit.curvature.operator import local_part, reduce_sum

    params = list(model.parameters()) if params is None else params
    dtype = params[0].dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    out: dict = {}
    H = HessianOperator(model, loss_fn, batches, **group)
    top = top_eigenvalues(H, k=3, tol=tol)
    out["top"] = (top.values, top.converged, top.matvecs)
    out["trace"] = hessian_trace(H, samples=5, seed=2).samples
    sd = spectral_density(H, num_probes=2, num_steps=8, seed=1)
    out["density"] = torch.tensor([sd.moment(p) for p in range(1, 5)], dtype=torch.float64)
    out["ggn"] = top_eigenvalues(GGNOperator(model, loss_fn, batches, **group), k=2,
                                 tol=tol).values
    # the Fisher operators (the Monte-Carlo one's labels drawn per example of the union),
    # Hutch++ and the per-module spectra
    v = torch.randn(H.dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    v = local_part(H, v.to(dtype))
    for name, F in (("efisher", EmpiricalFisherOperator(model, loss_fn, batches, **group)),
                    ("mcfisher", MCFisherOperator(model, loss_fn, batches, samples=3, seed=7,
                                                  likelihood="categorical",
                                                  **group))):
        fv = F @ v
        product = reduce_sum(F, torch.stack([torch.dot(v, fv), fv.pow(2).sum()]))
        out[name] = (top_eigenvalues(F, k=1, tol=tol).values, product)
    out["hutchpp"] = hutchpp_trace(H, matvecs=12, seed=3).samples
    out["blocks"] = torch.cat([b.values for b in block_spectra(H, k=2, tol=tol)])
    loss, grads = H.loss_and_gradient()
    out["loss"] = loss
    out["grad_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    base = torch.optim.SGD(params, lr=0.1)
    for name, opt in (("sam", samkit.SAM(base, rho=0.05)),
                      ("asam", samkit.ASAM(base, rho=0.5, eta=0.01))):
        out["eff_" + name] = top_eigenvalues(effective_hessian(H, opt), k=1, tol=tol).values
    adam = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        adam.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                         "exp_avg_sq": p.detach() ** 2 + 0.01}
    out["adam"] = top_eigenvalues(adam_preconditioned(H, adam), k=1, tol=tol).values
    for adaptive in (False, True):
        for p in (2, math.inf):
            res = samkit.sharpness(model, loss_fn, batches, rho=0.1, p=p, adaptive=adaptive,
                                   steps=2, starts=2, seed=4, **group)
            out[("sharpness", adaptive, p)] = (res.value, res.base_loss, res.start_values)
    # m-sharpness: each rank maximizes over its micro-batches, the means are all-reduced (one
    # start: the SAM start, which draws nothing at random)
    res = samkit.sharpness(model, loss_fn, batches, rho=0.1, m=4, steps=2, starts=1, **group)
    out["m_sharpness"] = (res.value, res.base_loss, res.perturbed_loss, res.evaluations)
    from samkit.curvature._dist import has_dtensors
    from samkit.measures import average_sharpness, m_sharpness

    if not has_dtensors(list(model.parameters())):  # FSDP2: refused (a fast test)
        res = m_sharpness(model, loss_fn, batches, rho=0.1, m=4, steps=2, starts=1, error=True,
                          **group)
        out["m_sharpness_error"] = (res.value, res.error_increase, res.base_error, res.batches,
                                    res.evaluations)
        res = average_sharpness(model, loss_fn, batches, sigma=0.05, samples=3, adaptive=True,
                                error=True, seed=2, **group)
        out["average"] = (res.value, res.stderr, res.base_loss, res.error_increase)
    return out


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    try:
        results = _body(rank, world)
    except BaseException:
        results = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _count_allreduces(fn, collective: str = "all_reduce") -> int:
    """How many times ``fn()`` calls ``torch.distributed.<collective>``."""
    calls = []
    original = getattr(dist, collective)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(dist, collective, counting)
    try:
        fn()
    finally:
        setattr(dist, collective, original)
    return len(calls)


def _section(results: dict, name: str, fn) -> None:
    """``results[name] = fn()``, or the traceback (so that one failing part names itself and
    the others still run)."""
    try:
        results[name] = fn()
    except Exception:
        results[name] = {"error": traceback.format_exc()}


def _body(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from samkit.curvature import HessianOperator, top_eigenvalues

    results: dict = {}
    # DDP, float64: the default process group (what a torchrun script gets without a word)
    ddp = DDP(make_mlp())
    batches = shard(rank, world)
    _section(results, "ddp", lambda: measure(ddp, batches))

    def reduces() -> dict:
        H = HessianOperator(ddp, loss_fn, batches)
        v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        local = HessianOperator(ddp, loss_fn, batches, process_group="local")
        return {
            "products": _count_allreduces(lambda: [H @ v for _ in range(4)]),
            "block": _count_allreduces(lambda: H @ torch.stack([v, v], 1)),
            "loss_grad": _count_allreduces(H.loss_and_gradient),
            "local": _count_allreduces(lambda: local @ v),
        }

    _section(results, "reduces", reduces)
    # "local": this rank's data only (samkit before process groups)
    _section(results, "local_top", lambda: top_eigenvalues(
        HessianOperator(ddp, loss_fn, batches, process_group="local"), k=1, tol=1e-10).values)
    # an explicit group: a new group over all ranks
    group = dist.new_group(list(range(world)))
    _section(results, "group_top", lambda: top_eigenvalues(
        HessianOperator(ddp, loss_fn, batches, process_group=group), k=1, tol=1e-10).values)
    # DDP, float32
    _section(results, "ddp32", lambda: measure(DDP(make_mlp(torch.float32)),
                                               shard(rank, world, torch.float32)))
    # FSDP2 (fully_shard per layer and at the root), float64
    fsdp = make_fsdp(world)
    _section(results, "fsdp", lambda: measure(fsdp, batches))

    def fsdp_layout() -> dict:
        import samkit
        from samkit.curvature import block_spectra, effective_hessian

        H = HessianOperator(fsdp, loss_fn, batches)
        top = top_eigenvalues(H, k=2, tol=1e-10)
        heff = effective_hessian(H, samkit.SAM(torch.optim.SGD(fsdp.parameters(), lr=0.1),
                                               rho=0.05))
        try:  # the blocks of an operator built on an FSDP2 one: refused
            block_spectra(heff, k=1)
            refused = ""
        except ValueError as err:
            refused = str(err)
        v = torch.randn(H.local_dim, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        return {"dim": H.dim, "local_dim": H.local_dim, "vectors": tuple(top.vectors.shape),
                "reduces": _count_allreduces(lambda: H @ v),
                "gathers": _count_allreduces(lambda: H @ v, "all_gather"),
                "shards": [tuple(p.to_local().shape) for p in fsdp.parameters()],
                "blocks_refused": refused}

    _section(results, "fsdp_layout", fsdp_layout)
    _section(results, "fsdp_extra", lambda: extra(fsdp, batches))
    # FSDP2, float32
    _section(results, "fsdp32", lambda: measure(make_fsdp(world, torch.float32),
                                                shard(rank, world, torch.float32)))

    def autograd_through_fsdp() -> list:
        """What ``torch.autograd.grad`` gives for FSDP2's sharded parameters (last: FSDP's
        own forward leaves its backward state pending on this fresh model)."""
        model = make_fsdp(world)
        x, y = batches[0]
        grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()),
                                    allow_unused=True)
        return [g is None for g in grads]

    _section(results, "autograd_through_fsdp", autograd_through_fsdp)
    return results


def extra(model: nn.Module, batches, params=None) -> dict:
    """Power iteration, the effective Hessian's Rayleigh-Ritz on a Lanczos basis (what the
    edge tracker uses) and Lanczos with thick restarts (a basis of 10 vectors)."""
    import samkit
    from samkit.curvature import HessianOperator, effective_hessian, top_eigenvalues
    from samkit.curvature.effective import effective_top_on_krylov

    params = list(model.parameters()) if params is None else params
    H = HessianOperator(model, loss_fn, batches)
    power = top_eigenvalues(H, k=2, method="power", tol=1e-6, seed=5)
    krylov = top_eigenvalues(H, k=1, tol=1e-10, keep_basis=True)
    heff = effective_hessian(H, samkit.SAM(torch.optim.SGD(params, lr=0.1), rho=0.05))
    rr = effective_top_on_krylov(heff, krylov, tol=1e-8)
    restarted = top_eigenvalues(H, k=2, tol=1e-9, min_dim=6, max_basis=10, seed=6)
    return {"power": (power.values, power.matvecs), "rayleigh_ritz": rr.values,
            "rr_residual": rr.residuals, "restarted": (restarted.values, restarted.matvecs)}


def make_fsdp(world: int, dtype=torch.float64) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_mlp(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)
