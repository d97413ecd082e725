"""Every code block of README.md works as written: what a user copies runs.

The rules (python blocks executed, bash lines parsed by samkit's parser, stated values checked,
directives ``<!-- readme-test: skip (needs CUDA) -->`` and ``<!-- readme-test: setup: samkit
... -->``) are those of tests/snippets.py, shared with tests/test_docs_pages.py (the site's
pages). Here also: every ``samkit.name`` the README mentions exists, and the README's closure
loop and its explicit two-pass loop end at the same weights, bit for bit.
"""

from __future__ import annotations

import re

import pytest
import torch
from snippets import (
    ROOT,
    check_bash_block,
    markdown_blocks,
    missing_names,
    parse_samkit,
    python_param,
    run_python,
    run_python_block,
    samkit_argv,
    skip_reason,
)

README = ROOT / "README.md"
BLOCKS = markdown_blocks(README)
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def test_readme_has_blocks_of_known_kinds():
    """A block in another language would go untested: only python and bash are checked."""
    assert PYTHON and BASH
    other = [f"README.md:{b.line} ({b.lang or 'no language'})" for b in BLOCKS
             if b.lang not in ("python", "bash")]
    assert not other, f"blocks this test does not check: {other}"
    for block in BLOCKS:
        skip_reason(block)  # every directive is a known one


@pytest.mark.parametrize("block", [python_param(b) for b in PYTHON])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    run_python_block(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BASH])
def test_bash_block_commands_parse(block, tmp_path, monkeypatch):
    check_bash_block(block, tmp_path, monkeypatch)


def test_setup_commands_parse():
    for block in BLOCKS:
        if block.directive and block.directive.startswith("setup:"):
            argv = samkit_argv(block.directive[len("setup:"):].strip())
            assert argv is not None, f"README.md:{block.line}: a setup must be a samkit command"
            parse_samkit(argv, f"README.md:{block.line - 1} (setup)")


def test_skips_are_few_and_named():
    """Skipped blocks are visible: each is named here with its reason (and in pytest's skip
    summary); only what cannot run on a CPU without a network may be skipped."""
    skipped = {f"README.md:{b.line}": skip_reason(b) for b in BLOCKS if skip_reason(b)}
    print(f"README blocks: {len(PYTHON)} python run, {len(BASH)} bash parsed, "
          f"{len(skipped)} skipped {skipped}")
    assert len(skipped) <= 2, f"too many README blocks skipped: {skipped}"


def test_readme_names_exist():
    """Every ``samkit.a.b`` the README mentions (prose and code) can be imported or looked up."""
    missing = missing_names(README.read_text(encoding="utf-8"))
    assert not missing, f"README names that samkit does not have: {missing}"


def test_readme_is_a_front_page():
    """The README is the front page: short, for users; the details are on the site."""
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 12_000, f"README.md has {len(text)} characters (at most 12,000)"
    assert not re.search(r"\bissues?\b", text, re.I), "README.md speaks of issues"
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / page).is_file(), f"README.md links to {page}, which does not exist"


def _python_with(marker: str):
    found = [b for b in PYTHON if marker in b.code]
    assert found, f"no README python block with {marker!r}"
    return found[0]


def test_closure_loop_equals_explicit_loop():
    """The README's quickstart (``opt.step(closure)`` in a loop) and its explicit two-pass loop
    (``opt.zero_grad(); ...; first_step(); ...; second_step()``), from the same seed, end at the
    same weights and optimizer state, bit for bit."""
    closure_block = _python_with("opt.step(closure)")
    explicit_block = _python_with("opt.first_step()")
    for block in (closure_block, explicit_block):
        assert re.search(r"^for step in range\(10\):", block.code, re.M), (
            f"README.md:{block.line}: expected a loop of 10 steps"
        )
    closure_ns = run_python(closure_block)
    explicit_ns = run_python(explicit_block)
    a, b = closure_ns["model"].state_dict(), explicit_ns["model"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the two forms"
    sa = closure_ns["opt"].state_dict()["state"]
    sb = explicit_ns["opt"].state_dict()["state"]
    for i in sa:
        for k, v in sa[i].items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb[i][k]), f"optimizer state {i}.{k} differs"
    # the equality is not vacuous: one step fewer ends elsewhere
    fewer = run_python(closure_block, code=closure_block.code.replace("range(10)", "range(9)"))
    assert not all(torch.equal(fewer["model"].state_dict()[k], a[k]) for k in a)
