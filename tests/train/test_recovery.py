"""A run survives what stops it (issue 26, findings 5-7): killed parents of parallel jobs, a
full disk, a hand-edited config.yaml. Each test failed on the main of eb6c8b6."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import samkit
from samkit.cli import main
from samkit.train import load_checkpoint, read_metrics
from samkit.train.logs import TornLineWarning
from samkit.train.trainer import ConfigMismatchWarning

FAST = ["--dataset", "digits", "--threads", "1", "--quiet"]
SRC = str(Path(samkit.__file__).resolve().parents[1])


def train(tmp_path, *args):
    return main(["train", *FAST, "--out-dir", str(tmp_path), *args])


def limited(tmp_path, limit, *args, timeout=120):
    """``samkit train`` in a process whose files may not grow past ``limit`` bytes (a full disk,
    for real: writes fail with EFBIG; SIGXFSZ ignored)."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from samkit.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code, "train", *FAST, "--out-dir", str(tmp_path),
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ (5) parallel jobs, killed


def alive(pid):
    """The process ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def job_processes(parent):
    """The job processes (spawned by multiprocessing) of the process ``parent``."""
    pids = []
    for task in Path(f"/proc/{parent}/task").glob("*/children"):
        pids += [int(pid) for pid in task.read_text().split()]
    found = []
    for pid in pids:
        try:
            if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return sorted(found)


def epochs_logged(path):
    try:
        return sum('"event": "epoch"' in line for line in path.read_text().splitlines())
    except FileNotFoundError:
        return 0


COMPARE = ["compare", "--dataset", "digits", "--optimizers", "sgd", "sam", "--seeds", "0",
           "--jobs", "2", "--equal-budget", "none", "--threads", "1", "--name", "cmp"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kill", ["parent SIGKILL", "parent SIGTERM", "worker SIGTERM"])
def test_killing_compare_jobs_stops_every_worker_with_a_checkpoint_and_resume_works(
        tmp_path, capsys, kill):
    env = {**os.environ, "PYTHONPATH": SRC}
    runs = [tmp_path / "cmp" / "sgd-s0", tmp_path / "cmp" / "sam-s0"]
    # a budget far beyond the test: the runs are stopped, never finished
    parent = subprocess.Popen(
        [sys.executable, "-m", "samkit", *COMPARE, "--epochs", "100000", "--out-dir",
         str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: all(epochs_logged(r / "metrics.jsonl") >= 1 for r in runs), 240,
                   "both runs train")
        workers = job_processes(parent.pid)
        assert len(workers) == 2 and all(alive(w) for w in workers)
        if kill == "parent SIGKILL":
            parent.kill()
        elif kill == "parent SIGTERM":
            parent.send_signal(signal.SIGTERM)
        else:
            os.kill(workers[0], signal.SIGTERM)
        wait_until(lambda: not any(alive(w) for w in workers), 60, "the workers end")
        rc = parent.wait(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    err = parent.stderr.read()
    if kill == "parent SIGKILL":
        assert rc == -signal.SIGKILL
    else:  # the parent forwards the signal, waits for the checkpoints, says so
        assert rc == 128 + signal.SIGTERM, err
        assert "interrupted: finished runs are kept; rerun with --resume" in err
        assert "Traceback" not in err
    for r in runs:  # each worker saved where it stopped (and let go of its lock: see below)
        assert json.loads((r / "run.json").read_text())["status"] == "interrupted"
    states = [load_checkpoint(r / "checkpoint.pt") for r in runs]
    # --resume at once (a budget that ends within the epoch each run stopped in)
    epochs = max(s["epoch"] + (1 if s["batch"] else 0) for s in states)
    capsys.readouterr()
    assert main([*COMPARE, "--quiet", "--epochs", str(epochs), "--out-dir", str(tmp_path),
                 "--resume"]) == 0, capsys.readouterr().err
    for r, state in zip(runs, states, strict=True):
        assert load_checkpoint(r / "checkpoint.pt")["step"] >= state["step"]
        assert json.loads((r / "run.json").read_text())["status"] == "finished"


def _slow_or_fail(task):
    if task == "fail":
        raise ValueError("task failed")
    for _ in range(6000):  # 300 s: stopped long before
        time.sleep(0.05)
    return "finished"


@pytest.mark.slow
def test_the_first_error_stops_the_other_jobs_instead_of_waiting_for_them():
    from samkit.experiments.base import map_jobs

    start = time.monotonic()
    with pytest.raises(ValueError, match="task failed"):
        map_jobs(_slow_or_fail, ["slow", "fail"], jobs=2)
    assert time.monotonic() - start < 150  # was: the slow job's 300 s


# ------------------------------------------------------------------ (6) a full disk


@pytest.mark.slow  # spawns a process (samkit train with a file-size limit)
def test_a_torn_metrics_line_is_dropped_with_a_warning_and_resume_goes_on(tmp_path, capsys):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "d") == 0
    # every step logged, no checkpoint before the end: metrics.jsonl outgrows 4,000 bytes first
    done = limited(tmp_path, 4000, "--optimizer", "sgd", "--epochs", "10", "--name", "d",
                   "--resume", "--set", "log_every=1", "checkpoint_every=100")
    metrics = tmp_path / "d" / "metrics.jsonl"
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert f"could not write {metrics}: " in done.stderr
    assert "the checkpoint of step 12 is kept" in done.stderr
    text = metrics.read_text()
    assert not text.endswith("\n")  # the last record is half written
    with pytest.warns(TornLineWarning, match=str(metrics)):
        records = read_metrics(metrics)
    assert records and all(isinstance(r, dict) for r in records)
    with pytest.warns(TornLineWarning):
        _, loaded, model = samkit.load_run(tmp_path / "d")
    assert loaded == records and model is not None
    # resume drops the torn line (and what came after the checkpoint) and finishes
    with pytest.warns(TornLineWarning):
        assert train(tmp_path, "--optimizer", "sgd", "--epochs", "2", "--name", "d",
                     "--resume") == 0
    final = read_metrics(metrics)
    assert [r["epoch"] for r in final if r["event"] == "epoch"] == [1, 2]


def test_a_bad_line_before_the_last_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "loss"\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}: line 2 is not a JSON record"):
        read_metrics(path)


@pytest.mark.slow  # spawns a process (samkit train with a file-size limit)
def test_a_failed_checkpoint_write_keeps_the_old_one_and_says_so(tmp_path):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "c") == 0
    path = tmp_path / "c" / "checkpoint.pt"
    size = path.stat().st_size
    done = limited(tmp_path, size // 2, "--optimizer", "sgd", "--epochs", "3", "--name", "c",
                   "--resume")
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert f"could not save {path}: " in done.stderr
    assert f"the checkpoint of step 12 is kept: {path}" in done.stderr
    assert load_checkpoint(path)["step"] == 12
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")] == []
    assert json.loads((tmp_path / "c" / "run.json").read_text())["status"] == "write failed"
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "3", "--name", "c",
                 "--resume") == 0
    assert load_checkpoint(path)["step"] == 36


def test_a_killed_writes_temporary_files_are_removed_when_the_run_resumes(tmp_path, capsys):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "t") == 0
    run = tmp_path / "t"
    stale = [run / ".checkpoint.pt.k2j4_x9q.tmp", run / ".metrics.jsonl.abcdefgh.tmp",
             run / ".run.json.0a1b2c3d.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    other = run / "notes.tmp"  # not one of ours: kept
    other.write_text("mine")
    main(["train", "--dataset", "digits", "--threads", "1", "--out-dir", str(tmp_path),
          "--optimizer", "sgd", "--epochs", "2", "--name", "t", "--resume"])
    assert "removed 3 temporary file(s) of an interrupted write" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and other.exists()


def test_the_advice_leads_somewhere_when_no_checkpoint_was_saved(tmp_path, capsys):
    # a run that stopped before its first checkpoint: metrics, no checkpoint
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "n") == 0
    (tmp_path / "n" / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "n",
                 "--resume") == 2
    err = capsys.readouterr().err
    assert "drop --resume" not in err and "--overwrite" in err
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "n") == 2
    err = capsys.readouterr().err
    assert "--resume" not in err and "--overwrite" in err
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "n",
                 "--overwrite") == 0
    # nothing there at all: dropping --resume is the way (and it works)
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "m",
                 "--resume") == 2
    assert "drop --resume" in capsys.readouterr().err
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "m") == 0


# ------------------------------------------------------------------ (7) the checkpoint's config


def test_load_run_returns_the_checkpoints_config_and_names_what_config_yaml_changed(tmp_path):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--lr", "0.05", "--name", "e",
                 "--set", "model_kwargs.width=16") == 0
    path = tmp_path / "e" / "config.yaml"
    text = path.read_text()
    path.write_text(text.replace("lr: 0.05", "lr: 9.0"))
    with pytest.warns(ConfigMismatchWarning, match=r"differs from the checkpoint .* in lr;"):
        config, _, model = samkit.load_run(tmp_path / "e")
    assert config.lr == 0.05 and config.model_kwargs == {"width": 16}
    path.write_text("")  # an empty config.yaml: the model still loads (was: size mismatch)
    with pytest.warns(ConfigMismatchWarning, match=r"config.yaml \(empty\)"):
        config, _, model = samkit.load_run(tmp_path / "e")
    assert config.model_kwargs == {"width": 16} and model is not None
    path.unlink()  # config.yaml is a copy for people: the run loads without it
    assert samkit.load_run(tmp_path / "e").config.lr == 0.05


def test_resume_refuses_a_budget_below_the_current_step(tmp_path, capsys):
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "2", "--name", "b") == 0
    before = (tmp_path / "b" / "config.yaml").read_text()
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--name", "b", "--resume") == 2
    err = capsys.readouterr().err
    assert "the run is at step 24 (2 epochs)" in err
    assert "the budget asks for 12 steps (--epochs 1)" in err
    assert "allowed: a budget of at least 24 steps" in err
    assert (tmp_path / "b" / "config.yaml").read_text() == before
    assert yaml.safe_load(before)["epochs"] == 2
    # the same budget (nothing to do) and a longer one are fine
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "2", "--name", "b", "--resume") == 0
    assert train(tmp_path, "--optimizer", "sgd", "--epochs", "3", "--name", "b", "--resume") == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 36
