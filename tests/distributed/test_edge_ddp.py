"""The edge tracker in DDP training (2 gloo processes, float64): each rank holds its shard of the
probe set and of every batch; every measurement answers for the union, is the same on every
rank, equals one process at the same weights over all the data, and is written once (rank 0);
under a budget every rank measures the same steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from samkit.train.edge import EdgeTracker

sys.path.insert(0, str(Path(__file__).parent))
import samkit_edge_workers as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

# what a row measures (the cost keys, seconds and matvecs, are not compared)
MEASURED = ("loss", "grad_norm", "batch_grad_norm", "lambda1", "eigenvalues", "edge", "ratio",
            "lambda_eff", "eff_ratio", "align_grad", "align_sam_grad")


def _ok(results):
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


def _reference(rows, snapshots, probe, **tracker_kwargs):
    """One process over all the data, at the weights of every row, in the same order (the same
    warm starts): the rows a single-process tracker records."""
    tracker = EdgeTracker(probe, W.loss_fn, budget=None, **tracker_kwargs)
    out = []
    for row in rows:
        snap = snapshots[row["step"]] if row["step"] in snapshots else snapshots["final"]
        model = W.make_mlp()
        with torch.no_grad():
            for p, w in zip(model.parameters(), snap["weights"], strict=True):
                p.copy_(w)
        out.append(tracker.record(row["step"], model, W.make_sam(model.parameters()),
                                  batch=snap["batch"]))
    return out


def _same_rows(rows, reference, rtol=1e-9):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        assert set(row) == set(ref)
        for key in MEASURED:
            if ref.get(key) is None:
                assert row.get(key) is None, key
            else:
                torch.testing.assert_close(torch.tensor(row[key], dtype=torch.float64),
                                           torch.tensor(ref[key], dtype=torch.float64),
                                           rtol=rtol, atol=rtol * 1e-3,
                                           msg=f"{key} at {row['step']}")


@pytest.mark.slow  # spawns processes
def test_plain_ddp_loop_measures_the_union_of_the_shards(tmp_path):
    results = _ok(W.spawn(W.loop_worker, tmp_path))
    snapshots = results[0]["snapshots"]
    rows = results[0]["rows"]
    assert [r["step"] for r in rows] == [0, 2, 4]
    reference = _reference(rows, snapshots, W.data(), every=2, tol=1e-6, k=2)
    for res in results:  # every rank: one process over the union
        _same_rows(res["rows"], reference)
        assert res["rows"] == rows  # and exactly the same row on every rank
    _same_rows(results[0]["file"], reference)  # written once: one row per measurement


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("budget", [None, 0.5])
def test_trainer_ddp_logs_one_process_lambda1_once(tmp_path, budget):
    results = _ok(W.spawn(W.trainer_worker, tmp_path, 2, budget))
    rows = results[0]["rows"]
    steps = [r["step"] for r in rows]
    if budget is None:
        assert steps == [0, 2, 4, 6, 8]  # every due step (2 epochs of 4 steps), the final one
    for res in results:  # the same decisions and the same rows on every rank
        assert res["rows"] == rows
        assert res["skipped"] == results[0]["skipped"]
    train, _ = W.trainer_data()
    reference = _reference(rows, results[0]["snapshots"], (train.x, train.y), tol=1e-6)
    _same_rows(rows, reference)
    # logged once: one row per measurement in edge.jsonl and in metrics.jsonl
    _same_rows(results[0]["file"], reference)
    assert [r["step"] for r in results[0]["metrics"]] == steps


@pytest.mark.slow  # spawns processes
def test_lightning_ddp_callback_logs_one_process_lambda1_once(tmp_path):
    pytest.importorskip("lightning", reason="lightning is not installed")
    results = _ok(W.spawn(W.lightning_worker, tmp_path))
    rows = results[0]["rows"]
    assert results[0]["backend"] == "gloo"
    assert [r["step"] for r in rows] == [0, 2, 4, 6]  # due steps, the last: the final weights
    reference = _reference(rows, results[0]["snapshots"], W.data(), tol=1e-6)
    for res in results:
        _same_rows(res["rows"], reference)
        assert res["rows"] == rows
    _same_rows(results[0]["file"], reference)
    assert [s for s, _ in results[0]["logged"]] == [0, 2, 4, 6]  # once: by rank 0
    assert results[1]["logged"] == []


@pytest.mark.slow  # spawns processes
def test_huggingface_ddp_callback_logs_one_process_lambda1_once(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    import samkit
    from samkit.integrations.huggingface import _as_batch, _LossOf, _own_loss

    results = _ok(W.spawn(W.huggingface_worker, tmp_path))
    assert [res["world"] for res in results] == [2, 2]  # accelerate's multi-CPU DDP (gloo)
    assert [res["world_zero"] for res in results] == [True, False]  # the reporters: rank 0
    rows = results[0]["rows"]
    assert [r["step"] for r in rows] == [0, 2, 4]
    batch = _as_batch(W.token_data(7, seed=1))  # the union of the shards
    tracker = EdgeTracker([(batch, batch["labels"])], _own_loss, budget=None, tol=1e-6)
    reference = []
    for row in rows:
        snap = results[0]["snapshots"].get(row["step"], results[0]["snapshots"]["final"])
        model = W.gpt2()
        with torch.no_grad():
            for p, w in zip(model.parameters(), snap["weights"], strict=True):
                p.copy_(w)
        opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=results[0]["lr"]), rho=0.05)
        reference.append(tracker.record(row["step"], _LossOf(model), opt))
    # transformers computes the loss from float32 logits (logits.float()): float32 agreement
    for res in results:
        _same_rows(res["rows"], reference, rtol=1e-5)
        assert res["rows"] == rows
    _same_rows(results[0]["file"], reference, rtol=1e-5)  # written once


@pytest.mark.slow  # spawns processes
def test_trainer_ddp_resume_keeps_the_rows_of_an_uninterrupted_run(tmp_path):
    results = _ok(W.spawn(W.resume_worker, tmp_path))
    full = results[0]["full"]
    assert [r["step"] for r in full] == [0, 3, 6]  # 3 in the first epoch, 6 after the resume
    _same_rows(results[0]["full_file"], full)
    for res in results:  # every rank: the rows kept up to the checkpoint, then the same steps
        _same_rows(res["resumed"], full)
    _same_rows(results[0]["resumed_file"], full)


@pytest.mark.slow  # spawns processes
def test_torchrun_samkit_train_edge_every_logs_once(tmp_path):
    """torchrun --nproc-per-node 2 -m samkit train --edge-every: one row per measurement in
    edge.jsonl and metrics.jsonl, λ₁ as in one process (float32 training: to 1e-5)."""
    import os
    import subprocess

    from samkit.cli import main
    from samkit.train import read_metrics
    from samkit.train.edge import read_edge_rows

    args = ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sam",
            "--subset", "200", "--batch-size", "50", "--epochs", "1", "--edge-every", "2",
            "--threads", "1", "--out-dir", str(tmp_path), "--set", "model_kwargs.width=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # one retry on a new port (see samkit_dist_workers.spawn)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(W.free_port()), "-m", "samkit", *args, "--name", "ddp",
               *(["--overwrite"] if attempt else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        text = done.stdout + done.stderr
        if done.returncode == 0 or "samkit: error" in text or "]: Traceback" in text:
            break
    assert done.returncode == 0, text
    assert main([*args, "--name", "one", "-q"]) == 0
    ddp, one = read_edge_rows(tmp_path / "ddp"), read_edge_rows(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [0, 2, 4]
    logged = [r for r in read_metrics(tmp_path / "ddp") if r.get("event") == "edge"]
    assert [r["step"] for r in logged] == [0, 2, 4]
    for a, b in zip(ddp, one, strict=True):
        for key in ("lambda1", "edge", "grad_norm", "batch_grad_norm"):
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
