"""MkDocs hooks of the samkit site.

The math (``$...$`` and ``$$...$$`` in the pages, ``.. math::`` in the docstrings through
docs/griffe_rst.py) is turned into MathML when the site is built: browsers render MathML
natively, so the site needs no JavaScript math library and no network. A formula latex2mathml
cannot convert fails the build, naming the page.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
DISPLAY = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def _mathml(latex: str, display: str, page) -> str:
    tex = html.unescape(latex).strip()
    try:
        return convert(tex, display=display)
    except Exception as error:  # any conversion error: name the formula and the page
        raise ValueError(
            f"{page.file.src_path}: cannot render the formula {tex!r}: {error}") from error


def on_page_content(content: str, page, config, files) -> str:
    content = DISPLAY.sub(
        lambda m: f'<div class="math-display">{_mathml(m.group(1), "block", page)}</div>', content)
    return INLINE.sub(lambda m: _mathml(m.group(1), "inline", page), content)
