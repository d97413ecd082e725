"""Hugging Face: SAMTrainer on a tiny GPT-2 built from a local config (no hub downloads)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import samkit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers is imported when a test first needs it, not at collection, and one xdist worker
# runs these tests (make fast: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("integrations")


@functools.cache
def _transformers():
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    return pytest.importorskip("transformers", reason="transformers is not installed")


def SAMTrainer(*args, **kwargs):  # noqa: N802 (the class, imported on first use)
    from samkit.integrations.huggingface import SAMTrainer

    return SAMTrainer(*args, **kwargs)


def _model():
    torch.manual_seed(0)
    config = _transformers().GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return _transformers().GPT2LMHeadModel(config)


def _dataset(n=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    return _transformers().TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_sam_trainer_equals_samkit_steps(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = {"rho": 0.05} if kind == "sam" else {"rho": 0.5, "eta": 0.01}
    model = _model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    data = _dataset()
    trainer = SAMTrainer(model=model, args=_args(tmp_path), train_dataset=data, sam=kind,
                         sam_kwargs=kwargs)
    trainer.train()
    assert len(calls) == 6  # two passes per step
    assert isinstance(trainer.sam_optimizer, samkit.SAM if kind == "sam" else samkit.ASAM)

    ref = _model()
    opt_cls = samkit.SAM if kind == "sam" else samkit.ASAM
    opt = opt_cls(torch.optim.SGD(ref.parameters(), lr=0.1), **kwargs)
    ids = torch.stack([d["input_ids"] for d in data])
    for _ in range(3):

        def closure():
            opt.zero_grad()
            # the Trainer divides the summed token loss by the number of labels in the batch
            loss = ref(input_ids=ids, labels=ids, num_items_in_batch=ids.numel()).loss
            loss.backward()
            return loss

        opt.step(closure)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].detach(), p.detach(), rtol=1e-4, atol=1e-5)


def test_sam_trainer_gradient_accumulation_and_bad_arguments(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SAMTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=4,
                                                 gradient_accumulation_steps=2, max_steps=2),
                         train_dataset=_dataset(), sam="sam")
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="Invalid sam: 'gsam'"):
        SAMTrainer(model=_model(), args=_args(tmp_path), sam="gsam")
    looksam = SAMTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(),
                         sam=lambda base: samkit.LookSAM(base))
    with pytest.raises(ValueError, match="rewrites the descent step"):
        looksam.create_optimizer()


# --------------------------------------------------------------------------- EdgeTrackerCallback


@functools.cache
def _seen_class():
    class _Seen(_transformers().TrainerCallback):
        """What the reporting integrations see: every on_log's logs."""

        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    return _Seen


def _top_by_scipy(model, batch):
    """λ₁ of the Hessian of model(**batch).loss by scipy's eigsh on autograd Hessian-vector
    products (independent of samkit's operator and Lanczos)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v):
        v = torch.as_tensor(np.asarray(v).reshape(-1), dtype=flat.dtype)
        out = torch.autograd.grad(flat @ v, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if o is None else o).reshape(-1)
                          for p, o in zip(params, out, strict=True)]).double().numpy()

    n = flat.numel()
    op = LinearOperator((n, n), matvec=hvp, dtype=np.float64)
    return float(eigsh(op, k=1, which="LA", tol=1e-6, v0=np.ones(n))[0][0])


def _eager_model():
    # Hessian-vector products differentiate twice: eager attention (PyTorch's fused CPU
    # attention has no double backward)
    torch.manual_seed(0)
    config = _transformers().GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    return _transformers().GPT2LMHeadModel(config)


def test_edge_tracker_callback_under_sam_trainer(tmp_path, monkeypatch):
    from samkit.integrations.huggingface import EdgeTrackerCallback
    from samkit.train.edge import edge_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _dataset()
    probe = data[:4]
    seen = _seen_class()()
    edge = EdgeTrackerCallback(probe, every=2, budget=None, tol=1e-5, max_iter=200)
    model = _eager_model()
    batch = {k: torch.stack([d[k] for d in probe]) for k in probe[0]}
    top0 = _top_by_scipy(_eager_model(), batch)
    trainer = SAMTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=data,
                         sam="sam", sam_kwargs={"rho": 0.05}, callbacks=[seen, edge])
    assert edge.trainer is trainer  # attached by SAMTrainer
    trainer.train()
    rows = edge.tracker.rows
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["lambda1"] == pytest.approx(top0, rel=1e-3)
    for r in rows:
        assert r["edge_kind"] == "sam+gd"
        assert r["edge"] == pytest.approx(edge_for(trainer.sam_optimizer, r["grad_norm"]))
        assert r["ratio"] == pytest.approx(r["lambda1"] / r["edge"])
    logged = [log for log in seen.logs if "edge/lambda1" in log]
    assert [log["edge/lambda1"] for log in logged] == pytest.approx([r["lambda1"] for r in rows])
    assert [log["edge/ratio"] for log in logged] == pytest.approx([r["ratio"] for r in rows])
    assert sum("edge/edge" in h for h in trainer.state.log_history) == 3


def test_edge_tracker_callback_plain_trainer_and_bad_probe(tmp_path):
    from samkit.integrations.huggingface import EdgeTrackerCallback

    edge = EdgeTrackerCallback(_dataset()[:4], every=3, budget=None)
    trainer = _transformers().Trainer(model=_eager_model(), args=_args(tmp_path, max_steps=3),
                                   train_dataset=_dataset(), callbacks=[edge])
    trainer.train()  # not attached: the rows go to log_history
    history = [h for h in trainer.state.log_history if "edge/lambda1" in h]
    assert [h["step"] for h in history] == [0, 3]
    assert all(r["edge_kind"] == "gd" and r["edge"] == pytest.approx(2 / 0.1)
               for r in edge.tracker.rows)
    with pytest.raises(ValueError, match="Invalid probe"):
        EdgeTrackerCallback([1, 2, 3])
