"""The runner never reports success for a failed run and never loses one (issue 14): divergence,
strict JSON, the run-directory lock, --overwrite, --data-dir, SIGTERM, corrupt checkpoints,
versions, permissions, weights_only, load_run, the final table and the smaller checks."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samkit
from samkit.cli import main
from samkit.train import Callback, TrainConfig, Trainer, load_checkpoint, read_metrics
from samkit.train.rundir import RunLock
from samkit.train.trainer import TrainingDiverged

FAST = ["--dataset", "digits", "--threads", "1", "--quiet"]


def cfg(tmp_path, **kw):
    base = dict(dataset="digits", model="mlp", model_kwargs={"width": 16}, optimizer="sam",
                epochs=2, batch_size=256, lr=0.05, out_dir=str(tmp_path), threads=1,
                log_every=2)
    base.update(kw)
    return TrainConfig(**base)


def train(tmp_path, *args):
    return main(["train", *FAST, "--out-dir", str(tmp_path), *args])


def strict_load(text):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ (1) divergence


def test_a_diverging_run_exits_3_marks_its_metrics_and_keeps_no_nan_checkpoint(tmp_path, capsys):
    rc = train(tmp_path, "--optimizer", "sam", "--lr", "100", "--epochs", "4", "--name", "bad")
    err = capsys.readouterr().err
    assert rc == 3
    assert "diverged at step" in err and "lr=100" in err and "rho=0.05" in err
    records = read_metrics(tmp_path / "bad")
    assert records[-1]["event"] == "diverged" and records[-1]["loss"] is None
    assert not any(r.get("event") == "epoch" and "test_acc" in r for r in records)
    assert strict_load((tmp_path / "bad" / "run.json").read_text())["status"] == "diverged"
    if (tmp_path / "bad" / "checkpoint.pt").exists():  # an epoch may have ended before
        state = load_checkpoint(tmp_path / "bad" / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values())


class Poison(Callback):
    """Fills the first layer with NaN before step ``step`` (0-based; a divergence at a known
    step)."""

    def __init__(self, step):
        self.step = step

    def on_step_start(self, state, step):
        if step == self.step:
            with torch.no_grad():
                next(state.model.parameters()).fill_(math.nan)


def test_divergence_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    c = cfg(tmp_path, name="poisoned", epochs=3)
    steps_per_epoch = math.ceil(1438 / 256)
    trainer = Trainer(c, callbacks=[Poison(steps_per_epoch + 2)], verbose=0)
    with pytest.raises(TrainingDiverged, match="diverged at step 9 .epoch 2.*last good "
                                               "checkpoint is kept") as info:
        trainer.fit()
    assert info.value.record["step"] == steps_per_epoch + 3  # the 9th step's loss is NaN
    state = load_checkpoint(c.run_dir / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, steps_per_epoch)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert read_metrics(c.run_dir)[-1]["event"] == "diverged"
    assert not (c.run_dir / ".lock").exists()


def test_compare_reports_a_diverged_seed_as_diverged(tmp_path, capsys):
    rc = main(["compare", *FAST, "--out-dir", str(tmp_path), "--name", "cmp", "--epochs", "1",
               "--optimizers", "sgd", "sam:lr=100", "--seeds", "0"])
    out, err = capsys.readouterr()
    assert rc == 3 and "1 of 2 runs diverged: sam:lr=100 seed 0" in err
    assert "| sam:lr=100 (1/1 seeds diverged) | diverged |" in out
    assert "nan" not in out.lower()
    assert "± 0.00" not in out and "(1 seed)" in out  # one seed has no spread
    summary = strict_load((tmp_path / "cmp" / "summary.json").read_text())
    runs = {r["optimizer"]: r for r in summary["runs"]}
    assert runs["sam:lr=100"]["diverged_at"] is not None and runs["sgd"]["diverged_at"] is None
    assert "**diverged**" in (tmp_path / "cmp" / "report.md").read_text()
    assert (tmp_path / "cmp" / "config.yaml").is_file()


# ------------------------------------------------------------------ (2) strict JSON


def test_every_json_file_samkit_writes_is_strict_json(tmp_path, capsys):
    train(tmp_path, "--optimizer", "sam", "--lr", "100", "--epochs", "2", "--name", "bad")
    train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "good")
    main(["compare", *FAST, "--out-dir", str(tmp_path), "--name", "cmp", "--epochs", "1",
          "--optimizers", "sgd", "sam:lr=100", "--seeds", "0", "1"])
    assert main(["eos", "--dataset", "synthetic", "--subset", "96", "--width", "16", "--steps",
                 "6", "--every", "3", "--lr", "0.05", "--rho", "0.05", "--no-gd", "--out-dir",
                 str(tmp_path), "--name", "eos", "--threads", "1", "--quiet"]) == 0  # SAM's
    # run: its rows hold every field a GD run's do, and more
    files = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert {p.name for p in files} >= {"metrics.jsonl", "run.json", "summary.json",
                                       "config.json", "train.jsonl", "edge.jsonl"}
    for path in files:
        for line in (path.read_text().splitlines() if path.suffix == ".jsonl"
                     else [path.read_text()]):
            if line.strip():
                strict_load(line)  # raises on NaN / Infinity
    assert (tmp_path / "eos" / "config.yaml").is_file()


# ------------------------------------------------------------------ (3) lock and --overwrite


@pytest.mark.slow  # spawns a process
def test_a_live_run_of_the_same_name_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    c = cfg(tmp_path, name="locked", epochs=1)
    c.run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom samkit.train.rundir import RunLock\n"
         f"lock = RunLock({str(c.run_dir)!r})\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=f"in use by process {holder.pid}"):
            Trainer(c, verbose=0).fit()
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone (killed: its lock file is left behind): the next run trains
    assert (c.run_dir / ".lock").exists()
    Trainer(c, verbose=0).fit()
    assert not (c.run_dir / ".lock").exists() and (c.run_dir / "checkpoint.pt").is_file()
    with RunLock(c.run_dir), pytest.raises(FileExistsError, match="in use by this process"):
        RunLock(c.run_dir)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_its_data(tmp_path, capsys):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "r") == 0
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (corrupt / name).write_bytes(b"not an idx file")
    for bad in (["--data-dir", str(corrupt)], ["--data-dir", str(tmp_path / "nowhere")]):
        rc = main(["train", "--dataset", "fashion-mnist", "--quiet", "--out-dir", str(tmp_path),
                   "--name", "r", "--overwrite", *bad])
        assert rc == 2
        assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before
        assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "r",
                 "--resume") == 0  # the old run is whole: it resumes (finished: nothing to do)


def test_eos_refuses_an_existing_run_unless_overwrite(tmp_path, capsys):
    argv = ["eos", "--dataset", "synthetic", "--subset", "64", "--width", "8", "--steps", "2",
            "--every", "2", "--lr", "0.05", "--rho", "--out-dir", str(tmp_path), "--name", "e",
            "--threads", "1", "--quiet"]  # --rho with no radius: the GD run only
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already holds a run: pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


# ------------------------------------------------------------------ (4) --data-dir


def test_a_data_dir_that_does_not_exist_is_rc_2_naming_it(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-such-dir"
    assert train(tmp_path, "--data-dir", str(missing), "--name", "d") == 2
    assert str(missing) in capsys.readouterr().err
    monkeypatch.setenv("SAMKIT_DATA", str(missing))
    rc = main(["train", "--dataset", "fashion-mnist", "--quiet", "--out-dir", str(tmp_path),
               "--name", "d2"])
    assert rc == 2 and "$SAMKIT_DATA" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "d2").exists()


def test_the_data_path_used_is_logged_and_written_into_the_run(tmp_path, capsys):
    from tests.realdata import require_fashion_mnist

    require_fashion_mnist()
    from samkit.data import resolve_data_dir

    folder = resolve_data_dir("fashion-mnist")
    rc = main(["train", "--dataset", "fashion-mnist", "--subset", "200", "--epochs", "1",
               "--threads", "1", "--data-dir", str(folder), "--out-dir", str(tmp_path),
               "--name", "f"])
    assert rc == 0
    assert f"data: fashion-mnist from {folder.resolve()}" in capsys.readouterr().out
    info = strict_load((tmp_path / "f" / "run.json").read_text())
    assert info["data_path"] == str(folder.resolve())


# ------------------------------------------------------------------ (5) signals, checkpoints


class SendSignal(Callback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, state, step, loss):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_writes_a_resumable_checkpoint_mid_epoch(tmp_path):
    kw = dict(epochs=2, batch_size=100)
    Trainer(cfg(tmp_path, name="straight", **kw), verbose=0).fit()
    cut = Trainer(cfg(tmp_path, name="cut", **kw), callbacks=[SendSignal(4, signal.SIGTERM)],
                  verbose=0)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert cut.signal == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 4, 4)
    Trainer(cfg(tmp_path, name="cut", **kw), resume=True, verbose=0).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])
    assert a["step"] == b["step"]


def test_the_cli_exits_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    import samkit.train as T

    class Signalled(T.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.callbacks.append(SendSignal(2, signal.SIGTERM))

    monkeypatch.setattr(T, "Trainer", Signalled)
    assert train(tmp_path, "--epochs", "1", "--batch-size", "100", "--name", "s") == 143
    assert "resume with: samkit train" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_checkpoint_is_rc_2_with_the_fix(tmp_path, capsys, damage):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "c") == 0
    path = tmp_path / "c" / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" if damage == "garbage" else data[: len(data) // 2])
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "2", "--name", "c",
                 "--resume") == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} is not readable: " in err
    assert err.strip().endswith("(rerun with --overwrite to start again)")


# ------------------------------------------------------------------ (6) what a run leaves


def test_versions_umask_weights_only_load_run_and_the_final_table(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert train(tmp_path, "--optimizer", "sam", "--epochs", "2", "--name", "v") == 0
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    for row in ("final test acc", "best test acc", "final test loss", "train time",
                str(tmp_path / "v")):
        assert row in out
    run = tmp_path / "v"
    for path in run.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path
    info = strict_load((run / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["samkit"] == samkit.__version__
    assert info["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # plain torch.load works
    config, metrics, model = samkit.load_run(run)
    assert config.run_name == "v" and metrics[-1]["event"] == "epoch"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key])
    from samkit.data import load_dataset
    from samkit.measures import evaluate

    _, test = load_dataset("digits", standardize=True)
    _, acc = evaluate(model, test, 1000, torch.device("cpu"))
    assert acc == pytest.approx(metrics[-1]["test_acc"], abs=1e-6)


def test_files_follow_a_strict_umask_too(tmp_path):
    old = os.umask(0o077)
    try:
        Trainer(cfg(tmp_path, name="u", epochs=1), verbose=0).fit()
    finally:
        os.umask(old)
    for path in (tmp_path / "u").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


# ------------------------------------------------------------------ (7) smaller checks


def test_smaller_input_checks(tmp_path, capsys):
    assert train(tmp_path, "--optimizer", "samm", "--name", "x") == 2
    assert "did you mean sam" in capsys.readouterr().err
    if not torch.backends.mps.is_available():
        assert train(tmp_path, "--device", "mps", "--name", "x") == 2
        assert "MPS (Apple GPU) is not available" in capsys.readouterr().err
    assert train(tmp_path, "--set", "momentum=2", "--name", "x") == 2
    assert "Invalid momentum: 2.0 (allowed: 0 <= momentum < 1)" in capsys.readouterr().err
    assert train(tmp_path, "--epochs", "2", "--set", "warmup_epochs=3", "--name", "x") == 2
    assert "Invalid warmup_epochs" in capsys.readouterr().err
    assert train(tmp_path, "--steps", "4", "--set", "warmup_epochs=3", "--name", "x") == 2
    assert "more than the run's 4 steps" in capsys.readouterr().err
    assert train(tmp_path, "--batch-size", "4", "--set", "grad_accum=8", "--name", "x") == 2
    assert "Invalid grad_accum: 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"samkit {samkit.__version__} (torch ")


def test_a_download_without_network_names_the_url_and_the_manual_path(tmp_path):
    from samkit.data.fetch import DownloadError, download

    url = "http://samkit.invalid/train-images-idx3-ubyte.gz"
    dest = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    with pytest.raises(DownloadError, match=f"Cannot download {url}: .*put it at {dest}"):
        download(url, dest, md5="0" * 32, progress=False, timeout=5)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


# ------------------------------------------------------------------ an older checkpoint

OLD = Path(__file__).parent / "data" / "old-90b5a1c"

# ``old_continued.pt`` was computed by the old code on another CPU: float32 matrix products take
# other SIMD kernels there (AVX2 vs AVX-512 vs none: sums in another order), so the stored
# weights may differ from this machine's in the last bits (7.45e-9 seen in net.1.weight, AVX-512
# against the file). The stored file is compared within STORED_ATOL, far below any change of
# behaviour: no weight decay on the biases, for one, moves them by 1.3e-6 over those two steps
# (test_the_stored_tolerance_tells_a_change_of_behaviour). Bit-for-bit claims are made
# against a continuation computed in this process, with this process's kernels.
STORED_ATOL = 1e-7


def _resume_old(tmp_path, config=None):
    """Resume the fixture run (a copy) with ``config`` (default: its own config.yaml)."""
    import shutil

    from samkit.config import load_config

    run = tmp_path / "old-sam"
    shutil.copytree(OLD, run, ignore=shutil.ignore_patterns("old_continued.pt", "make_old.py"))
    if config is None:
        config = load_config(run / "config.yaml", out_dir=str(tmp_path))
    trainer = Trainer(config, resume=True, verbose=0)
    return trainer, trainer.fit()


def _continue_by_hand(weight_decay_on_biases=True):
    """The old run's last two steps rebuilt from the checkpoint's contents without the Trainer:
    the model's weights, SGD's two groups (weights, biases) and momentum buffers, the cosine LR
    of steps 6 and 7 of 8, epoch 1's batches 2 and 3 (the shuffle seeded by (seed 3, epoch 1)),
    and SAM steps by ``opt.step(closure)``. Returns the final state dict."""
    from samkit.data import load_dataset
    from samkit.models import create_model
    from samkit.train.checkpoint import load_checkpoint
    from samkit.train.trainer import _SHUFFLE, derive_seed

    state = load_checkpoint(OLD / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    train_split, _ = load_dataset("digits", subset=512, stratified=True, seed=0,
                                  standardize=True, device="cpu")
    model = create_model("mlp", tuple(train_split.x.shape[1:]), train_split.num_classes,
                         width=16, depth=1)
    model.load_state_dict(state["model"])
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    base = torch.optim.SGD([{"params": weights, "weight_decay": 5e-4},
                            {"params": biases,
                             "weight_decay": 5e-4 if weight_decay_on_biases else 0.0}],
                           lr=0.05, momentum=0.9)
    for i, p in enumerate(weights + biases):  # state_dict numbers the parameters group by group
        base.state[p]["momentum_buffer"] = state["optimizer"]["state"][i]["momentum_buffer"]
    opt = samkit.SAM(base, rho=0.05)
    generator = torch.Generator().manual_seed(derive_seed(3, _SHUFFLE, 1))
    order = torch.randperm(512, generator=generator)
    for step, batch in ((6, 2), (7, 3)):
        for group in opt.param_groups:  # LRSchedule("cosine", 8) as LambdaLR applies it
            group["lr"] = 0.05 * (0.5 * (1.0 + math.cos(math.pi * min(step / 8, 1.0))))
        idx = order[128 * batch:128 * (batch + 1)]
        x, y = train_split.x[idx], train_split.y[idx]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return model.state_dict()


def test_a_checkpoint_of_samkit_90b5a1c_resumes_bit_identically(tmp_path):
    """The fixture was made by ``make_old.py`` with the code at commit 90b5a1c: SAM with weight
    decay (then also on biases: 2 parameter groups), stopped at step 6 of 8; the old code's own
    continuation is ``old_continued.pt``. The new code resumes it and takes the same steps: bit
    for bit as the same steps rebuilt by hand from the checkpoint's contents in this process,
    and within STORED_ATOL of the old code's continuation computed on another CPU."""
    trainer, record = _resume_old(tmp_path)
    assert trainer.config.decay_bias_and_norm is True  # a resolved config without the key
    assert TrainConfig().decay_bias_and_norm is False  # new runs: the new default
    assert len(trainer.optimizer.param_groups) == 2
    assert record["step"] == 8
    resumed = trainer.model.state_dict()
    by_hand = _continue_by_hand()
    for key, value in by_hand.items():
        assert torch.equal(resumed[key], value), key
    old = torch.load(OLD / "old_continued.pt", weights_only=True)
    assert old["record"]["step"] == 8
    for key, value in old["model"].items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=STORED_ATOL, msg=key)
    assert record["train_loss"] == pytest.approx(old["record"]["train_loss"], rel=1e-6)
    # last-bit differences could move a borderline test example, never more than one
    assert abs(record["test_acc"] - old["record"]["test_acc"]) <= 1 / len(trainer.test_data.y)


