import gc
import os
import sys
from pathlib import Path

# One BLAS thread as well as one torch thread (below): numpy's OpenBLAS pool spins for
# milliseconds per call on tiny matrices when the cores are busy. Set before numpy loads; the
# spawned workers of the slow tests inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

# torch is imported in the fixtures, not here: the pytest-xdist controller (make fast) loads
# this file too, and starts its workers only after; importing torch here delayed them ~1.5 s.

try:  # numpy may already be loaded (by a plugin): limit its pool where it runs
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:  # scikit-learn's dependency; without it the environment variables rule
    pass

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


def pytest_collection_finish(session):
    """Less time in Python's cyclic garbage collector (about 8 % of the fast loop, in ~30 full
    collections of half a million objects each): what is alive after collection (torch, samkit,
    the test modules) stays alive, so it is moved out of the collector's sight (``gc.freeze``),
    and a full collection waits for 100 middle-generation ones instead of 10. Garbage is still
    collected; only the timing of the full passes changes (no test relies on it)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_the_modules_before_left():
    """The same at the start of every test module: what the modules before left alive (the
    libraries imported on first use: matplotlib, scipy, transformers, Lightning; the data
    caches) is moved out of the collector's sight, so that the full collections of the tests
    after (and the ``gc.collect`` calls of accelerate and of pytest's session end) do not
    walk it again and again: ~45 % less time in the collector. A test's own garbage is still
    collected (nothing it creates is frozen while it runs)."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup`` (make fast) as pytest-xdist means it: the tests marked
    ``xdist_group("name")`` on one worker. xdist tells its scheduler by renaming their node ids
    to ``<id>@name`` (``item._nodeid``, in its worker's hook); pytest 9 keeps a node's id in
    ``item._id`` instead, so that rename was lost and the groups were spread over both workers
    (both imported transformers and Lightning, and test_tuned's module fixture ran twice).
    Where xdist's rename did not take, it is made here."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers only
        return
    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        if not names:
            continue
        suffix = "@" + "_".join(sorted(names))
        if item.nodeid.endswith(suffix):
            continue  # xdist's own rename took (pytest < 9)
        if hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix


def _accelerators(torch) -> bool:
    """Can this torch seed a device besides the CPU (CUDA, XPU, MTIA)?"""
    return any(getattr(torch, name).is_available() for name in ("cuda", "xpu", "mtia")
               if hasattr(torch, name))


@pytest.fixture(autouse=True, scope="session")
def _cpu_manual_seed():
    """``torch.manual_seed`` as it behaves on this machine, without its cost where there is no
    accelerator: there it seeds the CPU generator and also queues a CUDA, an XPU and an MTIA
    seed for devices that cannot appear, each queued with a formatted call stack (about 3 ms
    per call at pytest's stack depth; the tests and the trainer call it ~1,700 times, ~5 s of
    the fast loop's CPU time). Where an accelerator is available torch's own is kept."""
    import torch

    if _accelerators(torch):
        yield
        return
    original = torch.manual_seed

    def manual_seed(seed):
        return torch.default_generator.manual_seed(int(seed))

    torch.manual_seed = manual_seed
    try:
        yield
    finally:
        torch.manual_seed = original


@pytest.fixture(autouse=True)
def _seed(_cpu_manual_seed):
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tests work on tiny tensors, where waking a thread pool for every op
    costs more than it saves (and CI machines have few cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Programs a fast test may run all the same: the trainer records the git commit of the checkout
# (samkit.train.rundir.versions), a few milliseconds, no Python and no samkit in it.
ALLOWED_PROGRAMS = {"git"}


@pytest.fixture(autouse=True)
def _no_process_outside_slow(request, monkeypatch):
    """The fast loop (``-m "not slow"``) spawns no process: a test that starts a Python (a
    subprocess, a multiprocessing or pytest worker, torchrun, the samkit command) must be marked
    ``slow``."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import multiprocessing.process
    import subprocess

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow "
                           "(the fast loop, pytest -m 'not slow', spawns none)")

    execute_child = subprocess.Popen._execute_child

    def checked(self, args, *rest, **kwargs):
        program = args if isinstance(args, (str, bytes)) else args[0]
        if Path(str(program).split()[0]).name not in ALLOWED_PROGRAMS:
            refuse()
        return execute_child(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", checked)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    # a bare fork (os.fork, os.forkpty, pty.fork, os.spawn*: all through these two); the
    # torch.compile workers and process pools go through subprocess or multiprocessing above
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "forkpty", refuse)


@pytest.fixture
def one_rank():
    """A gloo process group of one rank in this process (no other process is started): the
    distributed code paths, in the fast loop."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
