"""Worker functions run in 2 gloo processes by torch.multiprocessing.spawn (CPU, float64).

Imported by name (its folder is put on sys.path) so spawned children can unpickle them. Each
worker runs every scenario of its kind and writes its results with torch.save for the test
process, which compares them with single-process references.
"""

from __future__ import annotations

import math
import os
import socket
import traceback

import torch
import torch.distributed as dist
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, out_dir, world: int = 2, *args) -> list[dict]:
    """Run ``worker(rank, world, port, out_dir, *args)`` on ``world`` gloo processes; their
    results, one dict per rank.

    A launch that dies without a Python error (a port taken between choosing and binding it, a
    gloo abort on an overloaded machine) is retried once, on a new port.
    """
    import torch.multiprocessing as mp

    first = None
    for _ in range(2):
        try:
            mp.spawn(worker, args=(world, free_port(), str(out_dir), *args), nprocs=world,
                     join=True)
            break
        except mp.ProcessExitedException as err:
            if first is not None:
                raise RuntimeError(f"2 launches failed; the first: {first}") from err
            first = err
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


def data(n: int = 8, d: int = 5, k: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def make_mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)]
    if bn:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


def make_optimizer(kind: str, params, lr: float = 0.1):
    import samkit

    base = torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "sam":
        return samkit.SAM(base, rho=0.2)
    if kind == "asam":
        return samkit.ASAM(base, rho=1.0, eta=0.01)
    if kind == "asam-filterwise":
        return samkit.ASAM(base, rho=1.0, eta=0.01, normalization="filterwise")
    if kind == "asam-inf":
        return samkit.ASAM(base, rho=0.05, eta=0.01, p=math.inf)
    raise ValueError(kind)


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _run(rank, world, port, out_dir, body):
    _init(rank, world, port)
    try:
        results = body(rank, world)
    except BaseException:
        results = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------------- DDP


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _run(rank, world, port, out_dir, _ddp_body)


def _ddp_body(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import samkit
    from samkit.distributed import ddp_accumulation_closure, ddp_closure, shard_batch

    x, y = data()
    xs, ys = shard_batch(x, y, rank, world)
    results = {}
    for kind in ("sam", "asam"):
        for mode in ("synced", "local"):
            for accum in (1, 2):
                model = DDP(make_mlp())
                opt = make_optimizer(kind, model.parameters())
                calls = []

                def hook(state, bucket, calls=calls):
                    calls.append(1)
                    buf = bucket.buffer().div_(dist.get_world_size())
                    fut = dist.all_reduce(buf, async_op=True).get_future()
                    return fut.then(lambda f: f.value()[0])

                model.register_comm_hook(None, hook)
                losses = []
                for _ in range(2):
                    if accum == 1:

                        def closure(model=model, opt=opt):
                            opt.zero_grad()
                            loss = loss_fn(model(xs), ys)
                            loss.backward()
                            return loss

                        step = ddp_closure(closure, model, opt, mode)
                    else:
                        micro = list(zip(xs.tensor_split(2), ys.tensor_split(2), strict=True))
                        step = ddp_accumulation_closure(opt, model, loss_fn, micro, mode)
                    losses.append(float(opt.step(step)))
                results[(kind, mode, accum)] = {
                    "params": [p.detach().clone() for p in model.module.parameters()],
                    "allreduce_calls": len(calls),
                    "loss": losses,
                }

    # BatchNorm: the perturbed pass under disable_running_stats, no find_unused_parameters
    for mode in ("synced", "local"):
        model = DDP(make_mlp(bn=True))
        opt = make_optimizer("sam", model.parameters())
        for _ in range(3):

            def closure(model=model, opt=opt):
                opt.zero_grad()
                ctx = samkit.disable_running_stats(model) if opt.is_perturbed else _null()
                with ctx:
                    loss = loss_fn(model(xs), ys)
                loss.backward()
                return loss

            opt.step(ddp_closure(closure, model, opt, mode))
        bn = model.module[1]
        results[("bn", mode)] = {
            "params": [p.detach().clone() for p in model.module.parameters()],
            "num_batches_tracked": int(bn.num_batches_tracked),
            "running_mean": bn.running_mean.clone(),
        }
    # local mode refuses an optimizer that descends with the unsynced first-pass gradient
    try:
        model = DDP(make_mlp())
        looksam = samkit.create_optimizer("looksam", model.parameters(), lr=0.1)
        ddp_closure(lambda: None, model, looksam, "local")
        results["looksam_local"] = "accepted"
    except ValueError as err:
        results["looksam_local"] = str(err)
    return results


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------- FSDP2


def fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _run(rank, world, port, out_dir, _fsdp_body)


def _fsdp_body(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from samkit.distributed import shard_batch
    from samkit.optim import kernels

    mesh = init_device_mesh("cpu", (world,))
    x, y = data()
    xs, ys = shard_batch(x, y, rank, world)
    results = {}
    for kind in ("sam", "asam", "asam-filterwise", "asam-inf"):
        model = make_mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = make_optimizer(kind, model.parameters())
        reduces = []
        original = dist.all_reduce

        def counting(*args, reduces=reduces, original=original, **kwargs):
            reduces.append(1)
            return original(*args, **kwargs)

        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(xs), ys).backward()
            dist.all_reduce = counting
            try:
                opt.first_step()
            finally:
                dist.all_reduce = original
            loss_fn(model(xs), ys).backward()
            opt.second_step()
        # the exact global norm over the shards, for a check against the full gradient
        opt.zero_grad()
        loss_fn(model(xs), ys).backward()
        buckets = opt._buckets()
        norm = kernels.global_sq_norm(b.grads for b in buckets).sqrt()
        results[kind] = {
            "params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "allreduces_per_first_step": len(reduces) / 2,
            "grad_norm": float(norm),
            "sharded": all(isinstance(b.grads, kernels.ShardedTensors) for b in buckets),
        }
    return results


# ---------------------------------------------------------------------- the Trainer under DDP


def trainer_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _run(rank, world, port, out_dir, lambda r, w: _trainer_body(r, w, out_dir))


def trainer_config(out_dir: str, **changes):
    from samkit.train import TrainConfig

    base = dict(
        dataset="digits", model="mlp", optimizer="sam", subset=400, batch_size=50,
        schedule="constant", epochs=2, threads=1, out_dir=out_dir, log_every=4,
        model_kwargs={"width": 32},
    )
    return TrainConfig(**{**base, **changes})


def _trainer_body(rank: int, world: int, out_dir: str) -> dict:
    from samkit.train import Trainer

    results = {}
    for mode in ("local", "synced"):
        cfg = trainer_config(out_dir, perturbation=mode, grad_accum=2, name=f"{mode}-full")
        results[mode] = Trainer(cfg, verbose=0).fit()
        results[mode + "-params"] = _params(cfg)
    # resume at the same world size: one epoch, then on to two
    cfg = trainer_config(out_dir, perturbation="local", grad_accum=2, name="local-resumed")
    Trainer(cfg.replace(epochs=1), verbose=0).fit()
    dist.barrier()  # rank 0 has written the checkpoint
    results["resumed"] = Trainer(cfg, resume=True, verbose=0).fit()
    results["resumed-params"] = _params(cfg)
    results["files"] = sorted(os.listdir(os.path.join(out_dir, "local-full")))
    return results


def _params(cfg):
    path = os.path.join(cfg.out_dir, cfg.run_name, "checkpoint.pt")
    dist.barrier()
    return torch.load(path, weights_only=False)["model"]
