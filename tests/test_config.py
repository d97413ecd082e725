"""samkit.config: numbers as people write them, nested keys, help in field metadata, flags."""

import argparse
from dataclasses import dataclass

import pytest

from samkit import config as C
from samkit.cli import main
from samkit.config import TrainConfig, load_config, setting


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("5E-4", 5e-4), (".5", 0.5), ("-2e-1", -0.2), ("1_000.5", 1000.5),
    ("3", 3), ("0.1", 0.1), ("1.0e-3", 1e-3),
])
def test_yaml_reads_numbers_as_written(text, value):
    assert C.yaml_loads(f"x: {text}")["x"] == value


@pytest.mark.parametrize("text", ["e5", "1e", "abc", "1e-3x", "v1e3"])
def test_yaml_leaves_other_text_alone(text):
    assert C.yaml_loads(f"x: {text}")["x"] == text


@pytest.mark.parametrize(("text", "lr"), [("lr=1e-3", 1e-3), ("lr=5E-4", 5e-4), ("lr=.5", 0.5)])
def test_set_reads_numbers_as_written(text, lr):
    assert load_config(None, [text]).lr == lr


def test_yaml_file_reads_numbers_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-4\nlabel_smoothing: .1\nmilestones: [3e-1, .6]\n")
    cfg = load_config(path)
    assert (cfg.lr, cfg.weight_decay, cfg.label_smoothing, cfg.milestones) == (
        1e-3, 5e-4, 0.1, (0.3, 0.6))


def test_a_string_field_keeps_what_was_written():
    assert load_config(None, ["name=1e-3"]).name == "1e-3"


def test_an_int_field_still_refuses_a_float():
    with pytest.raises(ValueError, match="Invalid value for 'epochs'.*allowed: int"):
        load_config(None, ["epochs=1e3"])


def test_compare_optimizer_spec_reads_numbers_as_written(tmp_path):
    from samkit.experiments.compare import run_configs

    runs = run_configs(TrainConfig(dataset="digits"), ["sam:rho=1e-2,eta=5E-4"], [0], tmp_path)
    assert (runs[0][2].rho, runs[0][2].eta) == (1e-2, 5e-4)


