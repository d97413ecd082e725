"""samkit.experiments.base: subcommand registration, finished runs, the fallback, the files."""

import json
import math

import pytest

from samkit.config import TrainConfig
from samkit.experiments import base


def test_every_subcommand_registers_a_handler():
    from samkit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)
    assert {"train", "compare", "eos", "correlate", "demo", "download", "list"} <= names
    for name, subparser in sub.choices.items():
        assert callable(subparser.get_default("handler")), name


def test_run_main_gives_one_line_errors(capsys):
    from samkit.experiments.eos import add_parser

    assert base.run_main(add_parser, "eos", ["--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samkit: error: Invalid lrs") and err.count("\n") == 1


def _tiny(tmp_path, **changes):
    values = dict(dataset="digits", subset=200, epochs=1, batch_size=64, threads=1,
                  out_dir=str(tmp_path), name="r", log_every=10_000)
    return TrainConfig(**{**values, **changes})


def test_finished_state(tmp_path):
    from samkit.train import Trainer

    cfg = _tiny(tmp_path)
    assert base.finished_state(cfg, 200) is None  # nothing yet
    Trainer(cfg, verbose=0).fit()
    state = base.finished_state(cfg, 200)
    assert state is not None and state["last_record"]["step"] == 4  # ceil(200 / 64)
    assert base.finished_state(cfg.replace(epochs=2), 200) is None  # a longer budget: resume
    assert base.finished_state(cfg, 400) is None  # more examples per epoch: not spent


def test_fallback_note_and_changes(monkeypatch):
    from samkit.data import DataNotFoundError

    def missing(name, data_dir=None):
        raise DataNotFoundError(f"{name} not found in /nowhere\nsecond line")

    monkeypatch.setattr("samkit.data.resolve_data_dir", missing)
    cfg, notes = base.with_fallback(TrainConfig(subset=10), {"dataset": "digits", "epochs": 3})
    assert (cfg.dataset, cfg.subset, cfg.epochs) == ("digits", 10, 3)
    assert len(notes) == 1 and "/nowhere" in notes[0] and "second line" not in notes[0]
    assert base.with_fallback(TrainConfig(dataset="digits")) == (TrainConfig(dataset="digits"),
                                                                  [])


def test_write_json_is_strict(tmp_path):
    path = base.write_json(tmp_path / "s.json", {"a": math.nan, "b": [1.0, math.inf], 3: "x"})

    def refuse(token):
        raise ValueError(token)

    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [1.0, None],
                                                                    "3": "x"}


def test_save_figure_and_markdown(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    path = base.save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert base.write_markdown(tmp_path / "r.md", ["# t", "", "x"]).read_text() == "# t\n\nx\n"


def test_run_dir_names_are_checked(tmp_path):
    assert base.run_dir_of(tmp_path, "a") == tmp_path / "a"
    for bad in ("a/b", "..", ".", "../escape", "/abs/path", "a\\b", ".hidden", "x" * 129, ""):
        with pytest.raises(ValueError, match="Invalid name"):
            base.run_dir_of(tmp_path, bad)


