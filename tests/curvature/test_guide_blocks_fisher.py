"""Every python block of docs/guides/curvature-blocks-fisher.md runs as written (fresh
namespace, fixed seed) and every samkit.curvature name it imports exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "curvature-blocks-fisher.md"
TEXT = GUIDE.read_text(encoding="utf-8")
BLOCKS = [(TEXT[: m.start()].count("\n") + 1, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```$", TEXT, re.S | re.M)]


def test_the_guide_has_its_blocks():
    assert len(BLOCKS) == 4


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"L{line}" for line, _ in BLOCKS])
def test_block_runs(line, code):
    torch.manual_seed(0)
    compiled = compile("\n" * line + code, str(GUIDE), "exec")  # tracebacks: the guide's lines
    exec(compiled, {"__name__": "__guide__"})
