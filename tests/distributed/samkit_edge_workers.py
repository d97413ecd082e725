"""Edge tracker workers run in 2 gloo processes by torch.multiprocessing.spawn (CPU, float64).

Imported by name (its folder is put on sys.path) so spawned children can unpickle them. Each
worker trains with an :class:`~samkit.train.edge.EdgeTracker` whose probe set is sharded over
the ranks, and saves, per rank, the tracker's rows, the rows it wrote (rank 0's file) and the
weights and global batch of every measured step, for the test process to measure the same
weights in one process over the union of the shards.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
from samkit_dist_workers import free_port, spawn  # noqa: F401 (the tests call W.spawn, W.free_port)
from torch import nn


def data(n: int = 41, d: int = 5, k: int = 3, seed: int = 1):
    """``n`` examples (41: uneven shards over 2 ranks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


def make_sam(params):
    import samkit

    return samkit.SAM(torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.05)


def _run(rank: int, world: int, port: int, out_dir: str, body) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a rank that waits for a collective the others never call fails instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = body(rank, world, out_dir)
    except BaseException:
        results = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _read(path: str) -> list[dict]:
    import json

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------- a plain DDP loop


def loop_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _run(rank, world, port, out_dir, _loop_body)


def _loop_body(rank: int, world: int, out_dir: str) -> dict:
    """A DDP loop (synced SAM, 4 steps) with the tracker on this rank's shard of the probe set
    and of every batch; the step's batch gives the SAM-edge's ‖g‖."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from samkit.distributed import ddp_closure, shard_batch
    from samkit.train.edge import EdgeTracker

    x, y = data()
    xs, ys = shard_batch(x, y, rank, world)  # the probe set: 21 + 20 examples
    model = DDP(make_mlp())
    opt = make_sam(model.parameters())
    path = os.path.join(out_dir, "loop.jsonl")
    tracker = EdgeTracker((xs, ys), loss_fn, every=2, path=path, tol=1e-6, k=2)
    snapshots = {}
    for t in range(5):
        gx, gy = x[8 * t: 8 * t + 9], y[8 * t: 8 * t + 9]  # the global batch (9: uneven)
        bx, by = shard_batch(gx, gy, rank, world)
        if tracker.should_measure(t):
            snapshots[t] = {"weights": _weights(model.module), "batch": (gx, gy)}
            tracker.record(t, model.module, opt, batch=(bx, by))

        def closure(bx=bx, by=by):
            opt.zero_grad()
            loss = loss_fn(model(bx), by)
            loss.backward()
            return loss

        opt.step(ddp_closure(closure, model, opt, "synced"))
    dist.barrier()
    return {"rows": tracker.rows, "file": _read(path), "snapshots": snapshots}


# ---------------------------------------------------------------------- the Trainer


def trainer_worker(rank: int, world: int, port: int, out_dir: str, budget) -> None:
    _run(rank, world, port, out_dir, lambda r, w, o: _trainer_body(r, w, o, budget))


def _snapshots():
    from samkit.train.callbacks import Callback

    class Snapshots(Callback):
        """Keeps the weights and the global batch at every step (put it before the tracker:
        it sees the weights the tracker measures); rank 1 is made late at due steps."""

        def __init__(self) -> None:
            self.seen: dict = {}

        def on_step_start(self, state, step):
            if step in (3, 6) and dist.get_rank() == 1:
                # rank 1 comes late to the tracker: its clock says that more time has passed
                # since the last measurement than rank 0's (which waits for it later)
                time.sleep(0.5)
            x, y = state.batch
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (x, y))  # the global batch: the slices in order
            self.seen[step] = {"weights": _weights(state.model),
                               "batch": (torch.cat([p[0] for p in parts]),
                                         torch.cat([p[1] for p in parts]))}

        def on_train_end(self, state, metrics):
            self.seen["final"] = {"weights": _weights(state.model), "batch": None}

    return Snapshots()


def trainer_data(n: int = 63):
    """Train and test splits in float64 (63 training examples: uneven shards, a last batch of 3)."""
    from samkit.data import DataSplit

    x, y = data(n=n + 20, seed=3)
    train = DataSplit(x[:n], y[:n], 3, (5,), "synthetic")
    test = DataSplit(x[n:], y[n:], 3, (5,), "synthetic")
    return train, test


def trainer_config(out_dir: str, **changes):
    from samkit.train import TrainConfig

    base = dict(dataset="synthetic", model="mlp", optimizer="sam", rho=0.05, lr=0.1,
                batch_size=20, lr_schedule="constant", epochs=2, threads=1, out_dir=out_dir,
                log_every=1, name="edge")
    return TrainConfig(**{**base, **changes})


def _trainer_body(rank: int, world: int, out_dir: str, budget) -> dict:
    from samkit.train import Trainer, read_metrics
    from samkit.train.edge import EdgeTracker

    snapshots = _snapshots()
    kwargs = {"every": 2, "tol": 1e-6}
    if budget is not None:  # a due step at every step, with a budget
        kwargs.update(every=1, budget=budget)
    tracker = EdgeTracker(**kwargs)
    cfg = trainer_config(out_dir)
    Trainer(cfg, callbacks=[snapshots, tracker], model=make_mlp(), data=trainer_data(),
            verbose=0).fit()
    dist.barrier()
    run = os.path.join(out_dir, cfg.run_name)
    return {
        "rows": tracker.rows,
        "skipped": tracker.skipped,
        "file": _read(os.path.join(run, "edge.jsonl")),
        "metrics": [r for r in read_metrics(run) if r.get("event") == "edge"],
        "snapshots": snapshots.seen,
    }


# ---------------------------------------------------------------------- Lightning under DDP


def _elastic_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives a worker: Lightning and accelerate then join it."""
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
        "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "samkit-test",
    })


