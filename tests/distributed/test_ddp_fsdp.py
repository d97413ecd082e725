"""SAM/ASAM under DDP (both perturbation modes) and FSDP2, with 2 gloo processes on CPU.

Each group of checks spawns the 2 processes once (a module fixture); the tests compare their
float64 results with single-process references.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import samkit
import samkit.distributed
from samkit.optim import kernels

sys.path.insert(0, str(Path(__file__).parent))
import samkit_dist_workers as W  # noqa: E402

WORLD = 2
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)


def _spawn(worker, tmp_path_factory) -> list[dict]:
    results = W.spawn(worker, tmp_path_factory.mktemp(worker.__name__), WORLD)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _spawn(W.ddp_worker, tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _spawn(W.fsdp_worker, tmp_path_factory)


def _full_batch_reference(kind: str, steps: int = 2):
    x, y = W.data()
    model = W.make_mlp()
    opt = W.make_optimizer(kind, model.parameters())

    def closure():
        opt.zero_grad()
        loss = W.loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return [p.detach() for p in model.parameters()]


def _per_shard_reference(kind: str, steps: int = 2):
    """The mean over the shards of each shard's own SAM gradient (m-sharpness, m = shard)."""
    x, y = W.data()
    model = W.make_mlp()
    opt = W.make_optimizer(kind, model.parameters())
    shards = [samkit.distributed.shard_batch(x, y, r, WORLD) for r in range(WORLD)]
    for _ in range(steps):
        samkit.m_sharpness_step(opt, model, W.loss_fn, shards)
    return [p.detach() for p in model.parameters()]


def _close(got, want, tol=1e-12):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_synced_equals_single_process_full_batch(ddp, kind, accum):
    want = _full_batch_reference(kind)
    for res in ddp:
        _close(res[(kind, "synced", accum)]["params"], want)


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_local_equals_mean_of_per_shard_sam_gradients(ddp, kind, accum):
    want = _per_shard_reference(kind)
    full = _full_batch_reference(kind)
    for res in ddp:
        _close(res[(kind, "local", accum)]["params"], want)
    # and it is a different step from the synced one
    assert any(not torch.allclose(a, b) for a, b in zip(want, full, strict=True))


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_one_allreduce_per_synced_pass(ddp, kind):
    # 2 steps: synced all-reduces both passes, local only the second one (first under no_sync),
    # with or without accumulation (micro-batches but the last run under no_sync)
    for res in ddp:
        for accum in (1, 2):
            assert res[(kind, "synced", accum)]["allreduce_calls"] == 4
            assert res[(kind, "local", accum)]["allreduce_calls"] == 2


@pytest.mark.slow  # spawns processes
def test_local_losses_are_per_replica(ddp):
    # the loss returned by step() is each replica's own loss at w
    assert ddp[0][("sam", "local", 1)]["loss"][0] != ddp[1][("sam", "local", 1)]["loss"][0]


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("mode", ["synced", "local"])
def test_batchnorm_context_is_fine_with_ddp(ddp, mode):
    # three steps ran without DDP's unused-parameter / unfinished-reduction error; running
    # statistics moved once per step; the replicas hold the same weights
    a, b = ddp[0][("bn", mode)], ddp[1][("bn", mode)]
    assert a["num_batches_tracked"] == 3
    _close(a["params"], b["params"], tol=0)


@pytest.mark.slow  # spawns processes
def test_local_mode_refuses_first_gradient_descent_rules(ddp):
    assert "perturbation='local'" in ddp[0]["looksam_local"]


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("kind", ["sam", "asam", "asam-filterwise", "asam-inf"])
def test_fsdp_fully_shard_equals_single_process(fsdp, kind):
    want = _full_batch_reference(kind)
    for res in fsdp:
        assert res[kind]["sharded"]
        _close(res[kind]["params"], want)


@pytest.mark.slow  # spawns processes
def test_fsdp_global_norm_is_exact_with_one_allreduce(fsdp):
    x, y = W.data()
    for kind in ("sam", "asam"):
        model = W.make_mlp()
        opt = W.make_optimizer(kind, model.parameters())
        model.load_state_dict(
            {k: v for k, v in zip(model.state_dict(), fsdp[0][kind]["params"], strict=True)}
        )
        W.loss_fn(model(x), y).backward()
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        for res in fsdp:
            assert res[kind]["grad_norm"] == pytest.approx(float(norm), rel=1e-12)
            # p = inf takes no norm; SAM and ASAM (p = 2) one all-reduce per step
            assert res[kind]["allreduces_per_first_step"] == 1
        del opt
    for res in fsdp:
        assert res["asam-inf"]["allreduces_per_first_step"] == 0


def test_sharded_tensors_single_process_norm_is_plain():
    t = [torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    want = kernels.global_sq_norm([t])
    assert isinstance(kernels.ShardedTensors(t, None), list)
    assert kernels.split_sharded(t)[0][0] is None
    assert torch.equal(kernels.global_sq_norm([list(t)]), want)


def test_check_perturbation_message():
    with pytest.raises(ValueError, match="Invalid perturbation: 'global'.*local, synced"):
        samkit.distributed.check_perturbation("global")


def test_shard_batch_covers_the_batch():
    x, y = W.data(n=7)
    parts = [samkit.distributed.shard_batch(x, y, r, 3) for r in range(3)]
    assert [len(p[1]) for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    with pytest.raises(ValueError, match="cannot be shared by 8 processes"):
        samkit.distributed.shard_batch(x, y, 0, 8)
