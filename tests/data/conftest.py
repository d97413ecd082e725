"""Fixtures for the data tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from samkit.data import paths

sys.path.insert(0, str(Path(__file__).parent))  # tests/data/dataformats.py


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data anywhere samkit looks: $SAMKIT_DATA unset, HOME and the working directory empty,
    the system folder (/usr/share/datasets) redirected to an empty one.

    The tests' data sets are tiny fakes, not the official files: $SAMKIT_VERIFY_DATA=0 turns off
    load_dataset's split-size and checksum verification (tests of it set it back)."""
    monkeypatch.delenv("SAMKIT_DATA", raising=False)
    monkeypatch.setenv("SAMKIT_VERIFY_DATA", "0")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(paths, "SYSTEM_DATA_ROOT", system)
    return tmp_path
