"""The model zoo: output shapes, published parameter counts, arguments and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samkit.models import ACTIVATIONS, CifarResNet, count_parameters, create_model, list_models

CIFAR = (3, 32, 32)


def meta_count(name, shape=CIFAR, classes=10, **kw):
    with torch.device("meta"):
        return count_parameters(create_model(name, shape, classes, **kw))


@pytest.mark.parametrize(
    ("name", "expected", "published"),
    [
        ("resnet20", 269_722, 0.27e6),
        ("resnet32", 464_154, 0.46e6),
        ("resnet56", 853_018, 0.85e6),
        ("resnet110", 1_727_962, 1.7e6),
        ("wrn28-10", 36_479_194, 36.5e6),
        ("wrn16-8", 10_961_370, 11.0e6),
        ("wrn28-2", 1_467_610, 1.5e6),
        ("vgg16", 14_724_042, 14.7e6),
    ],
)
def test_parameter_counts_match_the_papers(name, expected, published):
    n = meta_count(name)  # the meta device: no memory, no time, even for WRN-28-10
    assert n == expected
    assert abs(n - published) / published < 0.03


def test_small_cnn_matches_cohen_et_al():
    # conv(3→32) 896 + conv(32→32) 9,248 + linear(2048→10) 20,490
    model = create_model("cnn", CIFAR, 10)
    assert count_parameters(model) == 896 + 9248 + 20490
    assert [type(m).__name__ for m in model.net] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (1, 28, 28)),
        ("mlp", (40,)),
        ("cnn", (1, 28, 28)),
        ("cnn", (1, 8, 8)),
        ("resnet20", (3, 16, 16)),
        ("resnet20", (1, 28, 28)),
        ("resnet110", (3, 8, 8)),
        ("wrn16-2", (3, 16, 16)),
        ("vgg11", (1, 28, 28)),
        ("vgg19", (3, 8, 8)),
    ],
)
def test_output_shapes_and_gradients(name, shape):
    """Small inputs keep this fast on 2 CPU cores (the counts above cover the full sizes)."""
    model = create_model(name, shape, 7)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_wrn28_10_shape_on_meta():
    with torch.device("meta"):
        model = create_model("wrn28-10", CIFAR, 100)
        assert model(torch.empty(2, *CIFAR)).shape == (2, 100)


def test_transformer_language_model():
    model = create_model("transformer", (32,), 65, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 65, (4, 32))
    logits = model(idx)
    assert logits.shape == (4, 32, 65)
    assert model(idx[:, :10]).shape == (4, 10, 65)  # shorter contexts are fine
    assert model.head.weight is model.tok.weight  # tied
    # Causal: changing a later token changes no earlier logit.
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 65
    model.eval()
    torch.testing.assert_close(model(changed)[:, :20], model(idx)[:, :20])
    assert not torch.allclose(model(changed)[:, 20:], model(idx)[:, 20:])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(65.0)).item()) < 0.5  # ~uniform at init
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_mlp_depth_width_activation_dropout():
    model = create_model("mlp", (10,), 3, depth=3, width=16, activation="tanh", dropout=0.2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 16), (16, 16),
                                                                   (16, 3)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules()) == 3
    linear = create_model("mlp", (4,), 2, depth=0)
    assert count_parameters(linear) == 4 * 2 + 2
    for act in ACTIVATIONS:
        create_model("mlp", (4,), 2, activation=act)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "wrn16-2", "vgg11", "transformer"])
def test_every_model_takes_dropout(name):
    shape = (8,) if name == "transformer" else CIFAR
    with torch.device("meta"):
        model = create_model(name, shape, 10, dropout=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())


def test_dropout_is_off_in_eval_mode():
    model = create_model("mlp", (10,), 3, dropout=0.5).eval()
    x = torch.randn(5, 10)
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize(
    ("name", "shape", "kw"),
    [
        ("resnet8", (3, 8, 8), {}),
        ("wrn10-1", (3, 8, 8), {}),
        ("vgg11", (3, 4, 4), {}),
        ("cnn", (1, 8, 8), {}),
        ("transformer", (6,), {"n_layer": 1, "n_embd": 16}),
    ],
)
def test_hessian_vector_products_work(name, shape, kw):
    """The curvature code differentiates twice; every layer type must allow it (the
    transformer's written-out attention included: the fused CPU kernel has no double
    backward)."""
    torch.manual_seed(0)
    model = create_model(name, shape, 4, **kw)
    if name == "transformer":
        x = torch.randint(0, 4, (3, *shape))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    else:
        x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
        loss = nn.functional.cross_entropy(model(x), y)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, v)
    assert all(torch.isfinite(h).all() for h in hv)
    assert sum(float((h * u).sum()) for h, u in zip(hv, v, strict=True)) != 0


def test_fused_attention_agrees_with_written_out():
    torch.manual_seed(0)
    model = create_model("transformer", (12,), 20, n_layer=2, n_embd=32).eval()
    fused = create_model("transformer", (12,), 20, n_layer=2, n_embd=32, fused_attention=True)
    fused.load_state_dict(model.state_dict())
    idx = torch.randint(0, 20, (2, 12))
    torch.testing.assert_close(fused.eval()(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_names_and_aliases():
    names = list_models()
    for expected in ("mlp", "cnn", "resnet20", "resnet32", "resnet56", "resnet110", "wrn28-10",
                     "wrn16-8", "wrn28-2", "vgg11", "vgg16", "vgg19", "transformer"):
        assert expected in names
    assert meta_count("WRN-28-10") == meta_count("wrn28-10")
    assert meta_count("resnet-20") == meta_count("resnet20")
    assert meta_count("resnet44") == 658_586  # any 6n+2 depth
    assert meta_count("wrn22-4") > 0  # any 6n+4 depth


def test_errors_name_the_bad_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet18'.*resnet20.*wrn28-10.*6n\+2"):
        create_model("resnet18", CIFAR, 10)
    with pytest.raises(ValueError, match=r"no argument 'widht'.*depth, width, activation"):
        create_model("mlp", (4,), 2, widht=3)
    with pytest.raises(ValueError, match=r"Invalid activation: 'rellu'.*relu"):
        create_model("mlp", (4,), 2, activation="rellu")
    with pytest.raises(ValueError, match="fixes depth=20"):
        create_model("resnet20", CIFAR, 10, depth=32)
    with pytest.raises(ValueError, match=r"needs image inputs.*\(40,\)"):
        create_model("resnet20", (40,), 10)
    with pytest.raises(ValueError, match="Invalid num_classes: 0"):
        create_model("mlp", (4,), 0)
    with pytest.raises(ValueError, match="Invalid input_shape"):
        create_model("mlp", (0, 3), 2)
    with pytest.raises(ValueError, match="Invalid dropout: 1.5"):
        create_model("mlp", (4,), 2, dropout=1.5)
    with pytest.raises(ValueError, match="Invalid ResNet depth: 21"):
        CifarResNet(CIFAR, 10, depth=21)
    with pytest.raises(ValueError, match="Invalid shortcut: 'C'"):
        create_model("resnet20", CIFAR, 10, shortcut="C")
    with pytest.raises(ValueError, match="divisible by n_head"):
        create_model("transformer", (8,), 10, n_embd=30, n_head=4)
