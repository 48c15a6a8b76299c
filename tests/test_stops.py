"""How a run ends when told to (SIGTERM/SIGINT, wherever it waits) or when something outside it goes wrong (a full
disk during a save or under TensorBoard)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time

import pytest
from test_train import finish_worker, start_worker, tiny_recipe

import dfmkit
from dfmkit.data.mock import MockLoader
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.loop import Trainer, train

NO_SPACE = os.strerror(errno.ENOSPC)


def test_a_stop_signal_during_a_step_lets_it_finish_then_saves_and_stops(tmp_path):
    trainer = Trainer(dfmkit.build(tiny_recipe(tmp_path / "sig", train={"train_iters": 10})))
    sent = []

    def signal_during_step_2(_module, _args):
        if trainer.state.step == 1 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    trainer.state.model.register_forward_pre_hook(signal_during_step_2)
    result = trainer.train()
    assert result["stopped_by_signal"] and result["step"] == 2 and len(result["losses"]) == 2
    assert ckpt.find_checkpoint(tmp_path / "sig").name == "iter_0000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


class SignalWhileFetching(MockLoader):
    """Mock packs that send this process SIGTERM while batch ``batch`` (counting from 0) is fetched."""

    def __init__(self, recipe, batch: int):
        super().__init__(recipe)
        self.batch = batch

    def __next__(self):
        if self.batches == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def _saved_loader(root, step):
    return json.loads((root / f"iter_{step:07d}" / "rank_00000.json").read_text())["loader"]


def test_a_stop_signal_while_fetching_saves_the_last_step_with_the_data_where_it_ended(tmp_path):
    """SIGTERM while the second batch of step 3 is fetched: the fetch stops, and the save holds step 2 with the data
    after step 2's batches (step 3's first batch is not counted as read), so the resumed run gives the losses of a
    run never stopped, bit for bit."""
    whole = train(dfmkit.build(tiny_recipe(tmp_path / "whole")))
    recipe = tiny_recipe(tmp_path / "sig", checkpoint={"save_interval": 0})
    job = dfmkit.build(recipe)
    stopped = Trainer(job, data=SignalWhileFetching(job.recipe, batch=5)).train()  # 2 batches a step
    assert stopped["stopped_by_signal"] and stopped["step"] == 2
    assert ckpt.complete_iterations(tmp_path / "sig") == [2] and _saved_loader(tmp_path / "sig", 2)["batches"] == 4
    rest = train(dfmkit.build(recipe))
    assert stopped["losses"] + rest["losses"] == whole["losses"]


def test_a_run_stuck_waiting_for_data_stops_within_seconds_of_sigterm_and_resumes_exactly(tmp_path):
    """A data loader that never delivers its 6th batch (step 3 has one of its two): SIGTERM, as `timeout` or a
    scheduler sends it, ends the run within seconds (it waited for the step forever), and the checkpoint holds step 2
    with the data after its batches; the run resumes from it with the losses of a run never stopped."""
    recipe = tiny_recipe(tmp_path / "ck", checkpoint={"save_interval": 0})
    process, *rest = start_worker(tmp_path, recipe, "stuck", block_data_after={0: 5})
    _wait_for(tmp_path / "blocking.rank0", process)
    time.sleep(0.5)
    result, out, took = sigterm(process, rest)
    assert result.returncode == 0, result.stdout[-3000:]
    assert took < 15, f"{took:.1f} s after SIGTERM"
    assert out["step"] == 2 and ckpt.complete_iterations(tmp_path / "ck") == [2]
    assert _saved_loader(tmp_path / "ck", 2)["batches"] == 4
    whole = train(dfmkit.build(tiny_recipe(tmp_path / "whole")))
    resumed = train(dfmkit.build(recipe))
    assert out["losses"] + resumed["losses"] == whole["losses"]


def test_a_loader_worker_stuck_in_a_read_ends_the_run_within_seconds_of_sigterm_without_a_save(tmp_path):
    """The Energon loader's worker process stops for good inside a sample (as a read of a hung file system does):
    the run waits, for its next batch or for the worker to say where it is for a save. SIGTERM ends it within
    seconds; the worker cannot say where the data was, so nothing is saved, and the message names the last complete
    checkpoint, which `latest` still names."""
    from test_data_harness import TEXT_DIM, index_dataset, write_good, write_info

    (tmp_path / "data").mkdir()
    write_good(tmp_path / "data", "train-a", range(0, 40))
    write_good(tmp_path / "data", "train-b", range(40, 80))
    write_info(tmp_path / "data")
    index_dataset(tmp_path / "data")
    recipe = tiny_recipe(tmp_path / "ck", model={"text_dim": TEXT_DIM}, train={"train_iters": 1000},
                         checkpoint={"save_interval": 1},
                         data={"mock": False, "path": str(tmp_path / "data"), "num_workers": 1, "seq_length": 256,
                               "packing_buffer_size": 4, "shuffle_buffer_size": 0})
    process, *rest = start_worker(tmp_path, recipe, "stalled", stall_loader_after=30)
    _wait_for(tmp_path / "stalled", process)
    time.sleep(1.0)
    result, _, took = sigterm(process, rest)
    assert result.returncode == 2, result.stdout[-3000:]
    assert took < 25, f"{took:.1f} s after SIGTERM"
    said = [line for line in result.stdout.splitlines() if line.startswith("error: stopped by SIGTERM")]
    assert len(said) == 1, result.stdout[-3000:]
    last = ckpt.find_checkpoint(tmp_path / "ck")
    assert said[0].endswith(f"not saved. The last complete checkpoint is {last} (step {int(last.name[5:])}); a run "
                            "started again resumes from it.")
    assert ("while the data loader was asked for its position" in said[0]
            or "its data could not go back to the start of the step (TimeoutError" in said[0])
    assert not list((tmp_path / "ck").glob(".tmp_*"))


def test_ranks_that_all_wait_for_data_stop_together_and_save_the_last_step(tmp_path):
    """Two data-parallel ranks under torchrun, both stuck in step 3 (one of its two batches each): SIGTERM to
    torchrun, which sends it on to both ranks; after a few seconds' grace each stops waiting, they agree, and save
    step 2 with each rank's data where that step ended."""
    recipe = tiny_recipe(tmp_path / "ck", train={"global_batch_size": 4}, checkpoint={"save_interval": 0})
    process, *rest = start_worker(tmp_path, recipe, "stuck", nproc=2, block_data_after={0: 5, 1: 5})
    for rank in (0, 1):
        _wait_for(tmp_path / f"blocking.rank{rank}", process)
    result, out, took = sigterm(process, rest)
    assert out is not None and out["step"] == 2, result.stdout[-3000:]
    assert took < 20, f"{took:.1f} s after SIGTERM"
    assert ckpt.complete_iterations(tmp_path / "ck") == [2]
    for rank in (0, 1):
        saved = json.loads((tmp_path / "ck" / "iter_0000002" / f"rank_{rank:05d}.json").read_text())["loader"]
        assert saved["batches"] == 4 and saved["dp_rank"] == rank


