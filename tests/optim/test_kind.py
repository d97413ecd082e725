"""The typed kind (issue 21, findings 1 and 3): what callers need is declared by the optimizer
(optim/kind.py), and nothing outside optim/ tells samkit optimizers apart by class."""

import pathlib
import re

import pytest
import torch
from torch import nn

import samkit
from samkit.optim.kind import BaseRule, EdgeRule, StepForm, kind_of
from samkit.stability import base_edge_for, edge_for, sam_edge

SRC = pathlib.Path(samkit.__file__).parent
CLASSES = ("SharpnessAwareOptimizer", "WrappingOptimizer", "OnePassOptimizer", "LossTermOptimizer",
           "TrajectoryLossOptimizer", "ExampleSelectingOptimizer", "SAM", "ASAM", "USAM", "GSAM",
           "MSAM", "ESAM", "SAF", "MESA", "LookSAM", "FisherSAM", "FriendlySAM")


def test_no_class_checks_on_samkit_optimizers_outside_optim():
    pattern = re.compile(r"(isinstance\([^)]*|type\([^)]*\) is\s*)\b(" + "|".join(CLASSES) + r")\b")
    hits = [f"{p.relative_to(SRC)}: {m.group(0)}" for p in SRC.rglob("*.py")
            if "optim" not in p.relative_to(SRC).parts[:1]
            for m in pattern.finditer(p.read_text())]
    assert hits == []


def sgd(lr=0.1, momentum=0.0, **kw):
    return torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=lr, momentum=momentum, **kw)


@pytest.mark.parametrize("make, form, edge, label", [
    (lambda: sgd(), StepForm.PLAIN, EdgeRule.BASE, "gd"),
    (lambda: sgd(momentum=0.9, nesterov=True), StepForm.PLAIN, EdgeRule.BASE, "nesterov"),
    (lambda: samkit.SAM(sgd()), StepForm.TWO_PASS, EdgeRule.CLOSED_FORM, "sam+gd"),
    (lambda: samkit.USAM(sgd(momentum=0.9)), StepForm.TWO_PASS, EdgeRule.CLOSED_FORM,
     "usam+momentum"),
    (lambda: samkit.ASAM(sgd()), StepForm.TWO_PASS, EdgeRule.NONE, "none"),
    (lambda: samkit.GSAM(sgd()), StepForm.TWO_PASS, EdgeRule.NONE, "none"),
    (lambda: samkit.MSAM(sgd(momentum=0.9)), StepForm.ONE_PASS, EdgeRule.NONE, "none"),
    (lambda: samkit.SAF(sgd(), num_examples=4), StepForm.LOSS_TERM, EdgeRule.NONE, "none"),
    (lambda: samkit.ESAM(sgd()), StepForm.EXAMPLE_SELECTING, EdgeRule.NONE, "none"),
    (lambda: samkit.SAM(torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=0.1)),
     StepForm.TWO_PASS, EdgeRule.NONE, "none"),
])
def test_the_kind_is_declared_and_decides_the_edge(make, form, edge, label):
    opt = make()
    kind = kind_of(opt)
    assert (kind.form, kind.edge, kind.label) == (form, edge, label)
    assert (kind.note == "") == (edge is not EdgeRule.NONE)  # no edge: it says why
    assert (edge_for(opt, 2.0) is None) == (edge is EdgeRule.NONE)
    assert base_edge_for(opt) is not None  # the base optimizer's edge applies to all of them
    if kind.form.wraps:
        assert opt.step_rewrites() == (kind.descent.note or None)


def test_the_base_edge_is_decided_from_the_base_kind_not_from_a_note():
    groups = [{"params": [nn.Parameter(torch.ones(2))], "lr": 0.1},
              {"params": [nn.Parameter(torch.ones(2))], "lr": 0.2}]
    kind = kind_of(torch.optim.SGD(groups, lr=0.1))
    assert kind.base.no_edge and base_edge_for(kind) is None and edge_for(kind) is None
    damp = kind_of(sgd(momentum=0.9, dampening=0.5))
    assert damp.base.rule is BaseRule.MOMENTUM and base_edge_for(damp) is None
    rms = kind_of(torch.optim.RMSprop(nn.Linear(2, 2).parameters(), lr=0.1))
    assert rms.base.rule is BaseRule.UNKNOWN and edge_for(rms) is None
    sam = samkit.SAM(sgd(lr=0.05), rho=0.1)
    assert edge_for(sam.kind, 3.0) == pytest.approx(sam_edge(0.05, 0.1, 3.0))
