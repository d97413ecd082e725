"""davda54/sam's calling form in one place: ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)``.

samkit's optimizers wrap an optimizer *instance* (``samkit.SAM(torch.optim.SGD(params, lr=0.1),
rho=0.05)``); davda54/sam and pytorch_optimizer pass the parameters and the base optimizer's
*class* instead, with the base optimizer's keyword arguments mixed in. :func:`split_call` turns
the second form into the first; both give the same optimizer, step for step.

* :func:`split_call` is the adapter: the keys the wrapper declares as its own stay, the others
  build ``base_class(params, **others)``.
* :func:`accepts_base_class` decorates a constructor or a factory with it (its own keys: the
  ones given, or its signature's names).

This module imports nothing else from samkit's optimizers, so the optimizer base can use it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any

from torch.optim import Optimizer

from samkit.optim._validation import check_keyword_types

OwnKeys = Collection[str] | Callable[[tuple, dict[str, Any]], Collection[str]]


def is_davda54_call(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Is ``fn(*args, **kwargs)`` (``args`` without ``self``) davda54's form: parameters first,
    then a ``torch.optim.Optimizer`` class (positionally or as ``base_optimizer_class``)?"""
    first = args[0] if args else kwargs.get("base_optimizer")
    if first is None or isinstance(first, Optimizer):
        return False
    return "base_optimizer_class" in kwargs or (len(args) > 1 and isinstance(args[1], type))


def split_call(
    args: tuple, kwargs: dict[str, Any], own: OwnKeys
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a call in davda54's form rewritten to samkit's form.

    Args:
        args: the positional arguments without ``self``: ``(params, base_class, *tail)``.
        kwargs: the keyword arguments (the wrapper's and the base optimizer's, mixed).
        own: the wrapper's own keyword names, or ``own(tail, kwargs) -> names`` when they depend
            on the call (an ascent chosen by name brings its keys).

    Returns:
        ``((base_optimizer, *tail), own_kwargs)``; a call that is not in davda54's form is
        returned unchanged (the wrapper then reports a bad ``base_optimizer`` itself).

    Raises:
        ValueError: ``base_class`` is not a ``torch.optim.Optimizer`` subclass, ``adaptive=`` is
            given (samkit has a class for adaptive SAM), or a base optimizer argument is bad.
    """
    kwargs = dict(kwargs)
    if not args and "base_optimizer" in kwargs:
        args = (kwargs.pop("base_optimizer"),)
    if not is_davda54_call(args, kwargs):
        return args, kwargs
    params, tail = args[0], args[1:]
    base_class = kwargs.pop("base_optimizer_class", None)
    if base_class is None:
        base_class, tail = tail[0], tail[1:]
    if not (isinstance(base_class, type) and issubclass(base_class, Optimizer)):
        raise ValueError(
            f"Invalid base_optimizer_class: {base_class!r} (allowed: a torch.optim.Optimizer "
            "subclass such as torch.optim.SGD)"
        )
    names = set(own(tail, kwargs) if callable(own) else own)
    if "adaptive" in kwargs and "adaptive" not in names:
        raise ValueError(
            "Invalid argument adaptive: samkit has a class for adaptive SAM; use "
            "samkit.ASAM(params, torch.optim.SGD, rho=0.5, ...) instead of adaptive=True"
        )
    mine = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    check_keyword_types(base_class.__name__, base_class, kwargs)  # nesterov="maybe"
    return (base_class(params, **kwargs), *tail), mine


def accepts_base_class(fn: Callable, own: OwnKeys | None = None) -> Callable:
    """Let ``fn(base_optimizer, ...)`` (an ``__init__`` or a factory) also be called in davda54's
    form, ``fn(params, torch.optim.SGD, rho=0.05, lr=0.1, ...)`` (see :func:`split_call`).

    ``own``: the keyword names that stay with ``fn`` (default: ``fn``'s parameter names after
    ``self`` and the base optimizer).
    """
    names = list(inspect.signature(fn).parameters)
    is_method = bool(names) and names[0] == "self"
    if own is None:
        own = set(names[2 if is_method else 1 :])

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        head, rest = (args[:1], args[1:]) if is_method else ((), args)
        rest, kwargs = split_call(rest, kwargs, own)
        return fn(*head, *rest, **kwargs)

    return wrapper
