"""Empirical and Monte-Carlo Fisher operators against dense float64 references built from
per-example gradients (torch.func), and the Fisher = GGN identity for cross-entropy and
square loss."""

from __future__ import annotations

import pytest
import torch
from curvature_helpers import chunks, cnn_data, mlp_data, tiny_cnn, tiny_mlp
from torch import nn
from torch.func import functional_call, grad, vmap

from samkit.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    MCFisherOperator,
    block_spectra,
    top_eigenvalues,
)

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


def per_example_grads(model, loss_fn, x, y):
    """``(N, d)``: row i is the gradient of loss_fn on example i alone (flat parameters)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(ps, xi, yi):
        return loss_fn(functional_call(model, ps, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


def second_moment(g):
    return g.T @ g / g.shape[0]


def dense(op):
    return op @ torch.eye(op.shape[0], dtype=op.dtype)


def regression_data(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64))


def test_empirical_fisher_is_the_second_moment_of_per_example_gradients():
    for model, (x, y), loss_fn in ((tiny_mlp(), mlp_data(), CE),
                                   (tiny_cnn(), cnn_data(), CE),
                                   (tiny_mlp(), regression_data(), MSE)):
        ref = second_moment(per_example_grads(model, loss_fn, x, y))
        F = EmpiricalFisherOperator(model.eval(), loss_fn, (x, y))
        torch.testing.assert_close(dense(F), ref, rtol=1e-10, atol=1e-13)
        # uneven batches: the mean over all N examples, not the mean of batch means
        Fb = EmpiricalFisherOperator(model, loss_fn, chunks(x, y, [5, 2, x.shape[0] - 7]))
        torch.testing.assert_close(dense(Fb), ref, rtol=1e-10, atol=1e-13)
        assert F.backend_in_use == "fisher"


def test_empirical_fisher_has_rank_at_most_n():
    model, (x, y) = tiny_mlp(), mlp_data(n=6)
    ev = torch.linalg.eigvalsh(dense(EmpiricalFisherOperator(model, CE, (x, y))))
    assert ev.min() > -1e-12 and int((ev > 1e-10 * ev.max()).sum()) <= 6


def exact_categorical_fisher(model, x):
    """(1/N) sum_i sum_c p_ic g_i(c) g_i(c)^T, the expectation over the model's labels."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    out = 0
    for c in range(p.shape[1]):
        g = per_example_grads(model, CE, x, torch.full((x.shape[0],), c))
        out = out + (g * p[:, c, None]).T @ g / x.shape[0]
    return out


def test_categorical_fisher_equals_the_ggn_and_mc_fisher_approaches_it():
    model, (x, y) = tiny_mlp(), mlp_data()
    fisher = exact_categorical_fisher(model, x)
    G = dense(GGNOperator(model, CE, (x, y)))
    torch.testing.assert_close(fisher, G, rtol=1e-10, atol=1e-13)  # E over labels = GGN

    def error(samples, seed=0):
        F = MCFisherOperator(model, CE, (x, y), samples=samples, seed=seed)
        return float(torch.linalg.matrix_norm(dense(F) - G) / torch.linalg.matrix_norm(G))

    few, many = error(40), error(4000)
    assert many < 0.05
    assert many < few / 4  # 1/sqrt(S): 10x expected for 100x the samples


