"""Running the code blocks of a Markdown page as a user would copy them: shared by
tests/test_readme.py (README.md) and tests/test_docs_pages.py (every docs/**/*.md page).

* Each fenced ``python`` block is executed as written, on its own (a fresh namespace, a temporary
  working directory, a fixed seed, a time limit): every block defines its own model and data.
* Each ``bash`` line that is a samkit command (``samkit ...``, or ``torchrun ... -m samkit ...``)
  is parsed by samkit's real argparse parser, so a stale flag fails; the cheap ones (``samkit
  list``, ``--help``) are also run. ``make TARGET`` lines must name a Makefile target,
  ``pip install`` lines may install only samkit (from PyPI or ``.``) with extras pyproject.toml
  declares, ``python FILE`` lines must name a file of the repository. Any other command in a bash
  block fails the test until a check for it is added here.
* A ``yaml`` block must load (``yaml.safe_load``), a ``json`` block too (``json.loads``); a
  ``text`` block is shown output, not run.
* A value a ``python`` line states in its comment (``gd_edge(0.05)   # 40.0 = 2/eta``) is checked.
* Every ``samkit.name`` a page mentions exists.

An HTML comment on the line directly above a block controls it (``readme-test:`` or
``docs-test:``, the same meaning):

* ``<!-- docs-test: skip (needs CUDA) -->``: not run, only for what cannot run here (CUDA, a
  download); the skip names the block's line and the reason.
* ``<!-- docs-test: setup: samkit train ... -->``: run this samkit command first in the block's
  working directory (a block that reads a run's directory).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 120  # per block; the slowest (Hugging Face, Lightning) take 5-30 s on a busy CPU
DIRECTIVE = re.compile(r"^<!--\s*(?:readme|docs)-test:\s*(.*?)\s*-->$")
SKIP = re.compile(r"^skip \((needs (CUDA|a GPU|a download)[^)]*)\)$")
SLOW = ("import lightning", "from transformers", "torch.compile")  # the marker's meaning
CHEAP_COMMANDS = {"list"}
SHOWN_ONLY = ("text",)  # output shown to the reader: nothing to run


@dataclass(frozen=True)
class Block:
    path: Path
    lang: str
    line: int  # the page line of the opening fence
    code: str
    directive: str | None  # the readme-test / docs-test comment directly above, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def markdown_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown page, with the directive on the line above each."""
    text = path.read_text(encoding="utf-8") if text is None else text
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        opening = lines[i].strip()
        if not opening.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path.name}:{i + 1}: a code fence that is never closed")
        above = DIRECTIVE.match(lines[i - 1].strip()) if i else None
        blocks.append(Block(path, opening[3:].strip().split(" ")[0], i + 1,
                            "\n".join(lines[i + 1:end]) + "\n",
                            above.group(1) if above else None))
        i = end + 1
    return blocks


def skip_reason(block: Block) -> str | None:
    if block.directive is None or block.directive.startswith("setup:"):
        return None
    m = SKIP.match(block.directive)
    if m is None:
        raise ValueError(f"{block.where}: unknown or unjustified docs-test directive "
                         f"{block.directive!r} (allowed: 'skip (needs CUDA|a GPU|a download ...)'"
                         ", 'setup: samkit ...')")
    return m.group(1)


def python_param(block: Block, id: str | None = None):
    marks = [pytest.mark.slow] if any(s in block.code for s in SLOW) else []
    return pytest.param(block, id=id or block.id, marks=marks)


