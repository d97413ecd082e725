"""The documentation site builds with warnings as errors and works in a browser.

* ``mkdocs build --strict`` (what ``make docs`` runs) succeeds: no broken link or anchor, no
  missing API object, no docstring that does not parse, no formula that does not convert;
* headless Chromium (Debian's ``chromium``, driven over the DevTools protocol by
  tests/docs/browser.py) opens the home page, a guide and the API page of ``SAM``: none logs a
  console error or an uncaught exception or fails a request, each has the search box, the guide
  and the API page show rendered math (MathML), the API page shows SAM's signature; a search
  for "Lanczos" finds results. Screenshots go to ``$SAMKIT_DOCS_SCREENSHOTS`` (default
  ``site-screenshots/`` in the repository) for a person to look at.

Both start processes, so both are slow tests. Where the docs tools or chromium are not installed
the tests skip, unless ``SAMKIT_REQUIRE_DOCS=1`` (set by .ci/run), which makes a missing tool a
failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "docs"))  # tests/docs/browser.py

from browser import Browser, chromium_path, serve  # noqa: E402

REQUIRED = os.environ.get("SAMKIT_REQUIRE_DOCS") == "1"
PAGES = {  # name: (path, what the page must show)
    "home": ("", "Sharpness-aware training"),
    "guide": ("guides/curvature/", "what `converged` means"),
    "sam-api": ("reference/optim/#samkit.optim.SAM", "base_optimizer"),
}


def need(what: str, present: bool) -> None:
    if not present:
        if REQUIRED:
            pytest.fail(f"{what} is not installed (SAMKIT_REQUIRE_DOCS=1)")
        pytest.skip(f"{what} is not installed (pip install -e '.[docs]', apt-get install chromium)")


def build_site(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    need("mkdocs (the docs extra)", importlib.util.find_spec("mkdocs") is not None)
    out = tmp_path_factory.mktemp("site")
    result = build_site(out)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_site_builds_strictly(site):
    for page in ("index.html", "getting-started/index.html", "reference/optim/index.html",
                 "search/search_index.json"):
        assert (site / page).is_file(), f"{page} is missing from the built site"
    api = (site / "reference/optim/index.html").read_text(encoding="utf-8")
    assert 'id="samkit.optim.SAM"' in api and "<math" in api
    assert ".. math::" not in api and ":math:`" not in api, "reStructuredText left in the API"


@pytest.mark.slow
def test_site_in_a_browser(site, tmp_path):
    need("chromium", chromium_path() is not None)
    need("websocket-client (the docs extra)", importlib.util.find_spec("websocket") is not None)
    shots = Path(os.environ.get("SAMKIT_DOCS_SCREENSHOTS", ROOT / "site-screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    problems = []
    with serve(site) as base, Browser(tmp_path / "profile") as browser:
        for name, (path, text) in PAGES.items():
            errors = browser.open(f"{base}/{path}")
            problems += [f"{name}: {e}" for e in errors]
            if not browser.evaluate("!!document.querySelector('input.md-search__input')"):
                problems.append(f"{name}: no search box")
            body = browser.evaluate("document.body.innerText")
            if text.replace("`", "") not in body:
                problems.append(f"{name}: the page does not show {text!r}")
            if name != "home" and not browser.evaluate("document.querySelectorAll('math').length"):
                problems.append(f"{name}: no rendered math")
            browser.screenshot(shots / f"{name}.png")
        # the search works: type into the box, results appear
        browser.open(f"{base}/")
        browser.evaluate("""(() => { const t = document.querySelector('#__search');
            if (t) { t.checked = true; t.dispatchEvent(new Event('change', {bubbles: true})); }
            const i = document.querySelector('input.md-search__input');
            i.focus(); i.value = 'Lanczos'; i.dispatchEvent(new Event('input', {bubbles: true}));
            i.dispatchEvent(new KeyboardEvent('keyup', {bubbles: true})); })()""")
        found = 0
        for _ in range(50):
            browser._pump(0.2)
            found = browser.evaluate("document.querySelectorAll('.md-search-result__item').length")
            if found:
                break
        if not found:
            problems.append("search: no result for 'Lanczos'")
        browser.screenshot(shots / "search.png")
    assert not problems, "\n".join(problems)
    assert sorted(p.name for p in shots.glob("*.png")) >= ["guide.png", "home.png", "sam-api.png"]
