"""Every code block of README.md works as written (issue 20): what a user copies runs.

* Each fenced ``python`` block is executed as written, on its own (a fresh namespace, a temporary
  working directory, a fixed seed, a time limit): every block defines its own model and data.
* Each ``bash`` line that is a samkit command (``samkit ...``, or ``torchrun ... -m samkit ...``)
  is parsed by samkit's real argparse parser, so a stale flag fails; the cheap ones (``samkit
  list``, ``--help``) are also run. ``make TARGET`` lines must name a Makefile target. Any other
  command in a bash block fails the test until a check for it is added here.
* A value a ``python`` line states in its comment (``gd_edge(0.05)   # 40.0 = 2/eta``) is checked.
* Every ``samkit.name`` the README mentions exists.
* The README's closure loop and its explicit two-pass loop end at the same weights, bit for bit.

An HTML comment on the line directly above a block controls it:

* ``<!-- readme-test: skip (needs CUDA) -->``: not run, only for what cannot run here (CUDA, a
  download); the skip names the block's line and the reason, and ``test_skips_are_few_and_named``
  lists them.
* ``<!-- readme-test: setup: samkit train ... -->``: run this samkit command first in the
  block's working directory (a block that reads a run's directory).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIME_LIMIT_S = 120  # per block; the slowest (Hugging Face, Lightning) take 5-30 s on a busy CPU
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")
SKIP = re.compile(r"^skip \((needs (CUDA|a GPU|a download)[^)]*)\)$")
SLOW = ("import lightning", "from transformers", "torch.compile")  # the marker's meaning
CHEAP_COMMANDS = {"list"}


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # the README line of the opening fence
    code: str
    directive: str | None  # the readme-test comment directly above, if any

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the directive on the line above each."""
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        opening = lines[i].strip()
        if not opening.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: a code fence that is never closed")
        above = DIRECTIVE.match(lines[i - 1].strip()) if i else None
        blocks.append(Block(opening[3:].strip(), i + 1, "\n".join(lines[i + 1:end]) + "\n",
                            above.group(1) if above else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def skip_reason(block: Block) -> str | None:
    if block.directive is None or block.directive.startswith("setup:"):
        return None
    m = SKIP.match(block.directive)
    if m is None:
        raise ValueError(f"README.md:{block.line}: unknown or unjustified readme-test directive "
                         f"{block.directive!r} (allowed: 'skip (needs CUDA|a GPU|a download ...)'"
                         ", 'setup: samkit ...')")
    return m.group(1)


def python_param(block: Block):
    marks = [pytest.mark.slow] if any(s in block.code for s in SLOW) else []
    return pytest.param(block, id=block.id, marks=marks)


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
    """A block that registers an ascent (the README's "a new ascent" example) leaves the
    registry as it found it, so the other tests see the same names."""
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
    """Execute the block as written in a fresh namespace; tracebacks show README line numbers."""
    code = block.code if code is None else code
    namespace = {"__name__": "__readme__"}
    compiled = compile("\n" * block.line + code, str(README), "exec")
    torch.manual_seed(seed)
    with time_limit(TIME_LIMIT_S, f"README.md:{block.line}"), registry_restored():
        exec(compiled, namespace)
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


# ----------------------------------------------------------------------------- the tests


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
    reason = skip_reason(block)
    if reason:
        pytest.skip(f"README.md:{block.line}: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    if block.directive and block.directive.startswith("setup:"):
        from samkit.cli import main

        argv = samkit_argv(block.directive[len("setup:"):].strip())
        assert argv is not None, f"README.md:{block.line}: a setup must be a samkit command"
        with time_limit(TIME_LIMIT_S, f"README.md:{block.line} setup"):
            assert main(argv) == 0, f"README.md:{block.line}: setup `samkit {shlex.join(argv)}`"
    namespace = run_python(block)
    check_stated_values(block, namespace)


NUMBER_COMMENT = re.compile(r"^(?P<expr>\S.*?)\s+#\s*(?P<value>-?\d[\d,]*(\.\d+)?)\b")


def check_stated_values(block: Block, namespace: dict) -> None:
    """``expr   # 9.557 = ...``: the expression's value, to the digits shown."""
    for offset, line in enumerate(block.code.split("\n")):
        m = NUMBER_COMMENT.match(line)
        if m is None:
            continue
        try:
            expr = compile(m.group("expr"), "<readme>", "eval")
        except SyntaxError:  # an assignment or a statement: nothing stated about a value
            continue
        shown = m.group("value").replace(",", "")
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        value = float(eval(expr, namespace))
        assert abs(value - float(shown)) <= 0.5 * 10**-decimals + 1e-12, (
            f"README.md:{block.line + 1 + offset}: {m.group('expr')} is {value}, "
            f"the comment says {shown}"
        )


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BASH])
def test_bash_block_commands_parse(block, tmp_path, monkeypatch):
    reason = skip_reason(block)
    if reason:
        pytest.skip(f"README.md:{block.line}: {reason}")
    monkeypatch.chdir(tmp_path)
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    for line in shell_lines(block.code):
        where = f"README.md:{block.line} `{line.split('#')[0].strip()}`"
        argv = samkit_argv(line)
        words = shlex.split(line, comments=True)
        if argv is not None:
            check_samkit_line(argv, where)
        elif words[0] == "make":
            missing = [t for t in words[1:] if not t.startswith("-") and t not in targets]
            assert not missing, f"{where}: no Makefile target {missing}"
        else:
            pytest.fail(f"{where}: a command this test does not check (add a check for it)")


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
    import importlib

    text = README.read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"\bsamkit(?:\.[A-Za-z_]\w*)+", text)))
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
    assert not missing, f"README names that samkit does not have: {missing}"


def _python_with(marker: str) -> Block:
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
