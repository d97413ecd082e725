"""HessianOperator against a dense float64 torch.func.hessian, in every input format."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from curvature_helpers import chunks, cnn_data, dense_hessian, mlp_data, tiny_cnn, tiny_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from samkit.curvature import HessianOperator, MatrixOperator
from samkit.curvature.operator import DoubleBackward, ForwardOverReverse, UnsupportedProduct

CE = nn.CrossEntropyLoss()
BACKENDS = ["autograd", "func"]


def _setup(kind):
    if kind == "mlp":
        return tiny_mlp(), *mlp_data()
    return tiny_cnn(), *cnn_data()


def _data(fmt, x, y):
    if fmt == "single":
        return (x, y)
    if fmt == "chunks":  # uneven chunks: the weighting by size matters
        return chunks(x, y, [5, 2, len(y) - 7])
    return DataLoader(TensorDataset(x, y), batch_size=5)  # last batch smaller


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("fmt", ["single", "chunks", "loader"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_products_match_dense_hessian(kind, fmt, backend):
    model, x, y = _setup(kind)
    ref = dense_hessian(model, CE, x, y)
    H = HessianOperator(model, CE, _data(fmt, x, y), backend=backend)
    d = ref.shape[0]
    assert H.shape == (d, d) and H.dtype == torch.float64 and H.device == torch.device("cpu")
    torch.testing.assert_close(H @ torch.eye(d, dtype=torch.float64), ref, rtol=1e-9, atol=1e-11)
    assert H.matvecs == d


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_list_and_matrix_forms_agree(backend):
    model, x, y = _setup("cnn")
    H = HessianOperator(model, CE, (x, y), backend=backend)
    ref = dense_hessian(model, CE, x, y)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(H.dim, generator=g, dtype=torch.float64)
    flat = H @ v
    as_list = H @ H.unflatten(v)
    assert [t.shape for t in as_list] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(H.flatten(as_list), flat)
    torch.testing.assert_close(flat, ref @ v, rtol=1e-9, atol=1e-11)
    vs = torch.randn(H.dim, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(H @ vs, ref @ vs, rtol=1e-9, atol=1e-11)
    # a vector of another dtype is an error, not a silent cast (issue 11)
    with pytest.raises(TypeError, match="Invalid vector: dtype torch.float32"):
        H @ v.float()


def test_float32_model_matches_float64_reference():
    model, x, y = _setup("mlp")
    ref = dense_hessian(model, CE, x, y)
    model32 = copy.deepcopy(model).float()
    H = HessianOperator(model32, CE, (x.float(), y))
    assert H.dtype == torch.float32
    dense = H @ torch.eye(H.dim)
    torch.testing.assert_close(dense.double(), ref, rtol=1e-4, atol=1e-5)


def test_params_subset_gives_the_diagonal_block():
    model, x, y = _setup("mlp")
    last = list(model[2].parameters())
    ref = dense_hessian(model, CE, x, y, params=last)
    H = HessianOperator(model, CE, (x, y), params=last)
    assert H.dim == sum(p.numel() for p in last)
    torch.testing.assert_close(H @ torch.eye(H.dim, dtype=torch.float64), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameter_can_be_asked_for_and_stays_frozen(backend):
    model, x, y = _setup("mlp")
    model[0].weight.requires_grad_(False)
    H = HessianOperator(model, CE, (x, y), backend=backend)
    assert H.dim == sum(p.numel() for p in model.parameters()) - model[0].weight.numel()
    H2 = HessianOperator(model, CE, (x, y), params=[model[0].weight], backend=backend)
    full = dense_hessian(model, CE, x, y)
    k = model[0].weight.numel()
    torch.testing.assert_close(H2 @ torch.eye(k, dtype=torch.float64), full[:k, :k])
    assert not model[0].weight.requires_grad


def test_cached_graph_follows_in_place_weight_changes():
    model, x, y = _setup("mlp")
    H = HessianOperator(model, CE, (x, y))
    v = torch.randn(H.dim, dtype=torch.float64)
    before = H @ v
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    after = H @ v
    torch.testing.assert_close(after, dense_hessian(model, CE, x, y) @ v)
    assert not torch.allclose(before, after)
    # mode changes also rebuild the graph (BatchNorm: batch statistics vs running ones)
    bn = tiny_cnn(batchnorm=True)
    xb, yb = cnn_data()
    Hb = HessianOperator(bn.train(), CE, (xb, yb))
    u = torch.randn(Hb.dim, dtype=torch.float64)
    train_hv = Hb @ u
    bn.eval()
    torch.testing.assert_close(Hb @ u, dense_hessian(bn, CE, xb, yb) @ u)
    assert not torch.allclose(train_hv, Hb @ u)


def test_a_list_of_one_batch_is_a_single_batch():
    model, x, y = _setup("mlp")
    H = HessianOperator(model, CE, [(x, y)])
    assert H.batches.single is not None  # its gradient graph is cached like (x, y)'s
    v = torch.randn(H.dim, dtype=torch.float64)
    torch.testing.assert_close(H @ v, dense_hessian(model, CE, x, y) @ v)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["single", "chunks"])
def test_model_is_left_unchanged_batchnorm_in_train_mode(backend, fmt):
    model = tiny_cnn(batchnorm=True).train()
    x, y = cnn_data()
    state = _snapshot(model)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    rng = torch.get_rng_state()
    H = HessianOperator(model, CE, _data(fmt, x, y), backend=backend)
    hv = H @ v
    assert torch.isfinite(hv).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running stats and num_batches_tracked untouched
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    # train mode: BatchNorm uses the batch statistics, as in a training step
    if fmt == "single":
        torch.testing.assert_close(
            H @ torch.eye(H.dim, dtype=torch.float64), dense_hessian(model, CE, x, y)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_train_mode_gives_one_fixed_symmetric_matrix(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x, y = mlp_data()
    H = HessianOperator(model.train(), CE, chunks(x, y, [6, 6]), backend=backend)
    dense = H @ torch.eye(H.dim, dtype=torch.float64)
    torch.testing.assert_close(dense, dense.T)  # the same masks at every product
    torch.testing.assert_close(H @ torch.eye(H.dim, dtype=torch.float64), dense)
    eval_dense = HessianOperator(model.eval(), CE, (x, y)) @ torch.eye(H.dim, dtype=torch.float64)
    assert not torch.allclose(dense, eval_dense)  # the masks were really applied


def test_backends_agree_and_auto_uses_double_backward():
    model, x, y = _setup("cnn")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    H = HessianOperator(model, CE, (x, y))
    out = H @ v
    assert H.backend_in_use == "autograd" and H.backend_error is None
    torch.testing.assert_close(out, HessianOperator(model, CE, (x, y), backend="func") @ v)
    torch.testing.assert_close(
        out, HessianOperator(model, CE, (x, y), backend="autograd", cache=False) @ v
    )


def test_auto_falls_back_to_forward_over_reverse(monkeypatch):
    model, x, y = _setup("mlp")
    ref = dense_hessian(model, CE, x, y)
    v = torch.randn(ref.shape[0], dtype=torch.float64)

    def no_double_backward(self, *args):  # what torch raises in the second backward pass
        raise RuntimeError("derivative for aten::some_backward is not implemented")

    monkeypatch.setattr(DoubleBackward, "apply", no_double_backward)
    with pytest.raises(UnsupportedProduct) as info:
        HessianOperator(model, CE, (x, y), backend="autograd") @ v
    assert isinstance(info.value, NotImplementedError) and info.value.product == "autograd"
    assert "some_backward" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    H = HessianOperator(model, CE, (x, y))
    with pytest.warns(UserWarning, match="using the func backend"):
        out = H @ v
    torch.testing.assert_close(out, ref @ v)
    assert H.backend_in_use == "func" and isinstance(H.backend_error, UnsupportedProduct)
    assert "backend='func'" in repr(H)

    def no_forward_ad(self, *args):
        raise NotImplementedError("Trying to use forward AD with some_op")

    monkeypatch.setattr(ForwardOverReverse, "apply", no_forward_ad)
    H = HessianOperator(model, CE, (x, y))
    with pytest.raises(UnsupportedProduct, match="some_backward"):  # the first error is kept
        H @ v
    assert H.backend_in_use == "autograd"  # nothing changed


def test_a_real_op_without_second_derivatives_raises_the_typed_error():
    """ctc_loss has neither a double-backward nor a forward-mode formula in torch: "auto" tries
    both products and raises the typed error of the first, torch's error as its cause."""
    T, N, C, S = 6, 2, 4, 3
    torch.manual_seed(0)
    model = nn.Linear(3, C).double()
    x = torch.randn(T, N, 3, dtype=torch.float64)
    y = torch.randint(1, C, (N, S))

    def ctc(out, target):
        lengths = torch.full((N,), T), torch.full((N,), S)
        return nn.functional.ctc_loss(out.log_softmax(2), target, *lengths)

    H = HessianOperator(model, ctc, (x, y), check_deterministic=False)
    with pytest.raises(UnsupportedProduct, match="_ctc_loss_backward") as info:
        H @ torch.randn(H.dim, dtype=torch.float64)
    assert info.value.product == "autograd" and isinstance(info.value.__cause__, RuntimeError)
    assert H.backend_in_use == "autograd" and H.backend_error is None


