"""The Lightning and Hugging Face edge callbacks (issue 20 #7): an explicit ``every`` is
measured at every k-th step of a short run, and every measurement logs λ₁, the edge, the ratio
and ‖g‖ (NaN, with one warning, where no closed-form edge applies)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import samkit

KEYS = ("edge/lambda1", "edge/edge", "edge/ratio", "edge/grad_norm")


# --------------------------------------------------------------------------- Lightning


# one xdist worker imports Lightning and transformers (make fast: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("integrations")


def _lightning():
    return pytest.importorskip("lightning", reason="lightning is not installed")


def _lightning_run(tmp_path, optimizer, steps, every, **kwargs):
    L = _lightning()
    from samkit.integrations.lightning import EdgeTrackerCallback

    class Recorder(L.pytorch.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.logged = []

        name = property(lambda self: "recorder")
        version = property(lambda self: 0)

        def log_hyperparams(self, *args, **kw):
            pass

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return optimizer(self.parameters())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = EdgeTrackerCallback((x, y), nn.functional.cross_entropy, every=every,
                                   model=lambda m: m.net, **kwargs)
    logger = Recorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback], log_every_n_steps=1)
    trainer.fit(Module(), loader)
    return callback, [(s, m) for s, m in logger.logged if "edge/lambda1" in m]


def test_lightning_every_10_in_a_40_step_run(tmp_path):
    """The issue's Lightning run (40 steps, every=10) had 1 row: now 0, 10, 20, 30 and the
    final weights, each logged with λ₁, the edge, the ratio and ‖g‖."""
    def sam(params):
        return samkit.SAM(torch.optim.SGD(params, lr=0.05), rho=0.05)

    callback, logged = _lightning_run(tmp_path, sam, steps=40, every=10)
    rows = callback.tracker.rows
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]
    assert [s for s, _ in logged] == [0, 10, 20, 30, 40]
    for (_, m), r in zip(logged, rows, strict=True):
        assert set(KEYS) <= set(m)
        assert m["edge/edge"] == pytest.approx(r["edge"])
        assert m["edge/ratio"] == pytest.approx(r["lambda1"] / r["edge"])


def test_lightning_logs_nan_edge_with_a_warning_where_none_applies(tmp_path):
    """SAM over Adam has no closed-form edge: edge/edge and edge/ratio are logged as NaN (not
    left out), and one warning says why."""
    def sam_adam(params):
        return samkit.SAM(torch.optim.Adam(params, lr=1e-2), rho=0.05)

    with pytest.warns(UserWarning, match=r"EdgeTrackerCallback: .*edge/edge and edge/ratio are "
                                         "logged as NaN") as caught:
        callback, logged = _lightning_run(tmp_path, sam_adam, steps=4, every=2)
    assert sum("EdgeTrackerCallback" in str(w.message) for w in caught) == 1
    assert [s for s, _ in logged] == [0, 2, 4]
    for _, m in logged:
        assert set(KEYS) <= set(m)
        assert math.isnan(m["edge/edge"]) and math.isnan(m["edge/ratio"])
        assert math.isfinite(m["edge/lambda1"]) and math.isfinite(m["edge/grad_norm"])


def test_lightning_refuses_an_empty_probe():
    _lightning()
    from samkit.integrations.lightning import EdgeTrackerCallback

    with pytest.raises(ValueError, match="Invalid probe: no examples"):
        EdgeTrackerCallback((torch.zeros(0, 4), torch.zeros(0)), nn.functional.mse_loss)


# --------------------------------------------------------------------------- Hugging Face


def test_huggingface_every_5_in_a_15_step_run_under_adamw(tmp_path, monkeypatch):
    """The issue's Hugging Face run (25 steps, every 5) had 1 row; SAMTrainer's default AdamW
    under SAM logged no edge and no ratio. Now a row every 5 steps and at the end, each with the
    four keys (NaN edge and ratio: SAM over AdamW has no closed-form edge, said in a warning).
    15 steps check the same: the start, rows inside the run, and a last step that is also a
    multiple of 5 (one row there, not two); every row costs three Lanczos runs on GPT-2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from samkit.integrations.huggingface import EdgeTrackerCallback, SAMTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 8), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=15,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0)
    edge = EdgeTrackerCallback(data[:4], every=5, max_iter=50)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, sam="sam",
                         sam_kwargs={"rho": 0.05}, callbacks=[edge])
    with pytest.warns(UserWarning, match="logged as NaN"):
        trainer.train()
    assert [r["step"] for r in edge.tracker.rows] == [0, 5, 10, 15]
    logged = [h for h in trainer.state.log_history if "edge/lambda1" in h]
    assert len(logged) == 4
    for h in logged:
        assert set(KEYS) <= set(h)
        assert math.isnan(h["edge/edge"]) and math.isnan(h["edge/ratio"])
