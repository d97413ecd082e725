"""TrainConfig: defaults, YAML, --set overrides with type checks, clear errors, round trip."""

import pytest

from samkit.config import FIELDS, field_help, from_dict, parse_override, resolved_dict
from samkit.train import TrainConfig, apply_overrides, load_config, save_config
from samkit.train.schedule import LRSchedule


def test_every_field_has_a_comment():
    helps = field_help()
    assert set(helps) == set(FIELDS), sorted(set(FIELDS) - set(helps))
    assert all(len(text) > 10 for text in helps.values())


def test_defaults_are_valid_and_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    assert cfg.run_name == "fashion-mnist-mlp-sgd-s0"


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("lr=0.05", "lr", 0.05),
        ("lr=1", "lr", 1.0),  # an int is a fine float
        ("epochs=3", "epochs", 3),
        ("amp=true", "amp", True),
        ("rho=null", "rho", None),
        ("subset=~", "subset", None),
        ("milestones=[0.3, 0.6]", "milestones", (0.3, 0.6)),
        ("name=123", "name", "123"),  # a string field takes the text as written
        ("base=adamw", "base", "adamw"),
        ("model_kwargs={width: 64, depth: 1}", "model_kwargs", {"width": 64, "depth": 1}),
    ],
)
def test_overrides_are_typed(text, key, value):
    values = apply_overrides({}, [text])
    assert from_dict(values).__getattribute__(key) == value


def test_dotted_override_sets_one_entry_of_a_mapping():
    values = apply_overrides({"model_kwargs": {"depth": 2}}, ["model_kwargs.width=64"])
    assert values["model_kwargs"] == {"depth": 2, "width": 64}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr=0.1", "Unknown key 'lrr'.*did you mean lr"),
        ("epochs=2.5", "Invalid value for 'epochs'.*2.5.*allowed: int"),
        ("amp=1", "Invalid value for 'amp'.*allowed: bool"),
        ("lr=fast", "Invalid value for 'lr'.*'fast'"),
        ("lr", "allowed form: key=value"),
        ("lr=[1, 2", "not valid YAML"),
        ("lr.x=1", "'lr' is not a mapping"),
        ("milestones=[a]", "Invalid value for 'milestones'"),
    ],
)
def test_bad_overrides_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        from_dict(apply_overrides({}, [text]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -0.1}, "Invalid lr: -0.1"),
        ({"lr": float("nan")}, "Invalid lr"),
        ({"epochs": 0}, "Invalid epochs: 0"),
        ({"batch_size": -1}, "Invalid batch_size"),
        ({"label_noise": 1.0}, "Invalid label_noise"),
        ({"lr_schedule": "linear"}, "Invalid lr_schedule: 'linear'.*constant, cosine, step"),
        ({"schedule": "linear"}, "Invalid lr_schedule: 'linear'"),  # the older name
        ({"milestones": (0.5, 1.5)}, "Invalid milestones"),
        ({"rho": -1.0}, "Invalid rho"),
        ({"grad_accum": 0}, "Invalid grad_accum"),
        ({"name": "a/b"}, "Invalid name"),
        ({"threads": 0}, "Invalid threads"),
    ],
)
def test_bad_values_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_yaml_then_arguments_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\nlr: 0.2\nepochs: 4\nmodel_kwargs: {width: 32}\n")
    cfg = load_config(path, ["lr=0.3", "model_kwargs.depth=1"], epochs=5)
    assert (cfg.dataset, cfg.lr, cfg.epochs) == ("digits", 0.3, 5)
    assert cfg.model_kwargs == {"width": 32, "depth": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- 1\n- 2\n", "expected a mapping"),
        ("lr: [\n", "not valid YAML"),
        ("learning_rate: 0.1\n", "Unknown key 'learning_rate'"),
        ("epochs: ten\n", "Invalid value for 'epochs'"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        load_config("nope/missing.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = TrainConfig(dataset="digits", optimizer="asam", rho=0.5, milestones=(0.3, 0.9),
                      model_kwargs={"width": 8}, steps=7)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "# SAM/ASAM radius" in text  # the field comments travel with the file
    back = load_config(tmp_path / "config.yaml")
    assert resolved_dict(back) == resolved_dict(cfg)
    assert back.name == cfg.run_name


def test_parse_override_reads_yaml():
    assert parse_override("x= [1, 2]") == ("x", [1, 2])
    assert parse_override("name=") == ("name", "")


def test_schedules():
    cos = LRSchedule("cosine", total_steps=10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and 0 < cos(9) < 0.03
    warm = LRSchedule("cosine", total_steps=10, warmup_steps=4)
    assert [warm(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warm(4) == 1.0
    step = LRSchedule("step", total_steps=100, milestones=(0.5, 0.75), gamma=0.1)
    assert step(49) == 1.0 and step(50) == pytest.approx(0.1) and step(99) == pytest.approx(0.01)
    assert LRSchedule("constant", total_steps=3)(2) == 1.0
    with pytest.raises(ValueError, match="Invalid schedule"):
        LRSchedule("poly", 10)