def test_the_stored_tolerance_tells_a_change_of_behaviour():
    """STORED_ATOL is far below what a change of behaviour does to the stored continuation:
    without weight decay on the biases (today's default for new runs) the biases move by more."""
    old = torch.load(OLD / "old_continued.pt", weights_only=True)["model"]
    changed = _continue_by_hand(weight_decay_on_biases=False)
    worst = max(float((changed[k] - old[k]).abs().max()) for k in old)
    assert worst > 10 * STORED_ATOL


def test_an_older_checkpoint_resumed_from_flags_keeps_its_behaviour(tmp_path):
    """Resumed from flags (a config without decay_bias_and_norm), the old run keeps its weight
    decay on biases: the same weights, bit for bit, as resuming it from its config.yaml."""
    config = cfg(tmp_path, name="old-sam", model_kwargs={"width": 16, "depth": 1}, subset=512,
                 seed=3, batch_size=128, weight_decay=5e-4, rho=0.05, device="cpu")
    assert config.decay_bias_and_norm is False
    trainer, _ = _resume_old(tmp_path / "flags", config.replace(out_dir=str(tmp_path / "flags")))
    assert trainer.config.decay_bias_and_norm is True
    same, _ = _resume_old(tmp_path / "yaml")
    for key, value in same.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    old = torch.load(OLD / "old_continued.pt", weights_only=True)
    for key, value in old["model"].items():
        torch.testing.assert_close(trainer.model.state_dict()[key], value, rtol=0,
                                   atol=STORED_ATOL, msg=key)


