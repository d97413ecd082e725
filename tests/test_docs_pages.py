"""Every code block of every page of the documentation site (docs/**/*.md) works as written,
by the rules of tests/snippets.py (shared with tests/test_readme.py): python blocks executed on
their own, bash lines checked (samkit commands parsed by samkit's parser, make targets, pip
extras, script paths), yaml and json blocks loaded, values stated in comments checked, and every
``samkit.name`` a page mentions exists. Pages added later are picked up by the glob."""

from __future__ import annotations

import pytest
from snippets import (
    ROOT,
    SHOWN_ONLY,
    check_bash_block,
    check_data_block,
    markdown_blocks,
    missing_names,
    python_param,
    run_python_block,
    skip_reason,
)

PAGES = sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = [b for page in PAGES for b in markdown_blocks(page)]
KNOWN = ("python", "bash", "yaml", "json", *SHOWN_ONLY)


def _id(block) -> str:
    return f"{block.path.relative_to(ROOT / 'docs').with_suffix('')}-{block.id}"


def test_pages_have_blocks_of_known_kinds():
    assert PAGES and any(b.lang == "python" for b in BLOCKS)
    other = [f"{b.where} ({b.lang or 'no language'})" for b in BLOCKS if b.lang not in KNOWN]
    assert not other, f"blocks this test does not check (allowed: {KNOWN}): {other}"
    skipped = {b.where: skip_reason(b) for b in BLOCKS if skip_reason(b)}  # known directives
    print(f"docs blocks: {len(BLOCKS)} in {len(PAGES)} pages, skipped: {skipped}")
    assert len(skipped) <= 3, f"too many docs blocks skipped: {skipped}"


@pytest.mark.parametrize("block", [python_param(b, _id(b)) for b in BLOCKS
                                   if b.lang == "python"])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    run_python_block(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", [pytest.param(b, id=_id(b)) for b in BLOCKS
                                   if b.lang == "bash"])
def test_bash_block_commands_parse(block, tmp_path, monkeypatch):
    check_bash_block(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", [pytest.param(b, id=_id(b)) for b in BLOCKS
                                   if b.lang in ("yaml", "json")])
def test_data_block_loads(block):
    check_data_block(block)


@pytest.mark.parametrize("page", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES])
def test_page_names_exist(page):
    missing = missing_names(page.read_text(encoding="utf-8"))
    assert not missing, f"{page.relative_to(ROOT)} names what samkit does not have: {missing}"
