"""Checkpoints written before the composable family (tests/optim/data/checkpoints_v0.pt, made by
tests/optim/make_checkpoints.py with the samkit of commit b333b1a) load into today's presets and
continue the same run bit for bit."""

from pathlib import Path

import pytest
import torch
from optim.make_checkpoints import SETTINGS, build, model, steps

FILE = Path(__file__).parent / "data" / "checkpoints_v0.pt"
SAVED = torch.load(FILE, weights_only=False)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_an_old_checkpoint_loads_and_continues_the_same_run(name):
    saved = SAVED[name]
    m = model()
    m.load_state_dict(saved["model"])
    opt = build(name, m)
    opt.load_state_dict(saved["optimizer"])
    steps(m, opt, 3)
    for p, q in zip(m.parameters(), saved["after"], strict=True):
        assert torch.equal(p.detach(), q)


def test_state_dict_keys_are_unchanged():
    for name in SETTINGS:
        m = model()
        opt = build(name, m)
        steps(m, opt, 3)
        new, old = opt.state_dict(), SAVED[name]["optimizer"]
        assert new.keys() == old.keys()
        assert [sorted(g) for g in new["param_groups"]] == [sorted(g) for g in old["param_groups"]]
        assert new.get("sharpness_aware", {}).keys() == old.get("sharpness_aware", {}).keys()
