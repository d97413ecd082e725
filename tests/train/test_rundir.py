"""A run folder is samkit's only if samkit made it: one rule (samkit.train.rundir.RunDir) for
train, compare, eos, correlate and the runs inside them; names confined to the out-dir; a lock
that two starts cannot both take; a failed start that leaves nothing in the way of its retry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from samkit.cli import main
from samkit.train.rundir import LOCK, MARKER, RunDir, RunLock, owned_and_foreign

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
# the cheapest real run of each subcommand (digits), without --name and --out-dir
QUICK = {
    "train": ["train", "--dataset", "digits", "--subset", "200", "--epochs", "1"],
    "compare": ["compare", "--dataset", "digits", "--subset", "200", "--epochs", "1",
                "--optimizers", "sgd", "--seeds", "0", "--equal-budget", "none"],
    "eos": ["eos", "--dataset", "digits", "--subset", "100", "--steps", "4", "--every", "2",
            "--rho"],  # no radius: the GD run only (the folder rules do not need SAM's)
    "correlate": ["correlate", "--quick"],
}


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's: a file, a sub-folder with a file; returns what it holds."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("precious")
    (path / "sub" / "notes.txt").write_text("mine")
    (path / "config.yaml").write_text("# the user's own config\n")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ (1) --overwrite


@pytest.mark.parametrize("command", sorted(QUICK))
def test_overwrite_refuses_a_folder_samkit_did_not_write(tmp_path, command, capsys):
    before = user_folder(tmp_path / "X")
    rc = main([*QUICK[command], "--out-dir", str(tmp_path), "--name", "X", "--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "samkit did not write" in err and "thesis.tex" in err
    assert snapshot(tmp_path / "X") == before  # nothing deleted, replaced or added
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == ["config.yaml", "sub",
                                                                   "thesis.tex"]


def test_overwrite_deletes_only_what_samkit_wrote(tmp_path):
    run = tmp_path / "r"
    with RunDir(run, "eos", ("report.md", "gd")) as d:
        d.start()
        (run / "report.md").write_text("old")
        (run / "gd").mkdir()
        (run / "gd" / "edge.jsonl").write_text("{}\n")
        (run / "figure.png").write_bytes(b"png")  # written by the run, not declared
    assert json.loads((run / MARKER).read_text())["owned"] == ["figure.png", "gd", "report.md"]
    with pytest.raises(FileExistsError, match="already holds a run: pass --overwrite"):
        RunDir(run, "eos")
    with RunDir(run, "eos", overwrite=True) as d:
        assert (run / "report.md").exists()  # kept until the new run has loaded its inputs
        d.start()
        assert sorted(p.name for p in run.iterdir()) == [LOCK, MARKER]
    # a file the user adds to a run of samkit's is theirs: --overwrite now refuses the folder
    (run / "report.md").write_text("new")
    (run / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(mine.txt\)"):
        RunDir(run, "eos", overwrite=True)
    assert (run / "report.md").read_text() == "new"


def test_a_run_inside_a_run_is_checked_too(tmp_path):
    outer = tmp_path / "cmp"
    with RunDir(outer, "compare", ("report.md",)) as d:
        d.start()
        with RunDir(outer / "sgd-s0", "train", ("metrics.jsonl",)) as inner:
            inner.start()
            (outer / "sgd-s0" / "metrics.jsonl").write_text("{}\n")
        (outer / "report.md").write_text("r")
    (outer / "sgd-s0" / "thesis.tex").write_text("precious")
    assert owned_and_foreign(outer) == (["report.md", "sgd-s0"], ["sgd-s0/thesis.tex"])
    with pytest.raises(FileExistsError, match="sgd-s0/thesis.tex"):
        RunDir(outer, "compare", overwrite=True)
    (outer / "sgd-s0" / "thesis.tex").unlink()
    with RunDir(outer, "compare", overwrite=True) as d:
        d.start()
    assert sorted(p.name for p in outer.iterdir()) == [MARKER]


def test_a_run_of_an_older_samkit_without_a_marker_is_still_its_own(tmp_path):
    old = tmp_path / "old"
    (old / "sgd-s0").mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "config.yaml", "run.json"):
        (old / "sgd-s0" / name).write_text("x")
    (old / "report.md").write_text("r")
    (old / ".checkpoint.pt.abc123.tmp").write_text("half")  # a write that was killed
    with RunDir(old, "compare", overwrite=True) as d:
        d.start()
    assert sorted(p.name for p in old.iterdir()) == [MARKER]
    # config.yaml and run.json alone are no run of samkit's (nothing it writes as a result)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.yaml").write_text("mine")
    (lone / "run.json").write_text("{}")
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(FileExistsError, match="did not write"):
            RunDir(lone, "train", **kwargs)
    assert (lone / "config.yaml").read_text() == "mine"


# ------------------------------------------------------------------ (2) names and the out-dir


@pytest.mark.parametrize("command", sorted(QUICK))
def test_names_stay_inside_the_out_dir(tmp_path, command, capsys):
    out = tmp_path / "runs"
    for name in ("../escape", str(tmp_path / "abs"), "..", ".", "a/b"):
        rc = main([*QUICK[command], "--out-dir", str(out), "--name", name])
        assert rc == 2, name
        assert "Invalid name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even runs/


@pytest.mark.parametrize("command", sorted(QUICK))
def test_an_existing_folder_of_the_users_is_refused_without_overwrite(tmp_path, command, capsys):
    before = user_folder(tmp_path / "X")
    assert main([*QUICK[command], "--out-dir", str(tmp_path), "--name", "X"]) == 2
    assert "samkit did not write" in capsys.readouterr().err
    assert snapshot(tmp_path / "X") == before
    assert not (tmp_path / "X" / MARKER).exists() and not (tmp_path / "X" / LOCK).exists()


def test_a_symbolic_link_is_not_a_run_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="symbolic link"):
        RunDir(tmp_path / "runs" / "link", "eos")
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ------------------------------------------------------------------ (3) nothing before the checks


def test_a_refused_compare_writes_nothing(tmp_path, capsys):
    argv = [*QUICK["compare"], "--out-dir", str(tmp_path), "--name", "c", "--quiet"]
    assert main(argv) == 0
    before = snapshot(tmp_path / "c")
    again = [*QUICK["compare"][:-4], "--seeds", "1", "--equal-budget", "none", "--out-dir",
             str(tmp_path), "--name", "c", "--quiet"]  # other settings, same name
    assert main(again) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(tmp_path / "c") == before  # config.yaml and summary.json still agree


# ------------------------------------------------------------------ (4) the lock

HOLD = """
import sys, time
from pathlib import Path
from samkit.train.rundir import RunLock
folder, go, done = map(Path, sys.argv[1:4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    lock = RunLock(folder)
    print("held", flush=True)
except FileExistsError:
    print("refused", flush=True)
while not done.exists():  # hold it until every process has tried
    time.sleep(0.01)
"""


@pytest.mark.slow
def test_many_processes_starting_at_once_hold_the_lock_once(tmp_path):
    folder, go, done = tmp_path / "run", tmp_path / "go", tmp_path / "done"
    folder.mkdir()
    for trial in range(4):
        go.unlink(missing_ok=True)
        done.unlink(missing_ok=True)
        if trial % 2:  # the empty lock file of a process killed before it wrote its name
            (folder / LOCK).write_bytes(b"")
        procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(go), str(done)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(12)]
        try:
            assert all(p.stdout.readline().strip() == "ready" for p in procs)
            go.touch()
            answers = [p.stdout.readline().strip() for p in procs]
        finally:
            done.touch()
            for p in procs:
                p.wait(timeout=60)
        assert sorted(answers) == ["held"] + ["refused"] * 11, (trial, answers)


@pytest.mark.slow  # spawns a process
def test_a_lock_is_never_taken_from_a_live_owner_even_before_it_wrote_its_name(tmp_path):
    # the owner has locked the file and not yet written its pid: the file is empty
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(tmp_path / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (tmp_path / LOCK).read_bytes() == b""
        with pytest.raises(FileExistsError, match="in use by another process"):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path) as lock:  # its process is gone: the kernel has dropped its lock
        assert lock.held and json.loads((tmp_path / LOCK).read_text())["pid"] > 0


# ------------------------------------------------------------------ a failed start and its retry


def test_a_failed_start_leaves_nothing_in_the_way_of_the_retry(tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in IDX_NAMES:
        (corrupt / name).write_bytes(b"not an idx file")
    out = tmp_path / "runs"
    eos = ["eos", "--subset", "100", "--steps", "4", "--every", "2", "--rho", "--out-dir",
           str(out), "--name", "e", "--quiet"]  # --rho with no radius: the GD run only
    assert main([*eos, "--dataset", "fashion-mnist", "--data-dir", str(corrupt)]) == 2
    capsys.readouterr()
    assert not (out / "e").exists()  # the folder it made is gone
    assert main([*eos, "--dataset", "digits"]) == 0, capsys.readouterr().err
    assert (out / "e" / "report.md").is_file()


def test_a_run_that_fails_before_its_first_result_does_not_block_the_retry(tmp_path, capsys,
                                                                           monkeypatch):
    import samkit.experiments.eos as eos

    real = eos.train_run

    def broken(*args, **kwargs):
        raise ValueError("the first run could not start")

    out = tmp_path / "runs"
    argv = [*QUICK["eos"], "--out-dir", str(out), "--name", "e", "--quiet"]
    monkeypatch.setattr(eos, "train_run", broken)
    assert main(argv) == 2
    assert "could not start" in capsys.readouterr().err
    assert (out / "e" / "config.json").is_file()  # its settings, written at the start
    monkeypatch.setattr(eos, "train_run", real)
    assert main(argv) == 0, capsys.readouterr().err  # the retry, without --overwrite
    assert (out / "e" / "report.md").is_file()
