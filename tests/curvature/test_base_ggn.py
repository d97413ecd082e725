"""The operator base (CurvatureOperator): the GGN on it against a dense float64 GGN, the cache
key over every parameter, batched (d, k) products, the shared loss-and-gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from curvature_helpers import chunks, dense_hessian, mlp_data, tiny_mlp
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from samkit.curvature import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    loss_and_gradient,
    top_eigenvalues,
)
from samkit.curvature._data import Batches
from samkit.curvature.operator import DoubleBackward

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


def _mse_targets(x):
    g = torch.Generator().manual_seed(5)
    return torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64)


def dense_ggn(model, loss_fn, x, y) -> torch.Tensor:
    """J^T H_f J of the mean loss, by torch.func.jacrev and torch.func.hessian (no samkit)."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def out_of(w):
        pieces = [t.view(s) for t, s in zip(torch.split(w, sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(names, pieces, strict=True)), (x,))

    out = out_of(flat)
    jac = torch.func.jacrev(out_of)(flat).reshape(out.numel(), -1)
    h_out = torch.func.hessian(lambda o: loss_fn(o.view(out.shape), y))(out.reshape(-1))
    return jac.T @ h_out @ jac


def _data(fmt, x, y):
    if fmt == "single":
        return (x, y)
    if fmt == "chunks":
        return chunks(x, y, [5, 2, len(y) - 7])
    return DataLoader(TensorDataset(x, y), batch_size=5)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("fmt", ["single", "chunks", "loader"])
@pytest.mark.parametrize("cache", [True, False])
def test_ggn_matches_dense_float64_ggn(loss, fmt, cache):
    model = tiny_mlp()
    x, y = mlp_data()
    loss_fn = CE if loss == "ce" else MSE
    if loss == "mse":
        y = _mse_targets(x)
    ref = dense_ggn(model, loss_fn, x, y)
    G = GGNOperator(model, loss_fn, _data(fmt, x, y), cache=cache)
    assert isinstance(G, CurvatureOperator) and G.dtype == torch.float64
    d = ref.shape[0]
    dense = G @ torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-12)
    assert G.matvecs == d
    # a GGN of a convex loss is symmetric positive semi-definite, and it is not the Hessian
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-10
    assert float((dense - dense_hessian(model, loss_fn, x, y)).abs().max()) > 1e-4


def test_ggn_of_square_loss_on_a_linear_model_is_the_hessian():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, _ = mlp_data()
    y = _mse_targets(x)
    G = GGNOperator(model, MSE, (x, y))
    d = G.dim
    torch.testing.assert_close(G @ torch.eye(d, dtype=torch.float64),
                               dense_hessian(model, MSE, x, y), rtol=1e-10, atol=1e-12)