def test_a_rank_stuck_waiting_while_another_is_inside_the_step_ends_both_without_a_save(tmp_path):
    """Rank 0's data is stuck in step 3 while rank 1 has its batches and waits inside the step for rank 0: they
    cannot save together. Both end within seconds of SIGTERM without a save, and say which checkpoint is the last
    complete one."""
    recipe = tiny_recipe(tmp_path / "ck", train={"global_batch_size": 4}, checkpoint={"save_interval": 2})
    process, *rest = start_worker(tmp_path, recipe, "stuck", nproc=2, block_data_after={0: 5})
    _wait_for(tmp_path / "blocking.rank0", process)
    time.sleep(1.0)  # rank 1 reaches the step's first collective
    result, out, took = sigterm(process, rest)
    assert took < 20, f"{took:.1f} s after SIGTERM"
    assert out is None and ckpt.complete_iterations(tmp_path / "ck") == [2]
    last = (f"not saved. The last complete checkpoint is {tmp_path / 'ck' / 'iter_0000002'} (step 2); a run started "
            "again resumes from it.")
    said = [line for line in result.stdout.splitlines() if "error: stopped by SIGTERM" in line]
    assert len(said) == 2, result.stdout[-3000:]
    assert any("while waiting for the batches of step 3, while another rank was inside that step, waiting for this "
               f"one: {last}" in line for line in said)
    assert any("during step 3, which another rank left (" in line and line.endswith(last) for line in said)


def sigterm(process, rest):
    """SIGTERM to a worker of :func:`start_worker` (or its torchrun); its result, output and the seconds it took to
    end (a minute at most: then TimeoutExpired)."""
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    result, out = finish_worker(process, *rest, timeout=60)
    return result, out, time.monotonic() - sent


def _wait_for(marker, process, timeout=180):
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert process.poll() is None, "the run ended before its data got stuck"
        assert time.monotonic() < deadline, f"no {marker.name} after {timeout} s"
        time.sleep(0.2)


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
    assert error.startswith("error: could not save the checkpoint of step 6: the disk is full (")
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
