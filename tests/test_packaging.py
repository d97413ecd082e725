"""``python -m build`` makes a wheel and an sdist of samkit that install into a fresh virtual
environment and import there, with the version of its one source (``samkit.__version__``).

The fresh environment sees torch, numpy, pip and setuptools through a ``.pth`` file pointing at
this interpreter's site-packages (no download of torch); samkit itself is installed from the built
files only (``--no-deps --no-index``). Builds and installs start processes: slow tests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SAMKIT_REQUIRE_DOCS") == "1"


def run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # samkit from the install
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert result.returncode == 0, (
        f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def version_of_source() -> str:
    text = (ROOT / "src" / "samkit" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    if importlib.util.find_spec("build") is None:
        if REQUIRED:
            pytest.fail("the build package is not installed (SAMKIT_REQUIRE_DOCS=1)")
        pytest.skip("the build package is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools) of this environment, nothing downloaded
    run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
         "--outdir", str(out), str(ROOT)], cwd=out)
    return out


def fresh_venv(path: Path) -> Path:
    # --without-pip: pip and setuptools come from this environment through the .pth file below
    # (a venv's own bundled setuptools may predate pyproject.toml's SPDX license string)
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               cwd=path).strip()
    (Path(site) / "_samkit_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def check_installed(python: Path, cwd: Path) -> None:
    out = run([str(python), "-c",
               "import samkit, samkit.optim, samkit.curvature, importlib.metadata as m; "
               "print(samkit.__file__); print(samkit.__version__); print(m.version('samkit'))"],
              cwd=cwd)
    where, version, metadata = out.split()
    assert where.startswith(str(python.parent.parent)), f"samkit imported from {where}"
    assert version == metadata == version_of_source()
    cli = python.parent / "samkit"
    assert version in run([str(cli), "--version"], cwd=cwd)


@pytest.mark.slow
def test_wheel_and_sdist_contents(dist):
    version = version_of_source()
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    assert f"samkit-{version}-" in wheels[0].name and sdists[0].name == f"samkit-{version}.tar.gz"
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "samkit/__init__.py" in names and "samkit/curvature/eigen.py" in names
    assert not [n for n in names if n.startswith(("tests/", "docs/"))], "tests or docs in the wheel"
    with tarfile.open(sdists[0]) as tar:
        members = tar.getnames()
    assert f"samkit-{version}/README.md" in members
    assert f"samkit-{version}/src/samkit/__init__.py" in members


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(dist, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    wheel = next(dist.glob("*.whl"))
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    check_installed(python, tmp_path)


@pytest.mark.slow
def test_sdist_installs_into_a_fresh_venv(dist, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    sdist = next(dist.glob("*.tar.gz"))
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
         str(sdist)], cwd=tmp_path)
    check_installed(python, tmp_path)
