import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/curvature/curvature_helpers.py


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run thousands of tiny products: one thread avoids the cost of waking a
    pool for each op (and of fighting other jobs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
