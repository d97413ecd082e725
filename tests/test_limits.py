"""Values that would exhaust the machine are refused with a clear error (issue 26, finding 9):
threads, model sizes, huge or alias-bombed config values, overflowing lr and seeds."""

from __future__ import annotations

import time

import pytest
import torch

from samkit import config as C
from samkit.config import TrainConfig, load_config
from samkit.models import common as model_limits
from samkit.models import create_model


def bomb(levels: int) -> str:
    """A "billion laughs" YAML: ``levels`` anchors, each a list of 9 aliases of the previous."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]")
    lines.append(f"lr: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_threads_above_the_cpu_count_are_refused_before_any_thread_starts(tmp_path,
                                                                          monkeypatch):
    from samkit.train import Trainer

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # nothing is spawned
    cfg = load_config(None, ["threads=100000", "dataset=synthetic", "steps=1",
                             f"out_dir={tmp_path}"])  # a config from a bigger machine loads
    with pytest.raises(ValueError, match=r"Invalid threads: 100000 \(allowed: 1 to \d+, the CPUs"):
        Trainer(cfg).fit()
    assert 100000 not in calls
    assert C.check_threads(None) is None and C.check_threads(1) == 1
    with pytest.raises(ValueError, match="Invalid threads"):
        C.check_threads(C.cpu_count() + 1)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(bomb(4))  # 6,561 strings once expanded
    with pytest.raises(ValueError, match="aliases are not allowed") as err:
        load_config(small)
    assert len(str(err.value)) < 1000
    big = tmp_path / "bomb.yaml"
    big.write_text(bomb(9))  # 387 million strings once expanded: a few hundred bytes
    assert big.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"found the alias \*a0: YAML aliases"):
        load_config(big)
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="aliases are not allowed"):
        load_config(None, ["model_kwargs={a: &x [1, 2], b: *x}"])


def test_config_files_and_values_are_size_limited(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * (C.MAX_YAML_BYTES // 10 + 1) + "lr: 0.1\n")
    with pytest.raises(ValueError, match=r"bytes \(allowed: at most 1048576"):
        load_config(huge)
    with pytest.raises(ValueError, match="nests too deeply|not valid YAML"):
        C.yaml_loads("[" * 100000)
    # flow collections: refused at the first level past the cap, whatever the call stack's depth
    deepest = "[" * C.MAX_YAML_DEPTH + "]" * C.MAX_YAML_DEPTH
    assert C.yaml_loads(f"lr: {deepest}")["lr"] is not None
    with pytest.raises(ValueError, match=rf"nests too deeply \({C.MAX_YAML_DEPTH + 1} nested flow "
                                         rf"collections, allowed: at most {C.MAX_YAML_DEPTH}\)"):
        C.yaml_loads(f"lr: {{a: [{deepest}]}}")


def test_error_messages_cut_long_values(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(None, ["lr=[" + ", ".join(["1"] * 10000) + "]"])  # 30 kB, no 800-char message
    assert "Invalid value for 'lr'" in str(err.value) and len(str(err.value)) < 800
    path = tmp_path / "long.yaml"
    path.write_text("x" * 1000 + ": 1\n")
    with pytest.raises(ValueError, match="Unknown key 'xxx") as err:
        load_config(path)
    assert "x" * 300 not in str(err.value)


@pytest.mark.parametrize(("override", "match"), [
    ("lr=1e308", r"Invalid lr: 1e\+308 \(allowed: a finite number > 0, at most 3.403e\+38"),
    ("weight_decay=1e300", "Invalid weight_decay"),
    ("rho=1e39", "Invalid rho"),
    ("seed=123456789012345678901234", r"Invalid seed: 123456789012345678901234 \(allowed: an "
                                      r"integer, 0 <= seed < 2\*\*63\)"),
    ("seed=-1", "Invalid seed"),
    ("data_seed=-1", r"Invalid data_seed: -1 \(allowed"),
    ("data_seed=99999999999999999999", "Invalid data_seed"),
])
def test_overflowing_numbers_and_seeds_are_clean_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])
    assert load_config(None, ["seed=9223372036854775807"]).seed == 2**63 - 1


def test_a_bool_written_as_maybe_is_refused():
    with pytest.raises(ValueError, match="Invalid value for 'augment'"):
        load_config(None, ["augment=maybe"])
    with pytest.raises(ValueError, match=r"Invalid bias for model 'mlp': 'maybe' \(allowed: "
                                         "true, false\\)"):
        create_model("mlp", (784,), 10, bias="maybe")


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("mlp", {"depth": 100000, "width": 1}, r"Invalid depth: 100000 \(an integer from 0 to 1000"),
    ("mlp", {"depth": 1001, "width": 1}, "Invalid depth: 1001"),
    ("mlp", {"width": 10**12}, "Invalid width"),
    ("cnn", {"width": 10**6}, "Invalid width"),
    ("transformer", {"n_layer": 5000, "n_embd": 2, "n_head": 1}, "Invalid n_layer"),
    ("transformer", {"n_embd": 2**20, "n_head": 1}, "Invalid n_embd"),
    ("resnet1208", {}, "Invalid ResNet depth: 1208"),
    ("wrn1006-1", {}, "Invalid WRN depth: 1006"),
])
def test_model_sizes_are_bounded(name, kwargs, match):
    shape = (16,) if name == "transformer" else (3, 32, 32) if name != "mlp" else (784,)
    with pytest.raises(ValueError, match=match):
        create_model(name, shape, 10, **kwargs)


def test_the_parameter_count_is_checked_before_memory_is_allocated(monkeypatch):
    monkeypatch.setattr(model_limits, "MAX_PARAMETERS", 10_000)
    import samkit.models.registry as R

    monkeypatch.setattr(R, "MAX_PARAMETERS", 10_000)
    with pytest.raises(ValueError, match=r"203,530 parameters \(allowed: at most 10,000"):
        create_model("mlp", (784,), 10, depth=1, width=256)
    assert create_model("mlp", (784,), 10, depth=0).net[-1].out_features == 10  # 7,850


def test_train_config_still_takes_sane_values():
    cfg = TrainConfig(lr=1e3, seed=2**62, data_seed=7, threads=1)
    assert (cfg.lr, cfg.seed, cfg.data_seed) == (1e3, 2**62, 7)