def _run_framework(rank: int, world: int, port: int, out_dir: str, body) -> None:
    """Like :func:`_run`, but the framework initializes the process group."""
    _elastic_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        results = body(rank, world, out_dir)
    except BaseException:
        results = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def lightning_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _run_framework(rank, world, port, out_dir, _lightning_body)


def _gathered(x, y):
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (x, y))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _lightning_body(rank: int, world: int, out_dir: str) -> dict:
    import lightning as L

    from samkit.distributed import shard_batch
    from samkit.integrations.lightning import EdgeTrackerCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_fn(self.net(x), y)

        def configure_optimizers(self):
            return make_sam(self.parameters())

    class Snapshots(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen[int(trainer.global_step)] = {"weights": _weights(module.net),
                                                   "batch": _gathered(*batch)}

        def on_train_end(self, trainer, module):
            self.seen["final"] = {"weights": _weights(module.net), "batch": None}

    class Recorder(L.pytorch.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.logged = []

        name = property(lambda self: "recorder")
        version = property(lambda self: 0)

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if "edge/lambda1" in metrics:
                self.logged.append((step, metrics["edge/lambda1"]))

    x, y = data(n=40, seed=5)  # the training set: 20 examples a rank, batches of 5 a rank
    probe = shard_batch(*data(), rank, world)  # this rank's shard of the probe set (21 / 20)
    path = os.path.join(out_dir, "lightning.jsonl")
    snapshots = Snapshots()
    edge = EdgeTrackerCallback(probe, loss_fn, every=2, budget=None, model=lambda m: m.net,
                               tol=1e-6, path=path)
    logger = Recorder()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=world, strategy="ddp",
                        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out_dir,
                        callbacks=[snapshots, edge])
    trainer.fit(Module(), loader)
    dist.barrier()
    return {"rows": edge.tracker.rows, "file": _read(path), "logged": logger.logged,
            "snapshots": snapshots.seen, "backend": dist.get_backend()}


# ---------------------------------------------------------------------- Hugging Face under DDP


def gpt2():
    """A tiny GPT-2 from a local config (no downloads), float64, eager attention (double
    backward)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).double()


def token_data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def huggingface_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    _run_framework(rank, world, port, out_dir, _huggingface_body)


def _huggingface_body(rank: int, world: int, out_dir: str) -> dict:
    import transformers

    from samkit.integrations.huggingface import EdgeTrackerCallback, SAMTrainer

    class Snapshots(transformers.TrainerCallback):
        def __init__(self):
            self.seen = {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.seen[int(state.global_step)] = {"weights": _weights(model), "batch": None}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.seen["final"] = {"weights": _weights(model), "batch": None}

    probe = token_data(7, seed=1)
    shard = probe[:4] if rank == 0 else probe[4:]  # this rank's shard of the probe set
    path = os.path.join(out_dir, "huggingface.jsonl")
    snapshots = Snapshots()
    edge = EdgeTrackerCallback(shard, every=2, budget=None, tol=1e-6, path=path)
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, max_steps=4, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0, ddp_backend="gloo")
    trainer = SAMTrainer(model=gpt2(), args=args, train_dataset=token_data(8), sam="sam",
                         sam_kwargs={"rho": 0.05}, callbacks=[snapshots, edge])
    trainer.train()
    dist.barrier()
    return {"rows": edge.tracker.rows, "file": _read(path), "snapshots": snapshots.seen,
            "world_zero": trainer.state.is_world_process_zero, "world": args.world_size,
            "lr": trainer.sam_optimizer.param_groups[0]["lr"]}


# ---------------------------------------------------------------------- resume under DDP


def resume_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _run(rank, world, port, out_dir, _resume_body)


def _resume_body(rank: int, world: int, out_dir: str) -> dict:
    """The Trainer with the tracker: 2 epochs at once, and 1 epoch then resumed to 2."""
    from samkit.train import Trainer
    from samkit.train.edge import EdgeTracker

    def fit(name, epochs, resume=False):
        tracker = EdgeTracker(every=3, tol=1e-6)
        cfg = trainer_config(out_dir, name=name, epochs=epochs)
        Trainer(cfg, callbacks=[tracker], model=make_mlp(), data=trainer_data(), verbose=0,
                resume=resume).fit()
        dist.barrier()  # rank 0 has written the checkpoint and the rows
        return tracker.rows, _read(os.path.join(out_dir, cfg.run_name, "edge.jsonl"))

    full, full_file = fit("full", 2)
    fit("resumed", 1)
    resumed, resumed_file = fit("resumed", 2, resume=True)
    return {"full": full, "full_file": full_file, "resumed": resumed,
            "resumed_file": resumed_file}