def test_out_of_memory_is_not_a_reason_to_switch_backends(monkeypatch):
    model, x, y = _setup("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)

    def oom(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DoubleBackward, "apply", oom)
    H = HessianOperator(model, CE, (x, y))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        H @ v
    with pytest.raises(torch.cuda.OutOfMemoryError):
        H @ torch.stack([v, v], dim=1)  # nor to go column by column
    assert H.backend_in_use == "autograd" and H.batched


def test_a_product_strategy_can_be_passed():
    model, x, y = _setup("mlp")
    H = HessianOperator(model, CE, (x, y), backend=ForwardOverReverse())
    assert H.backend_in_use == "func" and H.fallback is None
    torch.testing.assert_close(H @ torch.eye(H.dim, dtype=torch.float64),
                               dense_hessian(model, CE, x, y))
    with pytest.raises(ValueError, match="Invalid backend"):
        HessianOperator(model, CE, (x, y), backend="finite")


def test_a_non_deterministic_operator_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True
    )
    with pytest.raises(ValueError, match="BatchNorm1d in training mode.*shuffles"):
        HessianOperator(model.train(), CE, loader)
    HessianOperator(model.eval(), CE, loader)  # eval mode: the batch order does not matter
    dropout = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    HessianOperator(dropout, CE, (x, y))  # masks fixed per product: deterministic


