"""The command line speaks one language: default run names that tell runs apart, one meaning
per flag name across subcommands, the subcommand's usage on its errors, help texts from the
defaults the code uses, and advice that the command accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from samkit.cli import build_parser, main
from samkit.config import TrainConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def default_run_name(argv: list[str]) -> str:
    """The folder a README command line would write, without running it."""
    from samkit.experiments import compare, correlate, eos

    args = build_parser().parse_args(argv)
    if args.command in ("compare", "demo"):
        config, optimizers, seeds, options, _ = compare.inputs_from_args(args)
        return compare.default_name(config, optimizers, seeds, options)
    if args.command == "eos":
        return eos.config_from_args(args).run_name
    if args.command == "correlate":
        config, _ = correlate.cli.config_from_args(args)
        return correlate.default_name(config, args.quick)
    raise AssertionError(args.command)


def readme_commands(command: str) -> list[list[str]]:
    """The ``samkit COMMAND`` lines of the README and of the documentation's pages (the
    command-line examples moved there), each once, in order."""
    lines = []
    pages = [README, *sorted((README.parent / "docs").rglob("*.md"))]
    for page in pages:
        for line in page.read_text().splitlines():
            if line.startswith(f"samkit {command}"):
                argv = shlex.split(line.split("#", 1)[0])[1:]
                if argv not in lines:
                    lines.append(argv)
    return lines


# ------------------------------------------------------------------ run names


@pytest.mark.parametrize("command", ["compare", "eos", "correlate"])
def test_the_readmes_examples_run_in_order_without_colliding(command):
    argvs = [a for a in readme_commands(command) if "--name" not in a]
    assert len(argvs) >= 2
    names = [default_run_name(a) for a in argvs]
    assert len(set(names)) == len(names), dict(zip(map(" ".join, argvs), names, strict=True))
    # the same command finds its own run again (--resume, --overwrite)
    assert names == [default_run_name(a) for a in argvs]


def test_default_names_differ_by_settings_but_not_by_what_a_resume_may_change():
    base = TrainConfig(dataset="digits")
    assert base.run_name == "digits-mlp-sgd-s0"
    assert TrainConfig(dataset="digits", lr=0.2).run_name.startswith("digits-mlp-sgd-s0-")
    assert TrainConfig(dataset="digits", perturbation="local").run_name != \
        TrainConfig(dataset="digits").run_name
    assert TrainConfig(dataset="digits", epochs=30, threads=1).run_name == base.run_name
    assert TrainConfig(dataset="digits", name="mine").run_name == "mine"
    compare = default_run_name(["compare"])
    assert re.fullmatch(r"compare-(fashion-mnist|digits)-mlp-noise40(-[0-9a-f]{6})?", compare)
    assert default_run_name(["compare", "-j", "2"]) == compare  # how it runs is not what


def test_demo_accepts_the_advice_it_prints(tmp_path, capsys, monkeypatch):
    parser = build_parser()
    for flags in (["--resume"], ["--overwrite"], ["-j", "2"], ["--quiet"]):
        parser.parse_args(["demo", *flags])  # no SystemExit
    calls = []
    monkeypatch.setattr("samkit.experiments.compare.cmd_compare",
                        lambda args, argv: calls.append(list(argv)) or 0)
    parser = build_parser()
    args = parser.parse_args(["demo", "--resume", "-j", "2"])
    assert args.handler(args, ["demo", "--resume", "-j", "2"]) == 0
    assert calls == [["compare", "--resume", "--jobs", "2"]]


# ------------------------------------------------------------------ one meaning per flag


def options_of(command: str) -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {opt: action for action in sub.choices[command]._actions
            for opt in action.option_strings}


EXPERIMENTS = ("train", "compare", "eos", "correlate", "demo")


def test_one_meaning_per_flag_name_across_subcommands():
    flags = {c: options_of(c) for c in EXPERIMENTS}
    # --budget is the edge tracker's share of the time (eos), nothing else
    assert "--budget" in flags["eos"]
    assert all("--budget" not in flags[c] for c in EXPERIMENTS if c != "eos")
    assert "--equal-by" in flags["compare"] and "--fixed-epochs" in flags["correlate"]
    # --schedule is AE-SAM's word in the API: the CLI says --lr-schedule
    assert all("--schedule" not in flags[c] for c in EXPERIMENTS)
    assert "--lr-schedule" in flags["train"]
    # -j is --jobs wherever runs go in parallel
    for c in ("compare", "correlate", "demo"):
        assert flags[c]["-j"] is flags[c]["--jobs"], c
    # --lr names the step size(s); the plural spelling is the same flag where there are several
    for c in ("eos", "correlate"):
        assert flags[c]["--lr"] is flags[c]["--lrs"], c
        assert flags[c]["--lr"].nargs == "*", c
    for c in ("train", "compare"):
        assert "--lr" in flags[c] and "--lrs" not in flags[c]
    # -q is --quiet everywhere
    for c in EXPERIMENTS:
        assert flags[c]["-q"] is flags[c]["--quiet"], c


@pytest.mark.parametrize("command", EXPERIMENTS)
def test_an_unknown_flag_prints_the_subcommands_usage(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: samkit {command} ")
    assert "unrecognized arguments: --no-such-flag" in err


def test_a_bad_key_in_an_optimizer_spec_is_named_as_written(tmp_path, capsys):
    rc = main(["compare", "--dataset", "digits", "--optimizers", "sgd", "sam:rhoo=0.1",
               "--out-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "in --optimizers sam:rhoo=0.1; did you mean rho?" in err and "--set" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ help from the code


def test_help_texts_come_from_the_defaults(capsys):
    from samkit import __version__
    from samkit.experiments.compare import DEFAULT, DEFAULT_OPTIMIZERS, DEFAULT_SEEDS

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {' '.join(DEFAULT_OPTIMIZERS)})" in text
    assert f"seeds {' '.join(map(str, DEFAULT_SEEDS))}" in text
    assert f"{DEFAULT.epochs} epochs" in text and f"{DEFAULT.subset:,} Fashion-MNIST" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "about 70 s" not in top and "compare-fashion-mnist-mlp/" not in top
    assert "runs/compare-fashion-mnist-mlp-noise40/" in top
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    versions = set(re.findall(r"samkit (\d+\.\d+)", listed))
    assert versions <= {".".join(__version__.split(".")[:2])}, versions
