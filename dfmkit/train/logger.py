"""Metrics to TensorBoard (always), Weights & Biases (when configured), and progress on the console.

Progress is a rich bar when the output is a terminal (and ``logging.progress`` is on); elsewhere (a log
file, CI, a scheduler) and with ``progress = false`` it is one line per ``train.log_interval`` steps: step,
loss, learning rate, gradient norm, samples/s and the time left. The time left comes from
:class:`StepTimer`, which smooths the step time so that a validation or a checkpoint save does not make it
jump.

TensorBoard that cannot write (a full disk) stops with a warning; the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dfmkit.recipe import LoggingConfig

log = logging.getLogger("dfmkit")


class StepTimer:
    """Seconds per step, smoothed, and the time left.

    An exponential moving average over about ``window`` steps (the plain mean of the steps so far before
    that, so the first steps give an estimate at once). A step slower than ``spike`` times the estimate (a
    validation, a checkpoint save, a pause) counts as ``spike`` times it: the estimate follows a lasting
    change of speed within a few windows, while one pause moves it by at most ``(spike - 1) / window``.
    """

    def __init__(self, window: int = 50, spike: float = 4.0):
        self.window = window
        self.spike = spike
        self.count = 0
        self.seconds_per_step: float | None = None

    def update(self, seconds: float) -> None:
        """Add one step that took ``seconds``."""
        self.count += 1
        if self.seconds_per_step is None:
            self.seconds_per_step = seconds
            return
        seconds = min(seconds, self.spike * self.seconds_per_step)
        weight = max(1.0 / self.count, 1.0 / self.window)
        self.seconds_per_step += weight * (seconds - self.seconds_per_step)

    def remaining(self, steps: int) -> float | None:
        """Seconds for ``steps`` more steps, or None before the first step."""
        return None if self.seconds_per_step is None else steps * self.seconds_per_step


def format_eta(seconds: float | None) -> str:
    """``M:SS`` or ``H:MM:SS``; ``-:--`` when not known yet."""
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricsLogger:
    """Writes scalars and images on rank 0; other ranks hold a logger that does nothing."""

    def __init__(self, config: LoggingConfig, checkpoint_dir: str, run_config: dict[str, Any], enabled: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        self.progress = None
        self._task = None
        self.total_steps = total_steps
        self.timer = StepTimer()
        self._last: tuple[int, float] | None = None  # (step, time) of the last advance
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        from dfmkit.compat.tensorboard import quiet_writer_thread_errors

        quiet_writer_thread_errors()  # a failed write is one warning below, not also the writer thread's traceback
        self.dir = Path(config.dir or os.path.join(checkpoint_dir, "tensorboard"))
        try:
            self.tensorboard = SummaryWriter(str(self.dir))
        except OSError as exc:
            self._tensorboard_failed(exc)
        if config.wandb_project:
            self.wandb = _start_wandb(config, run_config)
        from rich.console import Console

        console = Console()
        if config.progress and console.is_terminal:  # a bar in a log file is a line per refresh, or nothing
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"), TextColumn("{task.fields[status]}"), console=console,
            )
            self.progress.start()
            self._task = self.progress.add_task("train", total=total_steps, completed=start_step, status="",
                                                eta=format_eta(None))

    def _tensorboard_write(self, write: Callable[[Any], None]) -> None:
        """``write(SummaryWriter)``, if TensorBoard still logs; a write that fails stops TensorBoard, not the run."""
        if self.tensorboard is None:
            return
        try:
            write(self.tensorboard)
        except OSError as exc:
            writer, self.tensorboard = self.tensorboard, None
            with contextlib.suppress(OSError):
                writer.close()
            self._tensorboard_failed(exc)

    def _tensorboard_failed(self, exc: OSError) -> None:
        log.warning("TensorBoard logging to %s stopped: %s; training goes on without it (free some space or point "
                    "logging.dir elsewhere to have it next run)", self.dir, exc)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._tensorboard_write(lambda writer: [writer.add_scalar(key, value, step) for key, value in values.items()])
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, step: int, tag: str, images: dict[int, np.ndarray]) -> None:
        """``images``: HxWx3 uint8 arrays by index (the tag of image ``i`` is ``<tag>/<i>``)."""
        if not self.enabled or not images:
            return
        self._tensorboard_write(lambda writer: [writer.add_image(f"{tag}/{index}", image, step, dataformats="HWC")
                                                for index, image in images.items()])
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: [wandb.Image(image, caption=str(i)) for i, image in images.items()]}, step=step)

    def advance(self, step: int, status: str = "") -> None:
        """Step ``step`` is done: time it (from the previous one) and move the bar."""
        now = time.perf_counter()
        if self._last is not None and step > self._last[0]:
            self.timer.update((now - self._last[1]) / (step - self._last[0]))
        self._last = (step, now)
        if self.progress is not None:
            self.progress.update(self._task, completed=step, status=status, eta=self.eta(step))

    def eta(self, step: int) -> str:
        return format_eta(self.timer.remaining(self.total_steps - step))

    def step_line(self, step: int, values: dict[str, float]) -> None:
        """The figures of a log interval as one line, where no bar shows progress."""
        if not self.enabled or self.progress is not None:
            return
        log.info(f"step {step}/{self.total_steps}  loss {values['train/loss']:.4f}  lr {values['train/lr']:.2e}  "
                 f"grad norm {values['train/grad_norm']:.3f}  {values['train/samples_per_s']:.1f} samples/s  "
                 f"eta {self.eta(step)}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self._tensorboard_write(lambda writer: writer.close())
        self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(config: LoggingConfig, run_config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        log.warning("logging.wandb_project is set but wandb is not installed (pip install 'dfmkit[wandb]'); "
                    "logging to TensorBoard only")
        return None
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled")):
        try:
            has_key = bool(wandb.api.api_key)
        except Exception:
            has_key = False
        if not has_key:
            log.warning("logging.wandb_project is set but no W&B key was found (set WANDB_API_KEY or run "
                        "`wandb login`); logging to TensorBoard only")
            return None
    return wandb.init(project=config.wandb_project, entity=config.wandb_entity or None, config=run_config)
