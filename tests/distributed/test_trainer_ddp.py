"""The trainer under DDP: torchrun -m samkit train (2 gloo processes), modes, accumulation,
rank-0 files, resume at the same world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from samkit.cli import main
from samkit.train import Trainer, read_metrics

sys.path.insert(0, str(Path(__file__).parent))
import samkit_dist_workers as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    results = W.spawn(W.trainer_worker, out)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return out, results


def _single(out_dir, **changes):
    cfg = W.trainer_config(str(out_dir), **changes)
    record = Trainer(cfg, verbose=0).fit()
    state = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)
    return record, state["model"]


@pytest.mark.slow  # spawns processes
def test_synced_with_accumulation_matches_one_process(ddp_runs, tmp_path):
    _, results = ddp_runs
    record, params = _single(tmp_path, grad_accum=2, name="one")
    for res in results:
        assert res["synced"]["train_loss"] == pytest.approx(record["train_loss"], rel=1e-4)
        assert res["synced"]["test_loss"] == pytest.approx(record["test_loss"], rel=1e-4)
    for k, v in params.items():
        torch.testing.assert_close(results[0]["synced-params"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # spawns processes
def test_local_mode_trains_and_differs_from_synced(ddp_runs):
    _, results = ddp_runs
    a, b = results[0], results[1]
    assert a["local"]["test_acc"] > 0.3  # chance: 0.1 (16 steps from scratch)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert a["local"][key] == b["local"][key]  # every rank: the same (all-reduced) record
    assert a["local"]["train_loss"] != a["synced"]["train_loss"]


@pytest.mark.slow  # spawns processes
def test_resume_at_same_world_size_is_exact(ddp_runs):
    _, results = ddp_runs
    res = results[0]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "step"):
        assert res["resumed"][key] == res["local"][key]
    for k, v in res["local-params"].items():
        assert torch.equal(res["resumed-params"][k], v)


@pytest.mark.slow  # spawns processes
def test_rank0_writes_the_run_and_a_different_world_size_cannot_resume(ddp_runs, capsys):
    out, results = ddp_runs
    assert results[0]["files"] == [".samkit-run.json", "checkpoint.pt", "config.yaml",
                                   "metrics.jsonl", "run.json"]
    steps = [r["step"] for r in read_metrics(out / "local-full") if r["event"] == "step"]
    assert steps == sorted(set(steps))  # one writer: no step twice
    code = main(["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sam",
                 "--subset", "400", "--batch-size", "50", "--lr-schedule", "constant",
                 "--epochs", "3", "--threads", "1", "--out-dir", str(out), "--name", "local-full",
                 "--perturbation", "local", "--set", "grad_accum=2", "log_every=4",
                 "model_kwargs.width=32", "--resume", "-q"])
    assert code == 2
    assert "saved by 2 process(es) and this run has 1" in capsys.readouterr().err


@pytest.mark.slow  # spawns processes
def test_torchrun_module_entry_point(tmp_path):
    """torchrun --nproc-per-node 2 -m samkit train: gloo on CPU, equal to one process."""
    args = ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "asam",
            "--subset", "300", "--batch-size", "60", "--epochs", "1", "--threads", "1",
            "--out-dir", str(tmp_path), "--set", "model_kwargs.width=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # one retry on a new port (see samkit_dist_workers.spawn)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(W.free_port()), "-m", "samkit", *args, "--name", "ddp",
               *(["--overwrite"] if attempt else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        text = done.stdout + done.stderr
        if done.returncode == 0 or "samkit: error" in text or "]: Traceback" in text:
            break  # success, or a real error in a worker (not a launch failure)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done: ") == 1  # rank 0 reports
    assert main([*args, "--name", "one", "-q"]) == 0
    a, b = read_metrics(tmp_path / "ddp")[-1], read_metrics(tmp_path / "one")[-1]
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_perturbation_is_checked():
    with pytest.raises(ValueError, match="Invalid perturbation: 'both'"):
        W.trainer_config("runs", perturbation="both")
