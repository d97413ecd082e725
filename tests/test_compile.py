"""torch.compile: a compiled model trains with SAM and ASAM like the eager one (CPU, inductor)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

import samkit

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gcc") is None and shutil.which("cc") is None,
        reason="torch.compile's inductor backend needs a C++ compiler on CPU",
    ),
    pytest.mark.slow,  # compiles with inductor: tens of seconds
]


# Under ATEN_CPU_CAPABILITY=default (CI reruns part of the suite that way) torch 2.13's inductor
# writes C++ that uses at::vec, which that build's headers do not declare: g++ fails
# ("'at::vec' has not been declared"), a torch limit, not samkit's. There the model is compiled
# by Dynamo and AOTAutograd without inductor's codegen (samkit's side, the graph break around
# the optimizer's protocol, is the same); every other run uses inductor.
BACKEND = "aot_eager" if os.environ.get("ATEN_CPU_CAPABILITY") == "default" else "inductor"


@pytest.fixture(autouse=True)
def _inductor_cache_per_capability(monkeypatch):
    """Inductor's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: kernels compiled under one
    capability and loaded under another gave NaN losses here (avx2 after native); one cache
    folder per capability."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR",
                       os.path.join(tempfile.gettempdir(), f"samkit-inductor-{capability}"))


def _setup(kind, compiled):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = samkit.SAM(base, rho=0.05) if kind == "sam" else samkit.ASAM(base, rho=0.5)
    model = torch.compile(net, dynamic=False, backend=BACKEND) if compiled else net
    return net, model, opt


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_compiled_model_matches_eager(kind):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net, model, opt = _setup(kind, compiled)
        losses = []
        for _ in range(4):

            def closure(model=model, opt=opt, net=net):
                opt.zero_grad()
                # the perturbed pass leaves BatchNorm's running statistics alone
                ctx = samkit.disable_running_stats(net) if opt.is_perturbed else _Null()
                with ctx:
                    loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
        results.append((losses, net.state_dict()))
    (eager_losses, eager), (comp_losses, comp) = results
    assert comp_losses[-1] < comp_losses[0]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for k in eager:
        torch.testing.assert_close(comp[k].float(), eager[k].float(), rtol=1e-4, atol=1e-5)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
