"""The real Fashion-MNIST files for the slow real-data tests.

Locally, a test that needs them is skipped when they are missing. CI sets
``SAMKIT_REQUIRE_REAL_DATA=1`` (``.ci/run`` installs Debian's ``dataset-fashion-mnist``), and
then a missing file fails the test instead: a real-data check never disappears silently there.
"""

from __future__ import annotations

import os

import pytest


def require_fashion_mnist() -> None:
    from samkit.data import DataNotFoundError, resolve_data_dir

    try:
        resolve_data_dir("fashion-mnist")
    except DataNotFoundError as err:
        if os.environ.get("SAMKIT_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"SAMKIT_REQUIRE_REAL_DATA=1 but Fashion-MNIST is missing: {err}")
        pytest.skip(f"Fashion-MNIST is missing (apt-get install dataset-fashion-mnist): {err}")
