"""Lightning automatic optimization with a samkit optimizer: the closure runs twice and the
step equals samkit's own, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import samkit

# Lightning is imported when a test first needs it, not at collection (it costs ~6 s per pytest
# worker), and one xdist worker runs these tests (make fast: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("integrations")


@functools.cache
def _lightning():
    return pytest.importorskip("lightning",
                               reason="lightning is not installed (pip install lightning)")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _optimizer(params, kind):
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return samkit.SAM(base, rho=0.1) if kind == "sam" else samkit.ASAM(base, rho=0.5)


@functools.cache
def _tiny_class():
    from samkit.integrations.lightning import is_perturbed, running_stats

    class Tiny(_lightning().LightningModule):
        def __init__(self, kind):
            super().__init__()
            self.net = _net()
            self.kind = kind
            self.passes = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.passes.append(is_perturbed(self))
            with running_stats(self):
                loss = nn.functional.cross_entropy(self.net(x), y)
            return loss

        def configure_optimizers(self):
            return _optimizer(self.parameters(), self.kind)

    return Tiny


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_automatic_optimization_runs_the_closure_twice(kind, tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = _tiny_class()(kind)
    trainer = _lightning().Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert module.passes == [False, True] * 3

    net = _net()
    opt = _optimizer(net.parameters(), kind)
    for _ in range(3):

        def closure():
            opt.zero_grad()
            with samkit.disable_running_stats(net) if opt.is_perturbed else _Null():
                loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert int(module.net[1].num_batches_tracked) == 3  # running stats once per step


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- EdgeTrackerCallback


@functools.cache
def _recorder_class():
    class _Recorder(_lightning().pytorch.loggers.Logger):
        """A logger that keeps what it is given."""

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def name(self):
            return "recorder"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

    return _Recorder


def _dense_top(net, x, y):
    from torch.autograd.functional import hessian
    from torch.func import functional_call

    for m in net.modules():  # batch statistics without updating running ones (no in-place ops)
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    names = [n for n, _ in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def loss(w):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = w[i: i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    # double backward (torch.func.hessian's forward-over-reverse through a training-mode
    # BatchNorm differs from it by 3e-5 relative on this net)
    return torch.linalg.eigvalsh(hessian(loss, flat))[-1].item()


@pytest.mark.parametrize("on_batch", [False, True])
def test_edge_tracker_callback_logs_lambda1_edge_ratio(on_batch, tmp_path):
    from samkit.integrations.lightning import EdgeTrackerCallback
    from samkit.train.edge import edge_for

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = _tiny_class()("sam")
    probe = None if on_batch else (x, y)
    callback = EdgeTrackerCallback(probe, nn.functional.cross_entropy, every=2, budget=None,
                                   model=lambda m: m.net, tol=1e-8, max_iter=200,
                                   path=tmp_path / "edge.jsonl")
    logger = _recorder_class()()
    trainer = _lightning().Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[callback],
    )
    reference = _net()  # in training mode, as the module: BatchNorm with batch statistics
    top0 = _dense_top(reference, *(x[:8], y[:8]) if on_batch else (x, y))
    trainer.fit(module, loader)
    rows = callback.tracker.rows
    steps = [0, 2] if on_batch else [0, 2, 4]  # a fixed probe is measured at the end too
    assert [r["step"] for r in rows] == steps
    assert rows[0]["lambda1"] == pytest.approx(top0, rel=1e-6)
    opt = trainer.optimizers[0]
    for r in rows:
        # the SAM-edge's ‖g‖: the step's batch (the final row has no step: the probe's)
        norm = r.get("batch_grad_norm", r["grad_norm"])
        assert on_batch == ("batch_grad_norm" not in r) or r["step"] == 4
        assert r["edge"] == pytest.approx(edge_for(opt, norm))
        assert r["ratio"] == pytest.approx(r["lambda1"] / r["edge"])
    logged = [(s, m) for s, m in logger.logged if "edge/lambda1" in m]
    assert [s for s, _ in logged] == steps
    for (_, m), r in zip(logged, rows, strict=True):
        assert m["edge/lambda1"] == pytest.approx(r["lambda1"])
        assert m["edge/edge"] == pytest.approx(r["edge"])
        assert m["edge/ratio"] == pytest.approx(r["ratio"])
    assert (tmp_path / "edge.jsonl").read_text().count("\n") == len(steps)
    assert callback.state_dict()["matvecs"] == callback.tracker.matvecs > 0


def test_edge_tracker_callback_bad_arguments():
    from samkit.integrations.lightning import EdgeTrackerCallback

    with pytest.raises(ValueError, match="Invalid loss_fn"):
        EdgeTrackerCallback((torch.zeros(2, 4), torch.zeros(2)))
    with pytest.raises(ValueError, match="Invalid every"):
        EdgeTrackerCallback(None, nn.functional.mse_loss, every=0)
    with pytest.raises(ValueError, match="Invalid model"):
        EdgeTrackerCallback(None, nn.functional.mse_loss, model=3)