def test_ggn_top_eigenvalue_and_guards():
    model = tiny_mlp()
    x, y = mlp_data()
    ref = torch.linalg.eigvalsh(dense_ggn(model, CE, x, y))
    top = top_eigenvalues(GGNOperator(model, CE, (x, y)), k=2, tol=1e-8)
    assert top.converged
    torch.testing.assert_close(top.values, ref.flip(0)[:2], rtol=1e-7, atol=0)
    drop = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    loader = DataLoader(TensorDataset(x.float(), y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        GGNOperator(drop.train(), CE, loader)

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(ValueError, match="Invalid model: its output is a tuple"):
        GGNOperator(TwoOutputs(), lambda out, y: CE(out[0], y), (x, y)) @ torch.zeros(15).double()


@pytest.mark.parametrize("op", ["hessian", "ggn"])
@pytest.mark.parametrize("which", ["outside", "frozen"])
def test_cache_follows_parameters_outside_params_and_frozen_ones(op, which):
    """A product after an in-place change of a parameter the loss depends on but the operator
    does not differentiate: the cached graph must be rebuilt (it went stale before issue 11)."""
    model = tiny_mlp()
    x, y = mlp_data()
    first, last = model[0], model[2]
    if which == "frozen":
        first.weight.requires_grad_(False)
        params = None  # the frozen weight is left out by default
    else:
        params = list(last.parameters())
    make = HessianOperator if op == "hessian" else GGNOperator
    A = make(model, CE, (x, y), params=params)
    v = torch.randn(A.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = A @ v
    with torch.no_grad():
        first.weight.mul_(1.7)  # in place: the same tensor, a new version
    fresh = make(model, CE, (x, y), params=params, cache=False) @ v
    assert float((fresh - before).norm() / fresh.norm()) > 0.05  # the change matters
    torch.testing.assert_close(A @ v, fresh, rtol=1e-10, atol=1e-12)


def test_cache_follows_a_loss_module_buffer():
    model = tiny_mlp()
    x, y = mlp_data()
    loss_fn = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))
    H = HessianOperator(model, loss_fn, (x, y))
    v = torch.randn(H.dim, dtype=torch.float64)
    H @ v
    with torch.no_grad():
        loss_fn.weight.copy_(torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64))
    torch.testing.assert_close(H @ v, dense_hessian(model, loss_fn, x, y) @ v,
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("fmt", ["single", "chunks"])
def test_batched_matmat_matches_column_products(backend, fmt):
    model = tiny_mlp()
    x, y = mlp_data()
    H = HessianOperator(model, CE, _data(fmt, x, y), backend=backend)
    V = torch.randn(H.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    block = H @ V
    assert H.batched and H.batched_error is None and H.matvecs == 5
    columns = torch.stack([H @ V[:, j] for j in range(5)], dim=1)
    torch.testing.assert_close(block, columns, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(block, dense_hessian(model, CE, x, y) @ V, rtol=1e-9, atol=1e-11)


def test_batched_matmat_falls_back_with_a_warning(monkeypatch):
    model = tiny_mlp()
    x, y = mlp_data()
    H = HessianOperator(model, CE, (x, y))
    V = torch.randn(H.dim, 3, dtype=torch.float64)

    def no_batching(self, op, built, vs, retain, batched):
        if batched:
            raise RuntimeError("Batching rule not implemented for aten::some_op")
        return orig(self, op, built, vs, retain, batched)

    orig = DoubleBackward.apply
    monkeypatch.setattr(DoubleBackward, "apply", no_batching)
    with pytest.warns(UserWarning, match="column by column"):
        out = H @ V
    assert not H.batched and "Batching rule" in str(H.batched_error)
    torch.testing.assert_close(out, dense_hessian(model, CE, x, y) @ V, rtol=1e-9, atol=1e-11)
    assert H.matvecs == 3
    assert H.backend_in_use == "autograd"  # a batching failure is no reason to switch backends


def test_loss_and_gradient_matches_autograd_over_all_data_and_restores_weights():
    model = tiny_mlp()
    x, y = mlp_data()
    params = list(model.parameters())
    backup = [p.detach().clone() for p in params]
    H = HessianOperator(model, CE, chunks(x, y, [5, 2, len(y) - 5 - 2]))
    loss, grads = H.loss_and_gradient()
    ref_loss = CE(model(x), y)
    ref = torch.autograd.grad(ref_loss, params)
    assert abs(loss - float(ref_loss)) < 1e-14
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    shift = torch.randn(H.dim, dtype=torch.float64) * 0.1
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, s in zip(shifted.parameters(), H.unflatten(shift), strict=True):
            p.add_(s)
    l2, _ = loss_and_gradient(model, CE, params, Batches((x, y), x.device), shift=shift)
    assert abs(l2 - float(CE(shifted(x), y))) < 1e-13
    for p, b in zip(params, backup, strict=True):
        assert torch.equal(p, b)


def test_one_batch_gives_autograd_s_gradient_bit_for_bit_and_frozen_stays_frozen():
    """batch_mean returns one batch unscaled (no n / n rounding); frozen parameters asked for
    are differentiated and frozen again."""
    model = tiny_mlp()
    x, y = mlp_data()
    model[0].bias.requires_grad_(False)
    params = list(model.parameters())
    loss, grads = loss_and_gradient(model, CE, params, Batches((x, y), x.device))
    for p in params:
        p.requires_grad_(True)
    ref = torch.autograd.grad(CE(model(x), y), params)
    model[0].bias.requires_grad_(False)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref, strict=True))
    assert not model[0].bias.requires_grad