# ----------------------------------------------------------------------------- running a block


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    def expired(signum, frame):
        raise TimeoutError(f"{what} ran for more than {seconds} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


@contextlib.contextmanager
def registry_restored():
    """A block that registers an ascent (the "a new ascent" example) leaves the registry as it
    found it, so the other tests see the same names."""
    from samkit.optim import registry

    optimizers, ascents = set(registry.list_optimizers()), set(registry.list_ascents())
    try:
        yield
    finally:
        for name in (set(registry.list_optimizers()) - optimizers) | (
            set(registry.list_ascents()) - ascents
        ):
            registry.unregister(name)


def run_python(block: Block, seed: int = 0, code: str | None = None) -> dict:
    """Execute the block as written in a fresh namespace; tracebacks show the page's lines."""
    code = block.code if code is None else code
    namespace = {"__name__": "__snippet__"}
    compiled = compile("\n" * block.line + code, str(block.path), "exec")
    torch.manual_seed(seed)
    with time_limit(TIME_LIMIT_S, block.where), registry_restored():
        exec(compiled, namespace)
    return namespace


def run_python_block(block: Block, tmp_path: Path, monkeypatch) -> dict:
    """What a test of one python block does: skip if marked, the setup command, the block, the
    values its comments state."""
    reason = skip_reason(block)
    if reason:
        pytest.skip(f"{block.where}: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    if block.directive and block.directive.startswith("setup:"):
        from samkit.cli import main

        argv = samkit_argv(block.directive[len("setup:"):].strip())
        assert argv is not None, f"{block.where}: a setup must be a samkit command"
        with time_limit(TIME_LIMIT_S, f"{block.where} setup"):
            assert main(argv) == 0, f"{block.where}: setup `samkit {shlex.join(argv)}`"
    namespace = run_python(block)
    check_stated_values(block, namespace)
    return namespace


def samkit_argv(line: str) -> list[str] | None:
    """The samkit arguments of a shell line, or None when it is not a samkit command."""
    words = shlex.split(line, comments=True)
    if words[:1] == ["samkit"]:
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["samkit"]:  # torchrun / python
        return words[words.index("-m") + 2:]
    return None


def shell_lines(code: str) -> list[str]:
    """The commands of a bash block (comments and blank lines dropped, continuations joined)."""
    joined = code.replace("\\\n", " ")
    return [line for line in joined.split("\n") if shlex.split(line, comments=True)]


def parse_samkit(argv: list[str], where: str):
    from samkit.cli import build_parser

    parser, stderr = build_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            pytest.fail(f"{where}: `samkit {shlex.join(argv)}` is refused by samkit's parser "
                        f"(exit {exit_.code}): {stderr.getvalue().strip()}")
        return None  # --help / --version: printed and exited 0


def check_samkit_line(argv: list[str], where: str) -> None:
    from samkit.cli import main

    args = parse_samkit(argv, where)
    if args is None:
        return
    config = getattr(args, "config", None)
    if config and not Path(config).is_absolute() and not config.startswith("runs/"):
        assert (ROOT / config).is_file(), f"{where}: --config {config} is not in the repository"
    if args.command == "train" and not (config or "").startswith("runs/"):
        # the config it would train with: --set keys and values
        from samkit import config as C

        C.load_config(args.config and str(ROOT / args.config), args.overrides,
                      **C.flag_values(args))
    if args.command in CHEAP_COMMANDS:
        assert main(argv) == 0, f"{where}: `samkit {shlex.join(argv)}` did not exit 0"


def _extras() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed metadata
        from importlib.metadata import metadata

        return set(metadata("samkit").get_all("Provides-Extra") or [])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def check_pip_line(words: list[str], where: str) -> None:
    """``pip install samkit[extras]`` / ``pip install -e ".[extras]"``: samkit alone, with
    extras that pyproject.toml declares."""
    targets = [w for w in words[2:] if not w.startswith("-")]
    assert words[1] == "install" and targets, f"{where}: only `pip install samkit...` is checked"
    for target in targets:
        m = re.fullmatch(r"(samkit|\.)(?:\[([\w,-]+)\])?", target)
        assert m, f"{where}: pip installs {target!r}, not samkit"
        unknown = set((m.group(2) or "").split(",")) - {""} - _extras()
        assert not unknown, f"{where}: extras {sorted(unknown)} are not in pyproject.toml"


def check_bash_block(block: Block, tmp_path: Path, monkeypatch) -> None:
    reason = skip_reason(block)
    if reason:
        pytest.skip(f"{block.where}: {reason}")
    monkeypatch.chdir(tmp_path)
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    for line in shell_lines(block.code):
        where = f"{block.where} `{line.split('#')[0].strip()}`"
        argv = samkit_argv(line)
        words = shlex.split(line, comments=True)
        if argv is not None:
            check_samkit_line(argv, where)
        elif words[0] == "make":
            missing = [t for t in words[1:] if not t.startswith("-") and t not in targets]
            assert not missing, f"{where}: no Makefile target {missing}"
        elif words[0] in ("pip", "pip3") or words[:3] == ["python", "-m", "pip"]:
            check_pip_line(words[2:] if words[0] == "python" else words, where)
        elif words[0] in ("python", "python3") and words[1:2] and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} is not in the repository"
        else:
            pytest.fail(f"{where}: a command this test does not check (add a check for it)")


NUMBER_COMMENT = re.compile(r"^(?P<expr>\S.*?)\s+#\s*(?P<value>-?\d[\d,]*(\.\d+)?)\b")


def check_stated_values(block: Block, namespace: dict) -> None:
    """``expr   # 9.557 = ...``: the expression's value, to the digits shown."""
    for offset, line in enumerate(block.code.split("\n")):
        m = NUMBER_COMMENT.match(line)
        if m is None:
            continue
        try:
            expr = compile(m.group("expr"), "<snippet>", "eval")
        except SyntaxError:  # an assignment or a statement: nothing stated about a value
            continue
        shown = m.group("value").replace(",", "")
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        value = float(eval(expr, namespace))
        assert abs(value - float(shown)) <= 0.5 * 10**-decimals + 1e-12, (
            f"{block.path.name}:{block.line + 1 + offset}: {m.group('expr')} is {value}, "
            f"the comment says {shown}"
        )


def check_data_block(block: Block) -> None:
    """A ``yaml`` or ``json`` block loads."""
    import json

    import yaml

    try:
        if block.lang == "json":
            json.loads(block.code)
        else:
            yaml.safe_load(block.code)
    except (ValueError, yaml.YAMLError) as error:
        pytest.fail(f"{block.where}: the {block.lang} block does not load: {error}")


FILE_SUFFIXES = {"md", "py", "yaml", "json", "png", "toml", "txt"}


def missing_names(text: str) -> list[str]:
    """The ``samkit.a.b`` names of a text that cannot be imported or looked up."""
    names = sorted(set(re.findall(r"\bsamkit(?:\.[A-Za-z_]\w*)+", text)))
    names = [n for n in names if n.rsplit(".", 1)[-1] not in FILE_SUFFIXES]  # samkit.md: a file
    missing = []
    for name in names:
        parts = name.split(".")
        obj, i = None, len(parts)
        while i > 0:  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        if obj is None:
            missing.append(name)
    return missing
