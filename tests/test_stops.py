"""How a run ends when something outside it goes wrong: a full disk during a save or under TensorBoard."""

from __future__ import annotations

import errno
import logging
import os

import pytest
from test_train import tiny_recipe

import dfmkit
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.loop import Trainer, train

NO_SPACE = os.strerror(errno.ENOSPC)


def _toml(recipe: dict) -> str:
    import json

    return "".join(f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
                   for section, values in recipe.items())


def test_a_full_disk_during_a_save_names_the_intact_checkpoint_and_the_next_run_resumes(tmp_path, monkeypatch,
                                                                                         capsys):
    """megatron's checkpoint writers (processes forked from the run) find the disk full: every tensor file gets a few
    bytes, then ENOSPC. The run ends with one message (exit code 2, no traceback) that says the disk is full and
    names the checkpoint still there; the unfinished folder is gone, `latest` still names the checkpoint, and a run
    started again resumes from it and saves."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dfmkit.cli import main

    root = tmp_path / "ck"
    recipe = tmp_path / "run.toml"
    recipe.write_text(_toml(tiny_recipe(root, train={"train_iters": 6})))
    assert main(["run", str(recipe), "train.train_iters=3"]) == 0
    capsys.readouterr()

    def full_disk(*args, **kwargs):
        stream = next(arg for arg in args if hasattr(arg, "write"))
        stream.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, NO_SPACE)

    with monkeypatch.context() as patch:
        patch.setattr(filesystem_async, "_write_item", full_disk)  # forked writers inherit it
        assert main(["run", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: could not save the checkpoint of step 6: the disk is full (")
    assert f"file system of {root};" in error and NO_SPACE in error and "Traceback" not in error
    assert error.rstrip().endswith(f"The unfinished {root / '.tmp_iter_0000006'} was removed; the previous checkpoint "
                                   f"{root / 'iter_0000003'} (step 3) is intact. Free some space (or point "
                                   "checkpoint.dir elsewhere) and run again to resume from it.")
    assert not list(root.glob(".tmp_*")) and (root / "latest").read_text() == "3\n"
    assert ckpt.complete_iterations(root) == [3]

    assert main(["run", str(recipe)]) == 0
    assert ckpt.complete_iterations(root) == [3, 6] and (root / "latest").read_text() == "6\n"


@pytest.mark.parametrize("when", ["at start", "during the run"])
def test_tensorboard_on_a_full_disk_warns_and_training_goes_on(tmp_path, monkeypatch, caplog, when):
    from tensorboard.compat.tensorflow_stub.io import gfile

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, NO_SPACE)

    recipe = tiny_recipe(tmp_path / "ck", train={"train_iters": 3}, optim={"warmup_iters": 1})
    if when == "at start":
        monkeypatch.setattr(gfile.LocalFileSystem, "_write", full_disk)
    trainer = Trainer(dfmkit.build(recipe))
    monkeypatch.setattr(gfile.LocalFileSystem, "_write", full_disk)
    with caplog.at_level(logging.WARNING, logger="dfmkit"):
        result = trainer.train()
    assert result["step"] == 3 and ckpt.find_checkpoint(tmp_path / "ck").name == "iter_0000003"
    said = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"TensorBoard logging to {tmp_path / 'ck' / 'tensorboard'} stopped: [Errno 28] "
                              f"{NO_SPACE}; training goes on without it")
