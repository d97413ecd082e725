"""``process_group`` in one process: its meanings, bad values, and a group of one rank (DDP and
FSDP2 in this process, no spawn). The 2- and 3-process checks are in
tests/distributed/test_curvature_dist.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import samkit
from samkit.curvature import (
    GGNOperator,
    HessianOperator,
    effective_hessian,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(11, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,),
                                                                               generator=g)


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("bad", ["global", 3, object()])
def test_bad_process_group_is_refused(bad):
    model, data = _mlp(), _data()
    for build in (lambda: HessianOperator(model, loss_fn, data, process_group=bad),
                  lambda: GGNOperator(model, loss_fn, data, process_group=bad),
                  lambda: samkit.sharpness(model, loss_fn, data, rho=0.1, process_group=bad)):
        with pytest.raises(ValueError, match="Invalid process_group.*allowed: None, a "
                                             "torch.distributed.ProcessGroup, or 'local'"):
            build()


def test_without_a_group_the_default_is_this_process():
    assert not dist.is_initialized()
    model, data = _mlp(), _data()
    a = HessianOperator(model, loss_fn, data)
    b = HessianOperator(model, loss_fn, data, process_group="local")
    assert a.process_group is None and a.data_parallel is None
    v = torch.randn(a.shape[0], dtype=torch.float64)
    assert torch.equal(a @ v, b @ v)
    assert a.local_dim == a.dim  # whole vectors


def _fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _measure(model, data, params=None, **group):
    params = list(model.parameters()) if params is None else params
    H = HessianOperator(model, loss_fn, data, **group)
    opt = samkit.ASAM(torch.optim.SGD(params, lr=0.1), rho=0.5, eta=0.01)
    return torch.cat([
        top_eigenvalues(H, k=2, tol=1e-10).values,
        hessian_trace(H, samples=3).samples,
        torch.tensor([spectral_density(H, num_steps=6).moment(2)], dtype=torch.float64),
        top_eigenvalues(GGNOperator(model, loss_fn, data, **group), k=1, tol=1e-10).values,
        top_eigenvalues(effective_hessian(H, opt), k=1, tol=1e-10).values,
        torch.tensor([samkit.sharpness(model, loss_fn, data, rho=0.1, p=math.inf, steps=2,
                                       starts=2, **group).value], dtype=torch.float64),
    ])


def test_a_group_of_one_rank_ddp_and_fsdp2_equal_the_plain_model(one_rank):
    data = _data()
    want = _measure(_mlp(), data)
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    torch.testing.assert_close(_measure(ddp, data), want, rtol=1e-12, atol=1e-14)
    fsdp = _fsdp(_mlp())
    H = HessianOperator(fsdp, loss_fn, data)
    assert H.sharding is not None and H.local_dim == H.dim  # one rank holds every row
    torch.testing.assert_close(_measure(fsdp, data), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="'local' for an FSDP2 model"):
        HessianOperator(fsdp, loss_fn, data, process_group="local")
    with pytest.raises(ValueError, match="sharded vectors"):
        H.to_scipy()


def test_fsdp2_weights_changed_by_an_optimizer_step_are_seen(one_rank):
    data = _data()
    fsdp = _fsdp(_mlp())
    H = HessianOperator(fsdp, loss_fn, data)
    before = top_eigenvalues(H, k=1, tol=1e-10).values
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.5)
    loss_fn(fsdp(data[0]), data[1]).backward()  # FSDP's own forward and backward
    opt.step()
    plain = _mlp()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), fsdp.parameters(), strict=True):
            p.copy_(q.full_tensor())
    after = top_eigenvalues(H, k=1, tol=1e-10).values
    want = top_eigenvalues(HessianOperator(plain, loss_fn, data), k=1, tol=1e-10).values
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-12, atol=0)


def test_m_and_average_sharpness_refuse_an_fsdp2_model(one_rank):
    from samkit.measures import average_sharpness, m_sharpness

    fsdp = _fsdp(_mlp())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="an FSDP2 model for m_sharpness"):
        m_sharpness(fsdp, loss_fn, (x, y), rho=0.1, m=2)
    with pytest.raises(ValueError, match="an FSDP2 model for average_sharpness"):
        average_sharpness(fsdp, loss_fn, (x, y), sigma=0.1)