def test_non_finite_weights_are_refused():
    model, x, y = _setup("mlp")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or inf"):
        HessianOperator(model, CE, (x, y))


def test_to_scipy_eigsh_matches_eigvalsh():
    from scipy.sparse.linalg import eigsh

    model, x, y = _setup("mlp")
    H = HessianOperator(model, CE, (x, y))
    ref = torch.linalg.eigvalsh(dense_hessian(model, CE, x, y)).numpy()
    lo = H.to_scipy()
    assert lo.shape == H.shape and lo.dtype == np.float64
    vals = eigsh(lo, k=2, which="LA", tol=1e-10, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), ref[-2:], rtol=1e-8)
    assert H.matvecs > 0


def test_matrix_operator_and_repr():
    A = torch.eye(3, dtype=torch.float64) * 2
    op = MatrixOperator(A)
    torch.testing.assert_close(
        op @ torch.ones(3, dtype=torch.float64), 2 * torch.ones(3, dtype=torch.float64)
    )
    assert "dim=3" in repr(op)
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.ones(2, 3))


def test_bad_inputs_raise_clear_errors():
    model, x, y = _setup("mlp")
    with pytest.raises(ValueError, match="no batches"):
        HessianOperator(model, CE, [])
    with pytest.raises(ValueError, match="0 examples"):
        HessianOperator(model, CE, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="one-shot iterator"):
        HessianOperator(model, CE, iter([(x, y)]))
    with pytest.raises(ValueError, match="Invalid data"):
        HessianOperator(model, CE, 3)
    with pytest.raises(ValueError, match="Invalid backend"):
        HessianOperator(model, CE, (x, y), backend="jax")
    with pytest.raises(ValueError, match="not parameters of the model"):
        HessianOperator(model, CE, (x, y), params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="no parameter"):
        HessianOperator(nn.ReLU(), CE, (x, y))
    with pytest.raises(ValueError, match="one device and one floating dtype"):
        mixed = nn.Sequential(nn.Linear(4, 5).double(), nn.Linear(5, 3).float())
        HessianOperator(mixed, CE, (x, y))
    H = HessianOperator(model, CE, (x, y))
    with pytest.raises(ValueError, match="Invalid vector"):
        H @ torch.ones(H.dim + 1)
    with pytest.raises(ValueError, match="Invalid vector"):
        H @ [torch.ones(2)]
    with pytest.raises(ValueError, match="Invalid vector"):
        H @ 3.0
    loader_empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        HessianOperator(model, CE, loader_empty)
    batches = [(x[:0], y[:0])]
    with pytest.raises(ValueError, match="0 examples"):  # found by the determinism check
        HessianOperator(model, CE, batches)
    H_empty = HessianOperator(model, CE, batches, check_deterministic=False)
    with pytest.raises(ValueError, match="0 examples"):
        H_empty @ torch.ones(H.dim, dtype=torch.float64)
