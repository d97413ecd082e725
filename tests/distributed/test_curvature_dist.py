"""Curvature and sharpness under data parallelism: 2 and 3 gloo processes on CPU, uneven shards.

One spawn per world size (a module fixture) runs every measurement on every rank with a
DDP-wrapped model (float64 and float32) and an FSDP2 model; the tests compare each rank's
numbers with one process over the union of the shards and with each other.

The issue's finding (each rank silently reported the Hessian of its own shard) is
``test_ddp_answers_for_the_union``: without the process group it fails, each rank's λ1 being
its own shard's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import curvature_dist_workers as W  # noqa: E402
import samkit_dist_workers  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def spawned(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"curvature{world}")
    results = samkit_dist_workers.spawn(W.worker, out, world)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return world, results


def part(res: dict, name: str, rank: int):
    """One section of a rank's results; a section that raised fails the test with its error."""
    value = res[name]
    if isinstance(value, dict) and "error" in value:
        pytest.fail(f"rank {rank}, {name}:\n{value['error']}")
    return value


_references: dict = {}


def reference(world: int, dtype=torch.float64) -> dict:
    """One process over the union of the shards (cached per world size and dtype); no
    process group is initialized here, so the default is this process's data."""
    key = (world, dtype)
    if key not in _references:
        _references[key] = W.measure(W.make_mlp(dtype), W.union(world, dtype))
    return _references[key]


def _flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.double().reshape(-1)
    if isinstance(value, (tuple, list)):
        return torch.cat([_flat(v) for v in value])
    return torch.tensor([float(value)], dtype=torch.float64)


def _close(got, want, tol, what):
    got, want = _flat(got), _flat(want)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}\n got {got}\nwant {want}"


KEYS = ["top", "trace", "density", "ggn", "efisher", "mcfisher", "hutchpp", "blocks", "loss",
        "grad_norm", "eff_sam", "eff_asam", "adam",
        *[("sharpness", a, p) for a in (False, True) for p in (2, math.inf)], "m_sharpness"]
# samkit.measures' m_sharpness and average_sharpness: DDP only (FSDP2 models are refused)
DDP_KEYS = [*KEYS, "m_sharpness_error", "average"]


def keys(kind: str) -> list:
    return DDP_KEYS if kind.startswith("ddp") else KEYS


def _values(res: dict, key):
    value = res[key]
    if key == "top":  # (values, converged, matvecs)
        return value[0]
    if isinstance(key, tuple):  # sharpness: (value, base_loss, start_values)
        return value
    return value


@pytest.mark.slow  # spawns processes
def test_ddp_answers_for_the_union(spawned):
    world, results = spawned
    want = reference(world)["top"][0]
    for r, res in enumerate(results):
        top = part(res, "ddp", r)["top"]
        _close(top[0], want, 1e-10, f"rank {r} of {world}: top-3 eigenvalues")
        assert top[1], "converged"


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("kind,dtype", [("ddp", torch.float64), ("ddp32", torch.float32),
                                        ("fsdp", torch.float64), ("fsdp32", torch.float32)])
def test_every_measurement_equals_one_process_over_the_union(spawned, kind, dtype):
    world, results = spawned
    want = reference(world, dtype)
    for r, res in enumerate(results):
        got = part(res, kind, r)
        for key in keys(kind):
            _close(_values(got, key), _values(want, key), TOL[dtype],
                   f"{kind} rank {r} of {world}: {key}")


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("kind", ["ddp", "ddp32", "fsdp", "fsdp32"])
def test_every_rank_returns_the_same_numbers(spawned, kind):
    world, results = spawned
    first = part(results[0], kind, 0)
    for r in range(1, world):
        other = part(results[r], kind, r)
        for key in keys(kind):
            a, b = _flat(_values(first, key)), _flat(_values(other, key))
            assert torch.equal(a, b), f"{kind}: rank {r} differs from rank 0 on {key}"
        assert other["top"][2] == first["top"][2]  # the same number of products


@pytest.mark.slow  # spawns processes
def test_one_allreduce_per_product(spawned):
    _, results = spawned
    for r, res in enumerate(results):
        counts = part(res, "reduces", r)
        assert counts["products"] == 4
        assert counts["block"] == 1  # a (d, 2) block: one batched product
        assert counts["loss_grad"] == 1
        assert counts["local"] == 0


@pytest.mark.slow  # spawns processes
def test_local_is_each_ranks_own_shard_and_a_group_is_the_union(spawned):
    world, results = spawned
    from samkit.curvature import HessianOperator, top_eigenvalues

    for r, res in enumerate(results):
        own = HessianOperator(W.make_mlp(), W.loss_fn, W.shard(r, world), process_group="local")
        _close(part(res, "local_top", r), top_eigenvalues(own, k=1, tol=1e-10).values, 1e-10,
               "local")
        _close(part(res, "group_top", r), reference(world)["top"][0][:1], 1e-10,
               "explicit group")
    # the shards disagree with each other and with the union (the finding)
    union = float(reference(world)["top"][0][0])
    assert len({float(res["local_top"][0]) for res in results} | {union}) == world + 1


@pytest.mark.slow  # spawns processes
def test_fsdp_vectors_are_sharded_like_the_parameters(spawned):
    world, results = spawned
    d = sum(p.numel() for p in W.make_mlp().parameters())
    local = []
    for r, res in enumerate(results):
        layout = part(res, "fsdp_layout", r)
        assert layout["dim"] == d
        assert layout["local_dim"] == sum(math.prod(s) for s in layout["shards"])
        assert layout["vectors"] == (layout["local_dim"], 2)  # the eigenvectors: this rank's rows
        assert layout["reduces"] == 1  # one all-reduce per product
        assert layout["gathers"] == 2  # and all-gathers of the vector and of the weights
        assert "not for an operator built on one" in layout["blocks_refused"]
        local.append(layout["local_dim"])
    assert sum(local) == d and max(local) < d  # the memory per rank falls with the world size


@pytest.mark.slow  # spawns processes
def test_fsdp_power_restarts_and_rayleigh_ritz_equal_one_process(spawned):
    world, results = spawned
    want = W.extra(W.make_mlp(), W.union(world))
    for r, res in enumerate(results):
        got = part(res, "fsdp_extra", r)
        _close(got["power"][0], want["power"][0], 1e-9, f"rank {r}: power iteration")
        assert got["power"][1] == want["power"][1]  # the same iterations
        _close(got["rayleigh_ritz"], want["rayleigh_ritz"], 1e-10, f"rank {r}: Rayleigh-Ritz")
        _close(got["rr_residual"], want["rr_residual"], 1e-3, f"rank {r}: its residual")
        _close(got["restarted"][0], want["restarted"][0], 1e-9, f"rank {r}: thick restarts")
        assert got["restarted"][1] == want["restarted"][1]


@pytest.mark.slow  # spawns processes
def test_autograd_does_not_reach_fsdp2_shards(spawned):
    # why samkit all-gathers the weights for its products (docs/guides/distributed-curvature.md
    # says so, checked with torch 2.13): torch.autograd.grad finds no path from the loss to
    # FSDP2's DTensor shards; FSDP2 computes with separate unsharded tensors
    _, results = spawned
    for r, res in enumerate(results):
        assert all(part(res, "autograd_through_fsdp", r))
