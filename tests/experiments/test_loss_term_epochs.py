"""SAF/MESA whose loss term would never switch on are refused before anything trains (issue 20,
finding 8: `samkit compare --epochs 3` gave a `saf:lam=6` row identical to `sgd`)."""

import pytest

from samkit.cli import main
from samkit.train import TrainConfig, Trainer

QUICK = ["--dataset", "digits", "--threads", "1", "--batch-size", "128"]


def test_compare_refuses_saf_that_would_be_sgd_before_any_training(tmp_path, capsys):
    rc = main(["compare", *QUICK, "--epochs", "3", "--optimizers", "sgd", "saf:lam=6",
               "--seeds", "0", "--out-dir", str(tmp_path), "--name", "cmp", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "start_epoch" in err and "5" in err and "3 epoch" in err
    assert "saf:start_epoch=1" in err  # what to do
    assert not list(tmp_path.rglob("metrics.jsonl"))  # sgd did not train first


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_the_trainer_refuses_it_at_setup(tmp_path, name):
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"width": 8}, optimizer=name,
                      epochs=2, batch_size=128, subset=256, lr=0.1, threads=1,
                      out_dir=str(tmp_path), name=name)
    with pytest.raises(ValueError, match=r"start_epoch.*5.*2 epoch"):
        Trainer(cfg, verbose=0).fit()
    assert not (tmp_path / name / "metrics.jsonl").exists()


def test_a_steps_budget_is_counted_in_epochs(tmp_path):
    # 256 examples, batches of 128: 2 steps per epoch; 9 steps = 5 epochs (0..4), start 4
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"width": 8}, optimizer="saf",
                      optimizer_kwargs={"start_epoch": 4}, steps=9, batch_size=128, subset=256,
                      lr=0.1, threads=1, out_dir=str(tmp_path), name="saf")
    with pytest.raises(ValueError, match="Invalid start_epoch for saf: 4 in a run of 5 epoch"):
        Trainer(cfg, verbose=0).fit()


def test_the_boundary_and_what_stays_allowed():
    from samkit.train.trainer import check_loss_term_switches_on

    def cfg(**kw):
        return TrainConfig(dataset="digits", model="mlp", **kw)

    saf = cfg(optimizer="saf", optimizer_kwargs={"start_epoch": 2})
    with pytest.raises(ValueError, match="start_epoch"):
        check_loss_term_switches_on(saf, 3)  # epochs 0, 1, 2: never e > 2
    check_loss_term_switches_on(saf, 4)  # on in epoch 3
    # SAF also needs each example's logits of `lag` epochs before: on from epoch max(s + 1, lag)
    early = cfg(optimizer="saf", optimizer_kwargs={"start_epoch": 0})
    with pytest.raises(ValueError, match="Invalid lag for saf: 2 in a run of 2 epoch"):
        check_loss_term_switches_on(early, 2)  # epoch 1 has no logits of epoch -1
    check_loss_term_switches_on(early, 3)  # on in epoch 2
    check_loss_term_switches_on(
        cfg(optimizer="saf", optimizer_kwargs={"start_epoch": -1, "lag": 1}), 2)
    with pytest.raises(ValueError, match="lag"):
        check_loss_term_switches_on(cfg(optimizer="saf", optimizer_kwargs={"start_epoch": -1}), 1)
    check_loss_term_switches_on(cfg(optimizer="saf", optimizer_kwargs={"lam": 0}), 1)  # off
    check_loss_term_switches_on(cfg(optimizer="sgd"), 1)
    check_loss_term_switches_on(cfg(optimizer="sam"), 1)
    with pytest.raises(ValueError, match="mesa"):
        check_loss_term_switches_on(cfg(optimizer="mesa"), 6)  # the default start_epoch 5
    check_loss_term_switches_on(cfg(optimizer="mesa"), 7)
