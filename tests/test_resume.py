"""Resuming with settings or data that changed since the checkpoint: the recipe's optimizer and schedule apply and the
log says so; a changed dataset is refused by name, or its position starts afresh when the recipe says so."""

from __future__ import annotations

import logging

import pytest
from test_train import tiny_recipe

import dfmkit
from dfmkit.train.loop import Trainer, train

NEW_OPTIM = {"lr": 2e-3, "decay_style": "linear", "warmup_iters": 4, "min_lr_ratio": 0.5, "betas": [0.8, 0.9],
             "weight_decay": 0.1, "eps": 1e-6}


def test_a_resume_follows_the_recipes_optimizer_and_schedule_and_says_which_settings_changed(tmp_path, caplog):
    """Saved at step 3 of 6 (lr 1e-3, cosine, warm-up 2); resumed with other [optim] settings and 10 steps: the next
    steps take the new schedule's learning rate at their step (that of a fresh run of the new recipe) and the new
    AdamW settings, and the log names each changed setting once."""
    train(dfmkit.build(tiny_recipe(tmp_path / "ck", train={"train_iters": 6})), until_step=3)
    changed = tiny_recipe(tmp_path / "ck", train={"train_iters": 10}, optim=NEW_OPTIM)
    with caplog.at_level(logging.INFO, logger="dfmkit"):
        resumed = Trainer(dfmkit.build(changed))
    assert resumed.state.step == 3
    lrs = [resumed.train_step()["lr"] for _ in range(7)]

    fresh = Trainer(dfmkit.build({**changed, "checkpoint": {"dir": str(tmp_path / "fresh"), "resume": False}}))
    fresh.state.scheduler.step(3)
    expected = []
    for _ in range(7):
        expected.append(fresh.state.optimizer.param_groups[0]["lr"])
        fresh.state.scheduler.step(1)
    assert lrs == expected
    assert lrs[0] == pytest.approx(2e-3 * 3 / 4)  # step 4 of a warm-up of 4 to the new lr
    assert lrs[-1] == pytest.approx(1e-3 + 1e-3 * (10 - 9) / (10 - 4))  # step 10: linear decay to 0.5 * lr
    for group in resumed.state.optimizer.param_groups:
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
        assert group["weight_decay"] == (0.1 if group["wd_mult"] else 0.0)

    said = [r.getMessage() for r in caplog.records if "in the checkpoint: the recipe's applies from step 4" in
            r.getMessage()]
    assert said == [
        "optim.betas is [0.8, 0.9] in the recipe, [0.9, 0.95] in the checkpoint: the recipe's applies from step 4",
        "optim.decay_style is 'linear' in the recipe, 'cosine' in the checkpoint: the recipe's applies from step 4",
        "optim.eps is 1e-06 in the recipe, 1e-05 in the checkpoint: the recipe's applies from step 4",
        "optim.lr is 0.002 in the recipe, 0.001 in the checkpoint: the recipe's applies from step 4",
        "optim.min_lr_ratio is 0.5 in the recipe, 0.1 in the checkpoint: the recipe's applies from step 4",
        "optim.warmup_iters is 4 in the recipe, 2 in the checkpoint: the recipe's applies from step 4",
        "optim.weight_decay is 0.1 in the recipe, 0.033 in the checkpoint: the recipe's applies from step 4",
        "train.train_iters is 10 in the recipe, 6 in the checkpoint: the recipe's applies from step 4",
    ]


def test_a_longer_run_continues_the_schedule_it_stretches(tmp_path, caplog):
    """The usual change: more steps. The cosine decay is stretched over the new length, and nothing else changes."""
    train(dfmkit.build(tiny_recipe(tmp_path / "ck", train={"train_iters": 6})))
    with caplog.at_level(logging.INFO, logger="dfmkit"):
        longer = Trainer(dfmkit.build(tiny_recipe(tmp_path / "ck", train={"train_iters": 12})))
    scheduler = longer.state.scheduler
    assert (scheduler.lr_decay_steps, scheduler.num_steps) == (12, 6)
    assert [r.getMessage() for r in caplog.records if "in the checkpoint" in r.getMessage()] == [
        "train.train_iters is 12 in the recipe, 6 in the checkpoint: the recipe's applies from step 7"]
    result = longer.train()
    assert result["step"] == 12 and len(result["losses"]) == 6
