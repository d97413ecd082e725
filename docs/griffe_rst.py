"""A Griffe extension: samkit's docstrings are Google style with a few reStructuredText
constructs, which this rewrites into the Markdown that mkdocstrings renders.

* ``.. math::`` followed by an indented block becomes a ``$$ ... $$`` display block,
* ``:math:`x``` becomes ``$x$`` (pymdownx.arithmatex picks both up; docs/hooks.py turns them into
  MathML),
* ``text::`` and its indented block become the text and a fenced code block,
* ``a, b: what both are`` in an Args section becomes one entry per name,
* the cross-reference roles ``:func:`x```, ``:class:`x```, ``:meth:``, ``:attr:``, ``:mod:``,
  ``:data:`` become code spans (``~a.b`` shows ``b``, as in Sphinx).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

MATH_ROLE = re.compile(r":math:`([^`]+)`")
XREF_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`~?([^`]+)`")


def _xref(match: re.Match) -> str:
    target = match.group(0)
    name = match.group(1)
    if "`~" in target:
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _math_blocks(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            indent = line[: len(line) - len(line.lstrip())]
            inline = stripped[len(".. math::"):].strip()
            body = [inline] if inline else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            while body and not body[0]:
                body.pop(0)
            # one display per blank-line-separated equation, as Sphinx does
            equations, current = [], []
            for b in body:
                if b:
                    current.append(b)
                elif current:
                    equations.append(current)
                    current = []
            if current:
                equations.append(current)
            for eq in equations:
                out += ["", f"{indent}$$", *(f"{indent}{e}" for e in eq), f"{indent}$$", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:, \*{0,2}\w+)+):\s*(.*)$")
SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")


def _split_grouped_params(text: str) -> str:
    """``a, b: what both are`` in an Args section (Google style has one name per entry) becomes
    ``a: what both are`` and ``b: as `a`.``, so that each name matches the signature."""
    lines, out, i, in_args = text.split("\n"), [], 0, False
    while i < len(lines):
        line = lines[i]
        if SECTION.match(line):
            in_args = True
        elif line.strip() and not line.startswith((" ", "\t")):
            in_args = False
        m = GROUPED.match(line) if in_args else None
        if m is None:
            out.append(line)
            i += 1
            continue
        indent, names = m.group(1), m.group(2).split(", ")
        out.append(f"{indent}{names[0]}: {m.group(3)}")
        i += 1
        while i < len(lines) and lines[i].strip() and (
                len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            out.append(lines[i])
            i += 1
        out += [f"{indent}{name}: as `{names[0]}`." for name in names[1:]]
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    """``Some text::`` followed by an indented block: the text ends in ``:`` and the block is a
    fenced Python block (``Example::`` alone becomes an italic *Example:*, not a section)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped.endswith("::") or stripped.startswith(".. "):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        lead = stripped[:-1]
        out.append(f"{indent}*{lead}*" if lead.rstrip(":").split(" ")[0] in ("Example", "Examples")
                   and " " not in lead.strip() else f"{indent}{lead}")
        i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        width = min(len(b) - len(b.lstrip()) for b in body if b.strip()) if body else 0
        out += ["", f"{indent}```python", *(f"{indent}{b[width:]}" for b in body if True),
                f"{indent}```", ""]
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _literal_blocks(text)
    text = _split_grouped_params(text)
    text = _math_blocks(text)
    text = MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return XREF_ROLE.sub(_xref, text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
