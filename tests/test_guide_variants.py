"""docs/guides/variants.md works as written: every ``python`` block runs on its own (a fresh
namespace, a temporary directory, a time limit) and every ``bash`` line is a samkit command that
samkit's parser accepts (``samkit list`` is also run), with test_readme.py's checks."""

from pathlib import Path

import pytest
import torch
from test_readme import (
    check_samkit_line,
    readme_blocks,
    registry_restored,
    samkit_argv,
    shell_lines,
    time_limit,
)

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "variants.md"
BLOCKS = readme_blocks(GUIDE.read_text(encoding="utf-8"))


def test_the_guide_has_python_and_bash_blocks():
    assert {b.lang for b in BLOCKS} == {"python", "bash"}
    assert sum(b.lang == "python" for b in BLOCKS) >= 4


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS
                                   if b.lang == "python"])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compiled = compile("\n" * block.line + block.code, str(GUIDE), "exec")
    torch.manual_seed(0)
    with time_limit(60, f"{GUIDE.name}:{block.line}"), registry_restored():
        exec(compiled, {"__name__": "__guide__"})


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if b.lang == "bash"])
def test_bash_lines_are_samkit_commands_that_parse(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for line in shell_lines(block.code):
        argv = samkit_argv(line)
        assert argv is not None, f"{GUIDE.name}:{block.line}: not a samkit command: {line}"
        check_samkit_line(argv, f"{GUIDE.name}:{block.line}")
