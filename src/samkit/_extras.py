"""Optional dependencies: one place that names the extra a missing package comes with.

samkit's core needs torch and numpy only. The rest comes with an extra of ``pyproject.toml``
(``pip install 'samkit[experiments]'``); :func:`require` checks, before any work starts, that
the modules a feature needs can be imported and otherwise raises :class:`MissingExtra`, an
``ImportError`` whose message names the feature, the missing packages and the pip command::

    from samkit._extras import require
    require("experiments", "yaml", "matplotlib", what="samkit compare")
    # ImportError: samkit compare needs matplotlib, which is not installed:
    #   pip install 'samkit[experiments]' (or pip install matplotlib)

The CLI prints it as one line (``samkit: error: ...``, exit status 2).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

__all__ = ["EXTRAS", "MissingExtra", "missing", "require", "require_command", "require_dataset"]

# The extras of pyproject.toml: the import names of what each brings.
EXTRAS: dict[str, tuple[str, ...]] = {
    "curvature": ("scipy",),
    "experiments": ("scipy", "sklearn", "matplotlib", "yaml", "tqdm"),
    "tensorboard": ("tensorboard",),
    "lightning": ("lightning",),
    "huggingface": ("transformers", "accelerate"),
}

# import name -> the name pip installs it under (where they differ)
PACKAGES = {"yaml": "pyyaml", "sklearn": "scikit-learn"}

# what each subcommand needs from the experiments extra before it starts: config.yaml (every
# run writes its resolved config), the report's figures, Kendall's tau
COMMANDS: dict[str, tuple[str, ...]] = {
    "train": ("yaml",),
    "compare": ("yaml", "matplotlib"),
    "eos": ("yaml", "matplotlib"),
    "correlate": ("yaml", "matplotlib", "scipy"),
}

# data sets that need a package of an extra (the rest need torch and numpy only)
DATASET_MODULES = {"digits": ("experiments", "sklearn")}


class MissingExtra(ImportError):
    """An optional dependency is not installed. ``extra``: the samkit extra that brings it;
    ``modules``: the import names that failed; ``what``: the feature that needs them."""

    def __init__(self, extra: str, modules: Iterable[str], what: str) -> None:
        self.extra = extra
        self.modules = tuple(modules)
        self.what = what
        packages = [PACKAGES.get(m, m) for m in self.modules]
        which = (f"{packages[0]}, which is" if len(packages) == 1
                 else f"{', '.join(packages)}, which are")
        super().__init__(
            f"{what} needs {which} not installed: pip install 'samkit[{extra}]' "
            f"(or pip install {' '.join(packages)})",
            name=self.modules[0] if self.modules else None,
        )


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported (imported here if they can be)."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def require(extra: str, *modules: str, what: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` when one of ``modules`` (import names, e.g.
    ``"yaml"``; default: all of the extra's) cannot be imported; ``what`` names the feature
    that needs them (``"samkit compare"``, ``"HessianOperator.to_scipy()"``)."""
    if extra not in EXTRAS:
        raise ValueError(f"Invalid extra: {extra!r} (allowed: {', '.join(EXTRAS)})")
    lacking = missing(*(modules or EXTRAS[extra]))
    if lacking:
        raise MissingExtra(extra, lacking, what)


def require_dataset(dataset: str, what: str | None = None) -> None:
    """:func:`require` for what the data set ``dataset`` needs (scikit-learn for digits)."""
    need = DATASET_MODULES.get(str(dataset).lower())
    if need is not None:
        extra, *modules = need
        require(extra, *modules, what=what or f"the {dataset!r} data set")


def require_command(command: str, progress: bool = False) -> None:
    """:func:`require` for ``samkit <command>`` (:data:`COMMANDS`), called before it reads a
    config or trains; ``progress``: a progress bar will be drawn (tqdm) when stderr is a
    terminal."""
    import sys

    modules = COMMANDS.get(command, ())
    if progress and sys.stderr.isatty():
        modules = (*modules, "tqdm")
    if modules:
        require("experiments", *modules, what=f"samkit {command}")
