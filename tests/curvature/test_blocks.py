"""Per-block spectra against the eigenvalues of dense float64 diagonal blocks."""

from __future__ import annotations

import pytest
import torch
from curvature_helpers import cnn_data, dense_hessian, mlp_data, tiny_cnn, tiny_mlp
from torch import nn

import samkit
from samkit.curvature import (
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    block_spectra,
    effective_hessian,
)

CE = nn.CrossEntropyLoss()
TOL = 1e-10


def offsets(model):
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = (start, start + p.numel())
        start += p.numel()
    return out


def block_top(dense, ranges, k):
    """The top ``k`` eigenvalues of the dense diagonal block over the index ``ranges``."""
    idx = torch.cat([torch.arange(a, b) for a, b in ranges])
    ev = torch.linalg.eigvalsh(dense[idx][:, idx]).flip(0)
    return ev[:k]


def test_module_blocks_are_the_dense_diagonal_blocks():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    dense = dense_hessian(model, CE, x, y)
    off = offsets(model)
    result = block_spectra(H, blocks="module", k=3, tol=TOL)
    assert [b.name for b in result] == ["0", "2"]
    assert [b.kind for b in result] == ["Linear", "Linear"]
    assert result["0"].params == ("0.weight", "0.bias") and result["0"].dim == 25
    assert result["2"].dim == 18 and result.converged and result.k == 3
    for b in result:
        ref = block_top(dense, [off[n] for n in b.params], 3)
        torch.testing.assert_close(b.values, ref, rtol=1e-8, atol=1e-12)
        assert b.converged and b.matvecs > 0
        assert torch.all(b.error_bounds <= TOL * b.values.abs() + 1e-15)
    # a block's top eigenvalue differs from the whole Hessian's (interlacing: never above it)
    lam = float(torch.linalg.eigvalsh(dense)[-1])
    assert all(float(b.values[0]) <= lam + 1e-10 for b in result)
    assert float(result["2"].values[0]) < lam - 1e-3
    assert H.matvecs == result.matvecs  # the block products are counted on H


def test_parameter_blocks_smaller_than_k_get_every_eigenvalue():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    dense = dense_hessian(model, CE, x, y)
    off = offsets(model)
    result = block_spectra(H, blocks="parameter", k=4, tol=TOL)
    assert [b.name for b in result] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    bias = result["2.bias"]
    assert bias.dim == 3 and bias.values.shape == (3,)
    torch.testing.assert_close(bias.values, block_top(dense, [off["2.bias"]], 3),
                               rtol=1e-8, atol=1e-12)
    rows = result.to_rows()
    assert rows[3]["lambda_4"] is None and rows[3]["lambda_3"] == pytest.approx(
        float(bias.values[2]))
    assert set(rows[0]) == {"block", "kind", "dim", "lambda_1", "lambda_2", "lambda_3",
                            "lambda_4", "converged", "matvecs"}


def test_dict_blocks_may_overlap_and_take_modules_tensors_and_lists():
    model, (x, y) = tiny_cnn(), cnn_data()
    H = HessianOperator(model, CE, (x, y), backend="func")
    dense = dense_hessian(model, CE, x, y)
    off = offsets(model)
    conv, lin = model[0], model[3]
    blocks = {"conv": conv, "weights": [conv.weight, lin.weight], "last bias": lin.bias}
    result = block_spectra(H, blocks=blocks, k=2, tol=TOL)
    assert [b.name for b in result] == ["conv", "weights", "last bias"]
    assert result["weights"].params == ("0.weight", "3.weight")
    for b in result:
        ref = block_top(dense, [off[n] for n in b.params], 2)
        torch.testing.assert_close(b.values, ref, rtol=1e-8, atol=1e-12)
    assert H.backend_in_use == "func"


def test_ggn_blocks_and_parameter_groups():
    model, (x, y) = tiny_mlp(), mlp_data()
    G = GGNOperator(model, CE, (x, y))
    dense = G @ torch.eye(G.dim, dtype=torch.float64)
    off = offsets(model)
    groups = samkit.param_groups(model)  # weights (normalize=True), biases (normalize=False)
    opt = torch.optim.SGD(groups, lr=0.1)
    for blocks in (opt, groups):
        result = block_spectra(G, blocks=blocks, k=2, tol=TOL)
        assert [b.name for b in result] == ["group 0", "group 1"]
        assert result["group 1"].params == ("0.bias", "2.bias")
        for b in result:
            ref = block_top(dense, [off[n] for n in b.params], 2)
            torch.testing.assert_close(b.values, ref, rtol=1e-8, atol=1e-12)
    named = [{"params": [model[0].weight], "name": "first"}, {"params": [model[2].weight]}]
    assert [b.name for b in block_spectra(G, named, k=1, tol=1e-6)] == ["first", "group 1"]


