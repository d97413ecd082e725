"""Tiny float64 models, data and a dense Hessian reference that shares no code with samkit."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def tiny_cnn(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 2, 3)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(2))
    layers += [nn.Softplus(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)]
    return nn.Sequential(*layers).double()


def mlp_data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def cnn_data(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model, loss_fn, x, y, params=None) -> torch.Tensor:
    """``torch.func.hessian`` of the mean loss over (x, y) in the flat parameters.

    It runs on a copy whose BatchNorm layers stop tracking running statistics, so in training
    mode they normalize with the batch statistics without writing buffers (which torch.func
    forbids); in eval mode they still use the running statistics. With a BatchNorm layer in
    training mode the reference is ``torch.autograd.functional.hessian`` (a loop of double
    backward passes): in torch 2.13 the vmap of ``torch.func.hessian`` (and of jacrev(jacrev))
    returns a wrong, asymmetric Hessian through batch statistics.
    """
    ids = None if params is None else {id(p) for p in params}
    batch_stats = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    wanted = [n for n, p in model.named_parameters() if ids is None or id(p) in ids]
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    named = [(n, p) for n, p in model.named_parameters() if n in wanted]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(w):
        pieces = [t.view(s) for t, s in zip(torch.split(w, sizes), shapes, strict=True)]
        return loss_fn(functional_call(model, dict(zip(names, pieces, strict=True)), (x,)), y)

    if batch_stats:
        return torch.autograd.functional.hessian(loss_of, flat)
    return torch.func.hessian(loss_of)(flat)


def chunks(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def spectrum_matrix(eigenvalues, seed: int = 0) -> torch.Tensor:
    """A dense symmetric float64 matrix with the given eigenvalues and a random eigenbasis."""
    ev = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=torch.float64))
    return (q * ev) @ q.T
