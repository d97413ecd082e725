"""EdgeTracker's process_group in this process: a gloo group of one rank (no process started):
the group's path (all-reduced loss and gradient, the budget's clocks, the writer) gives the
plain tracker's rows, a DDP model is measured through its module, FSDP2 models and bad groups are
refused. The multi-process checks are in tests/distributed/test_edge_ddp.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import samkit
from samkit.train.edge import EdgeTracker

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (30,), generator=g)


def _rows(model, x, y, path, **kwargs):
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    tracker = EdgeTracker((x, y), nn.functional.cross_entropy, every=1, tol=1e-8, path=path,
                          **kwargs)
    for step in range(2):
        tracker.record(step, model, opt, batch=(x[:10], y[:10]))
    return tracker.rows


def _measured(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_group_of_one_rank_and_a_ddp_model_give_the_plain_rows(one_rank, tmp_path):
    model, x, y = _problem()
    plain = _rows(model, x, y, tmp_path / "plain.jsonl", process_group="local")
    ddp = nn.parallel.DistributedDataParallel(model)
    grouped = _rows(ddp, x, y, tmp_path / "group.jsonl")  # None: the default group
    world = _rows(model, x, y, tmp_path / "world.jsonl", process_group=dist.group.WORLD)
    for rows in (grouped, world):
        for row, ref in zip(_measured(rows), _measured(plain), strict=True):
            assert row.keys() == ref.keys()
            for key, value in ref.items():
                if isinstance(value, float):
                    assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
                else:
                    assert row[key] == value, key
    assert (tmp_path / "group.jsonl").read_text().count("\n") == 2  # rank 0 writes


def test_fsdp2_models_are_refused(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, x, y = _problem()
    mesh = init_device_mesh("cpu", (1,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = EdgeTracker((x, y), nn.functional.cross_entropy, every=1)
    with pytest.raises(ValueError, match="FSDP2"):
        tracker.record(0, model, opt)


@pytest.mark.parametrize("bad", ["world", 2, object()])
def test_bad_process_group_is_refused(bad):
    with pytest.raises(ValueError, match="Invalid process_group"):
        EdgeTracker(process_group=bad)