def test_blocks_of_an_operator_built_on_the_hessian():
    # the effective Hessian is not a curvature operator: its blocks are E_b' (H + HDH) E_b,
    # each product a product of the whole operator with a vector zero off the block
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    H = HessianOperator(model, CE, (x, y))
    Heff = effective_hessian(H, opt)
    dense = Heff @ torch.eye(Heff.shape[0], dtype=torch.float64)
    Heff.matvecs = 0
    off = offsets(model)
    result = block_spectra(Heff, blocks="module", k=2, tol=TOL)
    for b in result:
        ref = block_top(dense, [off[n] for n in b.params], 2)
        torch.testing.assert_close(b.values, ref, rtol=1e-8, atol=1e-12)
    assert Heff.matvecs == result.matvecs


def test_only_the_operators_parameters_make_blocks():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y), params=list(model[2].parameters()))
    dense = dense_hessian(model, CE, x, y, params=list(model[2].parameters()))
    result = block_spectra(H, blocks="module", k=2, tol=TOL)
    assert [b.name for b in result] == ["2"]
    torch.testing.assert_close(result["2"].values, torch.linalg.eigvalsh(dense).flip(0)[:2],
                               rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match=r"Invalid blocks: block 'w' entry 0 \(shape \(5, 4\)\) "
                                         r"is not one of the operator's parameters"):
        block_spectra(H, blocks={"w": model[0].weight})


def test_the_table_says_which_blocks_did_not_converge():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    with pytest.warns(UserWarning):
        result = block_spectra(H, blocks="module", k=3, tol=1e-12, max_iter=6)
    assert not result.converged
    text = str(result)
    lines = text.splitlines()
    assert lines[0].split() == ["block", "dim", "lambda_1", "lambda_2", "lambda_3",
                                "converged", "matvecs"]
    assert "0 (Linear)" in lines[2] and "2 (Linear)" in lines[3]
    assert lines[2].split()[-2] == "NO"
    assert f"{float(result['0'].values[0]):.6g}" in lines[2]
    good = block_spectra(H, blocks="module", k=1, tol=1e-6)
    assert str(good).splitlines()[2].split()[-2] == "yes"


def test_bad_arguments():
    model, (x, y) = tiny_mlp(), mlp_data()
    H = HessianOperator(model, CE, (x, y))
    with pytest.raises(ValueError, match=r"Invalid blocks: 'layer' \(allowed: 'module', "):
        block_spectra(H, blocks="layer")
    with pytest.raises(ValueError, match=r"Invalid blocks: int"):
        block_spectra(H, blocks=3)
    with pytest.raises(ValueError, match=r"Invalid k: 0"):
        block_spectra(H, k=0)
    with pytest.raises(ValueError, match=r"Invalid tol: 2"):
        block_spectra(H, tol=2)
    with pytest.raises(ValueError, match=r"Invalid H: MatrixOperator"):
        block_spectra(MatrixOperator(torch.eye(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"Invalid blocks: 1 entries, none with a parameter"):
        block_spectra(H, blocks={"empty": []})
    with pytest.raises(KeyError, match="no block named 'x'"):
        block_spectra(H, k=1, tol=1e-4)["x"]


def test_func_backend_over_some_parameters_holds_the_others_as_constants():
    # the restricted products use the operator's own backend; forward-over-reverse over a
    # subset of the parameters used to return a product carrying a graph through the others
    model, (x, y) = tiny_mlp(), mlp_data()
    params = list(model[2].parameters())
    H = HessianOperator(model, CE, (x, y), params=params, backend="func")
    dense = H @ torch.eye(H.dim, dtype=torch.float64)
    assert not dense.requires_grad
    torch.testing.assert_close(dense, dense_hessian(model, CE, x, y, params=params),
                               rtol=1e-10, atol=1e-12)
