"""The API reference documents the whole public API: every name in the ``__all__`` of samkit's
public modules has its entry (a ``::: dotted.path`` line of docs/reference/*.md naming that object,
under any of its import paths, or its whole module)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
PUBLIC_MODULES = ("samkit", "samkit.curvature", "samkit.optim", "samkit.train")
ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.M)


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _documented() -> list:
    objects = []
    for page in sorted(REFERENCE.glob("*.md")):
        for path in ENTRY.findall(page.read_text(encoding="utf-8")):
            obj = _resolve(path)
            objects.append(obj)
            if inspect.ismodule(obj):  # a whole module: its public members are documented
                objects.extend(getattr(obj, n) for n in getattr(obj, "__all__", ()))
    return objects


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_a_reference_entry(module):
    documented = _documented()
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__
               if not (any(getattr(mod, name) is obj for obj in documented)
                       or getattr(mod, name).__name__ in PUBLIC_MODULES)]  # a page of its own
    assert not missing, (f"{module}: not in docs/reference/*.md (add a '::: {module}.NAME' "
                         f"entry): {', '.join(missing)}")


def test_every_entry_resolves():
    assert len(_documented()) > 50