class FakeWriter:
    """Records what the trainer gives TensorBoard's SummaryWriter."""

    def __init__(self):
        self.scalars, self.hparams = [], None

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_hparams(self, hparams, metrics, run_name=None):
        self.hparams = (hparams, metrics, run_name)

    def flush(self):
        pass

    def close(self):
        pass


def test_tensorboard_gets_per_step_curves_sane_tags_and_hparams(tmp_path, monkeypatch):
    import samkit.train.logs as logs

    writer = FakeWriter()
    monkeypatch.setattr(logs, "make_summary_writer", lambda run_dir: writer)
    monkeypatch.setattr(logs, "check_tensorboard", lambda: None)
    monkeypatch.setattr("samkit.train.trainer.check_tensorboard", lambda: None)
    c = cfg(tmp_path, name="tb", epochs=2, tensorboard=True)
    record = Trainer(c, verbose=0).fit()
    tags = {t for t, _, _ in writer.scalars}
    assert {"step/loss", "step/lr", "step/grad_norm", "train/loss", "test/accuracy",
            "train/lr"} <= tags
    assert not any(t.endswith("/epochs") or t.endswith("/epoch") for t in tags)
    steps = [s for t, _, s in writer.scalars if t == "step/loss"]
    assert steps == list(range(1, record["step"] + 1))  # every step
    norms = [v for t, v, _ in writer.scalars if t == "step/grad_norm"]
    assert all(v > 0 and math.isfinite(v) for v in norms)
    hparams, metrics, _ = writer.hparams
    assert hparams["optimizer"] == "sam" and hparams["lr"] == 0.05
    assert metrics["final/test_acc"] == record["test_acc"]


def test_loss_text_and_plot_axes(tmp_path):
    from samkit.plots import plot_learning_curves
    from samkit.train.logs import loss_text

    assert loss_text(61518085542370779070464.0) == "6.152e+22"
    assert loss_text(0.31254) == "0.3125" and loss_text(math.nan) == "nan"
    runs = [[{"event": "epoch", "epoch": 1, "test_acc": 0.5, "train_loss": 0.9},
             {"event": "epoch", "epoch": 2, "test_acc": None, "train_loss": None}]]
    path = plot_learning_curves({"sgd": runs}, tmp_path / "c.png")  # nulls are left out
    assert path.stat().st_size > 1000

    from matplotlib.figure import Figure

    from samkit.plots import plain_log_axis

    fig = Figure()
    ax = fig.subplots()
    ax.plot([1, 2], [0.5, 0.95])
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    labels = [t.get_text() for t in ax.yaxis.get_ticklabels(minor=True)
              + ax.yaxis.get_ticklabels()]
    assert any(labels) and not any("10^" in t or "times" in t or "×" in t for t in labels)
