import os
import sys
from pathlib import Path

# One BLAS thread as well as one torch thread (below): numpy's OpenBLAS pool spins for
# milliseconds per call on tiny matrices when the cores are busy. Set before numpy loads; the
# spawned workers of the slow tests inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # numpy may already be loaded (by a plugin): limit its pool where it runs
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:  # scikit-learn's dependency; without it the environment variables rule
    pass

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tests work on tiny tensors, where waking a thread pool for every op
    costs more than it saves (and CI machines have few cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
