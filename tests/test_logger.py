"""Training progress: a smoothed ETA, and one line per log interval where no progress bar can be drawn."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
from test_train import tiny_recipe

import dfmkit
from dfmkit.train.logger import StepTimer, format_eta
from dfmkit.train.loop import train


def eta_after(step_seconds: list[float], total: int) -> list[float]:
    timer = StepTimer()
    etas = []
    for done, seconds in enumerate(step_seconds, 1):
        timer.update(seconds)
        etas.append(timer.remaining(total - done))
    return etas


def test_the_eta_follows_the_speed_but_not_a_pause():
    # 1 s per step, and at step 300 a 60 s pause (a validation or a checkpoint save).
    times = [1.0] * 299 + [60.0] + [1.0] * 200
    etas = eta_after(times, total=1000)
    before, after = etas[298], etas[299]
    assert before == pytest.approx(701.0, rel=0.01)
    assert after / (before - 1.0) < 1.10  # a naive last-30-s rate would more than double it
    assert etas[-1] == pytest.approx(500.0, rel=0.02)  # and it is forgotten
    # A lasting change of speed (1 s -> 2 s per step) is followed within a few windows.
    etas = eta_after([1.0] * 200 + [2.0] * 300, total=1000)
    assert etas[-1] == pytest.approx(1000.0, rel=0.02)


def test_the_first_steps_give_an_eta_at_once():
    timer = StepTimer()
    assert timer.remaining(10) is None and format_eta(None) == "-:--"
    timer.update(2.0)
    assert timer.remaining(10) == pytest.approx(20.0)
    assert format_eta(3725.4) == "1:02:05" and format_eta(65) == "1:05"


def test_output_that_is_not_a_terminal_gets_a_line_per_log_interval(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # as in CI or a scheduler's log file
    recipe = tiny_recipe(tmp_path / "file", train={"train_iters": 4, "log_interval": 2}, optim={"warmup_iters": 1},
                         logging={"progress": True})
    with caplog.at_level(logging.INFO, logger="dfmkit"):
        train(dfmkit.build(recipe))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2, caplog.text
    pattern = r"step {}/4  loss \d+\.\d{{4}}  lr \d\.\d\de-\d\d  grad norm \d+\.\d{{3}}  \d+\.\d samples/s  eta \S+"
    assert re.fullmatch(pattern.format(2), lines[0]) and re.fullmatch(pattern.format(4), lines[1])


def test_a_terminal_gets_the_bar_instead(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    recipe = tiny_recipe(tmp_path / "tty", train={"train_iters": 2, "log_interval": 1}, optim={"warmup_iters": 1},
                         logging={"progress": True})
    with caplog.at_level(logging.INFO, logger="dfmkit"):
        train(dfmkit.build(recipe))
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]
    bar = capsys.readouterr().out
    assert "2/2" in bar and "eta" in bar



_FULL_DISK_TENSORBOARD = """
import errno, sys, threading, time
from tensorboard.compat.tensorflow_stub.io import gfile
from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
from torch.utils.tensorboard import SummaryWriter
from dfmkit.compat.tensorboard import quiet_writer_thread_errors

if sys.argv[2] == "quiet":
    quiet_writer_thread_errors()
writer = SummaryWriter(sys.argv[1])

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

gfile.LocalFileSystem._write = full_disk
for step in range(100):
    try:
        writer.add_scalar("loss", 1.0, step)
        writer.flush()
    except OSError as exc:
        print("the loop's write raised", errno.errorcode[exc.errno])
        break
    time.sleep(0.02)
for thread in threading.enumerate():
    if isinstance(thread, _AsyncWriterThread):
        thread.join(timeout=5)
"""


@pytest.mark.parametrize("quiet", [True, False])
def test_a_failed_tensorboard_write_raises_in_the_loop_and_the_thread_prints_no_traceback(tmp_path, quiet):
    """TensorBoard's writer thread re-raises a failed write, which Python prints; the loop's next write raises it
    too, and the logger warns once (tests/test_stops.py). dfmkit.compat.tensorboard keeps the thread's copy quiet.
    In a process of its own: pytest catches thread exceptions itself."""
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_TENSORBOARD, str(tmp_path), "quiet" if quiet else "-"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "the loop's write raised ENOSPC" in result.stdout, result.stderr[-2000:]
    printed = "Exception in thread" in result.stderr and "Traceback" in result.stderr
    assert printed is not quiet, result.stderr[-2000:]