def test_cli_flags_read_numbers_as_written(tmp_path, capsys):
    rc = main(["train", "--dataset", "digits", "--epochs", "1", "--lr", "5E-2", "--set",
               "weight_decay=1e-4", "--out-dir", str(tmp_path), "--name", "r", "--quiet",
               "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    cfg = load_config(tmp_path / "r" / "config.yaml")
    assert (cfg.lr, cfg.weight_decay) == (0.05, 1e-4)


def test_correlate_reads_numbers_as_written(tmp_path):
    from samkit.experiments.correlate import load_correlate_config

    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-2}\nrhos_l2: [5e-2, 1E-1]\neta: 1e-3\n")
    cfg = load_correlate_config(path, ["train.weight_decay=5e-4", "stop_loss=1e-2"])
    assert (cfg.train.lr, cfg.rhos_l2, cfg.eta) == (1e-2, (0.05, 0.1), 1e-3)
    assert (cfg.train.weight_decay, cfg.stop_loss) == (5e-4, 1e-2)


def test_every_config_field_has_help():
    from samkit.experiments.correlate import CorrelateConfig
    from samkit.experiments.eos import EOSConfig

    for cls in (TrainConfig, CorrelateConfig, EOSConfig):
        helps = C.help_of(cls)
        missing = set(C.fields_of(cls)) - set(helps)
        assert not missing, (cls.__name__, missing)


@dataclass(frozen=True)
class Inner:
    width: int = setting(8, "units")


@dataclass(frozen=True)
class Outer:
    inner: Inner = setting(Inner(), "the nested part")
    rate: float = setting(0.1, "a rate")
    tags: dict = setting(factory=dict, help="free-form")


def test_nested_keys_and_mappings():
    values = C.apply_overrides(C.to_dict(Outer()), ["inner.width=3", "tags.a.b=1e-3",
                                                    "rate=2E-1"], Outer)
    cfg = C.from_dict(values, cls=Outer)
    assert cfg == Outer(Inner(3), 0.2, {"a": {"b": 1e-3}})
    with pytest.raises(ValueError, match="Unknown key 'widht' of inner.*did you mean width"):
        C.apply_overrides({}, ["inner.widht=3"], Outer)
    with pytest.raises(ValueError, match="'rate' is not a mapping"):
        C.apply_overrides({}, ["rate.x=3"], Outer)
    with pytest.raises(ValueError, match=r"Invalid value for 'width'.*'x' is a str"):
        C.apply_overrides({}, ["inner.width=x"], Outer)


def test_flags_are_generated_from_the_fields():
    parser = argparse.ArgumentParser()
    C.add_flags(parser, Outer, ["rate"])
    C.add_flags(parser, TrainConfig, ["data_dir", "amp", "milestones"])
    args = parser.parse_args(["--rate", "1e-3", "--data-dir", "/d", "--amp",
                              "--milestones", "0.2", "5E-1"])
    assert C.flag_values(args) == {"rate": 1e-3, "data_dir": "/d", "amp": True,
                                   "milestones": (0.2, 0.5)}
    assert "a rate" in parser.format_help()


def test_none_on_the_command_line_sets_an_optional_number_to_none():
    """`--subset none` is the field's None (told apart from a flag not given); a text field
    keeps "none" as text (a path or a name may be called that)."""
    parser = argparse.ArgumentParser()
    C.add_flags(parser, TrainConfig, ["subset", "data_dir", "lr"])
    args = parser.parse_args(["--subset", "none", "--data-dir", "none"])
    assert C.flag_values(args) == {"subset": None, "data_dir": "none"}
    assert C.flag_values(parser.parse_args(["--subset", "500"])) == {"subset": 500}
    assert C.flag_values(parser.parse_args([])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "none"])  # lr is not optional: no None to give


# ------------------------------------------------------------------ the older key names


def test_older_key_names_are_read_everywhere(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("schedule: step\n")
    assert load_config(path).lr_schedule == "step"
    assert load_config(None, ["schedule=constant"]).lr_schedule == "constant"
    assert TrainConfig(schedule="constant").lr_schedule == "constant"
    assert not hasattr(TrainConfig(), "schedule")  # the older name is read from files only
    assert C.from_dict({"schedule": "step"}).lr_schedule == "step"
    with pytest.raises(ValueError, match="both 'schedule' and 'lr_schedule'"):
        TrainConfig(schedule="step", lr_schedule="cosine")


def _as_older_version(run_dir):
    """Rewrite a run as an older samkit wrote it: `schedule` instead of `lr_schedule`."""
    from samkit.train.checkpoint import load_checkpoint, save_checkpoint

    text = (run_dir / "config.yaml").read_text()
    assert "\nlr_schedule:" in text
    (run_dir / "config.yaml").write_text(text.replace("\nlr_schedule:", "\nschedule:"))
    state = load_checkpoint(run_dir / "checkpoint.pt")
    state["config"]["schedule"] = state["config"].pop("lr_schedule")
    save_checkpoint(state, run_dir / "checkpoint.pt")


def test_a_run_of_an_older_version_resumes_and_its_changes_are_seen(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256",
            "--threads", "1", "--lr-schedule", "constant", "--out-dir", str(tmp_path),
            "--name", "old", "--quiet"]
    assert main(args) == 0
    _as_older_version(tmp_path / "old")
    config = str(tmp_path / "old" / "config.yaml")
    # a changed schedule is refused, under either name
    assert main(["train", "--config", config, "--resume", "--set", "epochs=2",
                 "lr_schedule=cosine", "--quiet"]) == 2
    assert "lr_schedule: 'constant' -> 'cosine'" in capsys.readouterr().err
    assert main(["train", "--config", config, "--resume", "--set", "epochs=2", "--quiet"]) == 0
    from samkit.train import read_metrics

    assert [r["epoch"] for r in read_metrics(tmp_path / "old") if r["event"] == "epoch"] == [1, 2]
