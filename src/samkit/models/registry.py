"""``create_model`` and the model zoo's names."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from samkit.models.cnn import SmallCNN
from samkit.models.common import MAX_PARAMETERS
from samkit.models.mlp import MLP
from samkit.models.resnet import CifarResNet
from samkit.models.transformer import CharTransformer
from samkit.models.vgg import VGG
from samkit.models.wrn import WideResNet

# name -> (class, fixed keyword arguments the name implies)
_MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "cnn": (SmallCNN, {}),
    **{f"resnet{d}": (CifarResNet, {"depth": d}) for d in (20, 32, 44, 56, 110)},
    **{f"wrn{d}-{k}": (WideResNet, {"depth": d, "widen_factor": k})
       for d, k in ((16, 4), (16, 8), (28, 2), (28, 10), (40, 4))},
    **{f"vgg{d}": (VGG, {"depth": d}) for d in (11, 13, 16, 19)},
    "transformer": (CharTransformer, {}),
}


def register_model(name: str, builder: Callable[..., nn.Module], **fixed: Any) -> None:
    """Add a model: ``builder(input_shape, num_classes, **fixed, **kwargs)`` builds it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid model name: {name!r}")
    _MODELS[name.lower()] = (builder, dict(fixed))


def list_models() -> list[str]:
    """The names :func:`create_model` accepts (any ``resnet{6n+2}`` and ``wrn{6n+4}-{k}`` work
    too)."""
    return sorted(_MODELS)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    if not isinstance(name, str):
        raise ValueError(f"Invalid model name: {name!r}; choose one of: {', '.join(list_models())}")
    key = name.strip().lower().replace("_", "-")
    key = re.sub(r"^(resnet|vgg)-(\d+)$", r"\1\2", key)
    key = re.sub(r"^wrn-?(\d+)-(\d+)$", r"wrn\1-\2", key)
    if key in _MODELS:
        return _MODELS[key]
    m = re.fullmatch(r"resnet(\d+)", key)
    if m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0:
        return CifarResNet, {"depth": int(m.group(1))}
    m = re.fullmatch(r"wrn(\d+)-(\d+)", key)
    if m and int(m.group(1)) >= 10 and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(2)) >= 1:
        return WideResNet, {"depth": int(m.group(1)), "widen_factor": int(m.group(2))}
    raise ValueError(
        f"Unknown model {name!r}; choose one of: {', '.join(list_models())} "
        "(also any CIFAR ResNet resnet{6n+2} and Wide-ResNet wrn{6n+4}-{k})"
    )


def create_model(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` and ``num_classes`` outputs.

    Names: ``mlp`` (``depth``, ``width``, ``activation``, ``dropout``, ``bias``), ``cnn``
    (``width``, ``activation``, ``dropout``), ``resnet20/32/44/56/110`` (``shortcut``,
    ``dropout``), ``wrn28-10``, ``wrn16-8``, ``wrn28-2``, ... (``dropout``), ``vgg11/13/16/19``
    (``dropout``) and ``transformer`` (``n_layer``, ``n_head``, ``n_embd``, ``dropout``,
    ``bias``, ``tie_weights``; ``input_shape=(seq_len,)``, ``num_classes`` = vocabulary size,
    output ``B×T×V``). Image models take ``input_shape=(C, H, W)``.

    Build on the meta device to count parameters without allocating memory:
    ``with torch.device("meta"): create_model("wrn28-10", (3, 32, 32), 10)``.

    Raises:
        ValueError: an unknown name, a bad shape or class count, or a keyword argument the
            model does not take (the message lists the ones it does).
    """
    builder, fixed = _lookup(name)
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"Invalid input_shape: {input_shape!r} (a tuple of positive ints)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Invalid num_classes: {num_classes!r} (a positive integer)")
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p not in ("self", "input_shape", "num_classes")
               and p not in fixed and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if key in fixed:
            raise ValueError(f"Model {name!r} fixes {key}={fixed[key]!r}; it cannot be passed")
        if key not in allowed and not takes_any:
            raise ValueError(
                f"Model {name!r} takes no argument {key!r}; its arguments: {', '.join(allowed)}"
            )
        if key in params and isinstance(params[key].default, bool) and not isinstance(value, bool):
            text = repr(value) if len(repr(value)) <= 200 else repr(value)[:197] + "..."
            raise ValueError(f"Invalid {key} for model {name!r}: {text} (allowed: true, false)")
    if _SIZE_KEYS & set(kwargs) or ("widen_factor" in fixed and fixed not in [
        f for _, f in _MODELS.values()
    ]):
        _check_size(name, builder, shape, num_classes, fixed, kwargs)
    return builder(shape, num_classes, **fixed, **kwargs)


# The arguments that set a model's size (a ResNet's size is bounded by its depth limit alone).
_SIZE_KEYS = {"depth", "width", "n_layer", "n_head", "n_embd", "widen_factor"}


def _check_size(name: str, builder: Callable[..., nn.Module], shape: tuple[int, ...],
                num_classes: int, fixed: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Refuse a model of more than :data:`~samkit.models.common.MAX_PARAMETERS` parameters before
    any memory is allocated: it is built first on the meta device (no memory) and counted. Only
    for a model with size arguments or a Wide-ResNet width in its name; the named ones are small."""
    if torch.get_default_device().type == "meta":
        return  # the caller builds on the meta device itself
    with torch.device("meta"):
        count = count_parameters(builder(shape, num_classes, **fixed, **kwargs), False)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"Invalid model {name!r} with {kwargs or fixed}: {count:,} parameters (allowed: at "
            f"most {MAX_PARAMETERS:,}, {4 * MAX_PARAMETERS / 2**30:.0f} GiB of float32 weights; "
            "samkit's limit on model sizes)")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (shared ones counted once; works on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