def test_gaussian_fisher_of_the_square_loss_approaches_the_ggn():
    model, (x, y) = tiny_mlp(), regression_data()
    G = dense(GGNOperator(model, MSE, (x, y)))
    F = MCFisherOperator(model, MSE, (x, y), samples=4000)
    assert F.likelihood == "gaussian"
    err = float(torch.linalg.matrix_norm(dense(F) - G) / torch.linalg.matrix_norm(G))
    assert err < 0.05
    # a wrong variance scales the estimate: sigma^2 = 3 instead of C/2 = 1.5 doubles it
    F2 = MCFisherOperator(model, MSE, (x, y), samples=4000, variance=3.0)
    ratio = float(torch.trace(dense(F2)) / torch.trace(G))
    assert ratio == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_mc_fisher_is_the_second_moment_at_its_sampled_labels(likelihood):
    model = tiny_mlp()
    loss_fn = CE if likelihood == "categorical" else MSE
    x, y = mlp_data() if likelihood == "categorical" else regression_data()
    data = chunks(x, y, [7, 5])
    F = MCFisherOperator(model, loss_fn, data, samples=3, seed=5)
    assert len(F.labels) == 2 and F.labels[0].shape[:2] == (7, 3) and F.samples == 3
    labels = torch.cat(F.labels)  # (N, S, ...)
    g = torch.cat([per_example_grads(model, loss_fn, x, labels[:, s]) for s in range(3)])
    torch.testing.assert_close(dense(F), second_moment(g), rtol=1e-10, atol=1e-13)
    # with one sample it is the empirical Fisher at the sampled labels
    F1 = MCFisherOperator(model, loss_fn, (x, y), samples=1, seed=5)
    E = EmpiricalFisherOperator(model, loss_fn, (x, F1.labels[0][:, 0]))
    torch.testing.assert_close(dense(F1), dense(E), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_mc_labels_depend_on_the_example_not_on_how_the_data_are_split(likelihood):
    # example j takes row j of one draw for all N: one batch, two batches and (under a process
    # group) the ranks' shards in rank order all get the same labels, so the same operator
    model = tiny_mlp()
    loss_fn = CE if likelihood == "categorical" else MSE
    x, y = mlp_data() if likelihood == "categorical" else regression_data()
    whole = MCFisherOperator(model, loss_fn, (x, y), samples=3, seed=2)
    split = MCFisherOperator(model, loss_fn, chunks(x, y, [5, 7]), samples=3, seed=2)
    assert torch.equal(torch.cat(split.labels), whole.labels[0])
    torch.testing.assert_close(dense(split), dense(whole), rtol=1e-12, atol=1e-14)
    if likelihood == "categorical":  # the draw follows softmax(f): every class of 3 turns up
        assert set(whole.labels[0].unique().tolist()) == {0, 1, 2}


def test_mc_labels_are_seeded_and_fixed_at_construction():
    model, (x, y) = tiny_mlp(), mlp_data()
    a = MCFisherOperator(model, CE, (x, y), samples=4, seed=3)
    b = MCFisherOperator(model, CE, (x, y), samples=4, seed=3)
    c = MCFisherOperator(model, CE, (x, y), samples=4, seed=4)
    assert torch.equal(a.labels[0], b.labels[0]) and not torch.equal(a.labels[0], c.labels[0])
    v = torch.randn(a.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = a @ v
    torch.testing.assert_close(a @ v, first, rtol=0, atol=0)  # one fixed matrix
    top = top_eigenvalues(a, k=2, tol=1e-10)
    ref = torch.linalg.eigvalsh(dense(a)).flip(0)[:2]
    assert top.converged
    torch.testing.assert_close(top.values, ref, rtol=1e-8, atol=1e-12)


def test_bad_arguments():
    model, (x, y) = tiny_mlp(), mlp_data()
    with pytest.raises(ValueError, match=r"Invalid likelihood: None with loss_fn function"):
        MCFisherOperator(model, lambda f, t: CE(f, t), (x, y))
    with pytest.raises(ValueError, match=r"Invalid likelihood: 'poisson' \(allowed: "):
        MCFisherOperator(model, CE, (x, y), likelihood="poisson")
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 is not the mean negative"):
        MCFisherOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y))
    with pytest.raises(ValueError, match=r"Invalid loss_fn: MSELoss\(reduction='sum'\)"):
        MCFisherOperator(model, nn.MSELoss(reduction="sum"), regression_data())
    with pytest.raises(ValueError, match=r"Invalid variance: 1.0 \(allowed: a finite number"):
        MCFisherOperator(model, CE, (x, y), variance=1.0)
    with pytest.raises(ValueError, match=r"Invalid variance: -1"):
        MCFisherOperator(model, MSE, regression_data(), variance=-1)
    with pytest.raises(ValueError, match=r"Invalid samples: 0"):
        MCFisherOperator(model, CE, (x, y), samples=0)
    seq = nn.Sequential(model, nn.Unflatten(1, (3, 1)))
    with pytest.raises(ValueError, match=r"output shape \(12, 3, 1\) for the categorical"):
        MCFisherOperator(seq, CE, (x, y))


def test_fisher_over_some_parameters_and_its_blocks():
    # params given as a one-shot generator; the Fisher over a subset is its diagonal block
    model, (x, y) = tiny_mlp(), mlp_data()
    full = MCFisherOperator(model, CE, (x, y), samples=3)
    sub = MCFisherOperator(model, CE, (x, y), samples=3, params=(p for p in model[2].parameters()))
    assert sub.dim == 18 and torch.equal(sub.labels[0], full.labels[0])
    torch.testing.assert_close(dense(sub), dense(full)[25:, 25:], rtol=1e-10, atol=1e-13)
    table = block_spectra(full, blocks="module", k=2, tol=1e-10)
    torch.testing.assert_close(table["2"].values,
                               torch.linalg.eigvalsh(dense(sub)).flip(0)[:2],
                               rtol=1e-8, atol=1e-12)
