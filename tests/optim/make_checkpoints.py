"""Writes tests/optim/data/checkpoints_v0.pt with the samkit of the commit before the composable
family (run once, with that version first on PYTHONPATH): per preset, the model and optimizer
state after 3 steps and the weights after 3 more, so test_checkpoints.py can check that today's
code loads the file and continues the same run."""

import copy
import sys
from pathlib import Path

import torch
from torch import nn

import samkit

SETTINGS = {
    "sam": {}, "asam": {}, "usam": {}, "fishersam": {}, "friendlysam": dict(lmbda=0.5),
    "gsam": dict(rho_max=0.2, rho_min=0.02, alpha=0.3), "looksam": dict(k=2, rho=0.2),
    "esam": dict(beta=0.5, rho=0.2, seed=1), "aesam": dict(c=0.0, delta=0.7, rho=0.2),
    "rst": dict(p=0.5, seed=2, rho=0.2),
}  # fmt: skip


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g)


def steps(m, opt, n):
    x, y = data()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)


def build(name, m):
    return samkit.create_optimizer(name, m, lr=0.1, momentum=0.9, weight_decay=1e-3,
                                   **SETTINGS[name])


if __name__ == "__main__":
    out = {}
    for name in SETTINGS:
        m = model()
        opt = build(name, m)
        steps(m, opt, 3)
        saved = {"model": {k: v.clone() for k, v in m.state_dict().items()},
                 "optimizer": copy.deepcopy(opt.state_dict())}
        steps(m, opt, 3)
        saved["after"] = [p.detach().clone() for p in m.parameters()]
        out[name] = saved
    out["samkit_version"] = getattr(samkit, "__version__", "?")
    torch.save(out, Path(sys.argv[1]))
