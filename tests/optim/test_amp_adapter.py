"""samkit.optim.amp is the only module that touches GradScaler internals; this fails loudly when
a torch release changes them (issue 21, finding 5)."""

import pathlib

import pytest
import torch

import samkit
from samkit.optim import amp

SRC = pathlib.Path(samkit.__file__).parent


def test_the_installed_torch_has_the_grad_scaler_internals_samkit_uses():
    amp.check_grad_scaler_internals()  # raises RuntimeError naming what changed


def test_a_changed_internal_is_reported_by_name(monkeypatch):
    original = torch.amp.GradScaler.__init__

    def without_records(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._per_optimizer_states

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", without_records)
    with pytest.raises(RuntimeError, match="_per_optimizer_states.*Update samkit/optim/amp.py"):
        amp.check_grad_scaler_internals()


def test_no_module_but_the_adapter_touches_grad_scaler_internals():
    private = ("_per_optimizer_states", "OptState", "scaler._scale", "_found_inf_per_device")
    offenders = [
        f"{path.relative_to(SRC)}: {name}"
        for path in SRC.rglob("*.py")
        if path.name != "amp.py" or path.parent.name != "optim"
        for name in private
        if name in path.read_text()
    ]
    assert offenders == []


def test_unscale_once_then_step_skips_on_a_non_finite_first_pass():
    w = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((w * w).sum()).backward()
    amp.unscale_once(scaler, object(), base)
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))
    amp.unscale_once(scaler, object(), base)  # once: the second call is a no-op
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))
    assert not amp.found_inf(scaler, base)
    amp.record_non_finite(scaler, base, torch.tensor(False))
    assert amp.found_inf(scaler, base)
    scaler.step(base)
    assert torch.equal(w.detach(), torch.ones(3))  # skipped
    assert amp.inv_scale(scaler).item() == 0.25
