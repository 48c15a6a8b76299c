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


def _dataset(root, shards):
    from test_data_harness import index_dataset, write_good, write_info

    root.mkdir(parents=True, exist_ok=True)
    for number, keys in enumerate(shards):
        write_good(root, f"train-{number}", keys)
    write_info(root)
    index_dataset(root)


def test_a_resume_on_changed_data_is_refused_by_name_or_restarts_its_position_when_asked(tmp_path, caplog):
    """The data position saved at step 2 belongs to the index it was read from. The same index in another folder
    (moved data) goes on where it was. Re-prepared data (a shard holds other samples) or another dataset is refused
    with the dataset, the change and the fix named (it ended in an error inside Energon, or went on at a meaningless
    position); checkpoint.on_data_change = "restart" resumes everything else and reads the data from its start."""
    import shutil

    from test_data_harness import run_recipe

    from dfmkit.train import checkpoint as ckpt

    data = tmp_path / "data"
    _dataset(data, [range(0, 30), range(30, 60)])
    (tmp_path / "run.toml").write_text(run_recipe(data, tmp_path / "ck", train_iters=2))
    recipe = str(tmp_path / "run.toml")
    train(dfmkit.build(recipe))

    shutil.copytree(data, tmp_path / "moved")
    here = Trainer(dfmkit.build(recipe, ["train.train_iters=4"]))
    moved = Trainer(dfmkit.build(recipe, [f"data.path={tmp_path / 'moved'}", "train.train_iters=4"]))
    assert moved.state.step == 2 and moved.data.batches == 2
    assert next(moved.data).keys == next(here.data).keys

    shutil.rmtree(data)
    _dataset(data, [range(0, 30), range(30, 50)])  # prepared again: the second shard holds 20 samples, not 30
    with pytest.raises(ckpt.CheckpointError) as refused:
        Trainer(dfmkit.build(recipe, ["train.train_iters=4"]))
    assert str(refused.value) == (
        f"cannot resume the data position: the 'train' split of '{data}' is not the data the saved position belongs "
        "to: shard train-1-000000.tar held 30 samples, now 20 (2 shards with 60 samples then, 2 with 50 now). Point "
        "data.path at the data the checkpoint read, or resume on this data from its start with "
        "checkpoint.on_data_change=\"restart\" (the model, optimizer, schedule and step 2 are restored)")
    other = tmp_path / "other"
    _dataset(other, [range(0, 10)])
    with pytest.raises(ckpt.CheckpointError, match=f"the 'train' split of '{other}' is not the data the saved "
                                                   f"position belongs to \\(that was read from '{data}'\\): shard "
                                                   "train-0-000000.tar held 30 samples, now 10; shard "
                                                   "train-1-000000.tar \\(30 samples\\) is gone"):
        Trainer(dfmkit.build(recipe, [f"data.path={other}", "train.train_iters=4"]))

    with caplog.at_level(logging.WARNING, logger="dfmkit"):
        restarted = Trainer(dfmkit.build(recipe, ["train.train_iters=4", "checkpoint.on_data_change=restart"]))
    assert restarted.state.step == 2 and restarted.data.batches == 0
    assert any(r.getMessage().endswith("checkpoint.on_data_change = \"restart\": the data is read from its start "
                                       "(and its skipped samples counted afresh), everything else resumes at step 2")
               for r in caplog.records)
    fresh = Trainer(dfmkit.build(recipe, ["checkpoint.resume=false", f"checkpoint.dir={tmp_path / 'fresh'}"]))
    assert next(restarted.data).keys == next(fresh.data).keys
    assert restarted.train()["step"] == 4
