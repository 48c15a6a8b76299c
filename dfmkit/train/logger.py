"""Metrics to TensorBoard (always), Weights & Biases (when configured) and a rich progress bar."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dfmkit.recipe import LoggingConfig

log = logging.getLogger("dfmkit")


class MetricsLogger:
    """Writes scalars and images on rank 0; other ranks hold a logger that does nothing."""

    def __init__(self, config: LoggingConfig, checkpoint_dir: str, run_config: dict[str, Any], enabled: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        self.progress = None
        self._task = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(config.dir or os.path.join(checkpoint_dir, "tensorboard"))
        self.tensorboard = SummaryWriter(str(self.dir))
        if config.wandb_project:
            self.wandb = _start_wandb(config, run_config)
        if config.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            )
            self.progress.start()
            self._task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, step: int, tag: str, images: dict[int, np.ndarray]) -> None:
        """``images``: HxWx3 uint8 arrays by index (the tag of image ``i`` is ``<tag>/<i>``)."""
        if not self.enabled or not images:
            return
        for index, image in images.items():
            self.tensorboard.add_image(f"{tag}/{index}", image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: [wandb.Image(image, caption=str(i)) for i, image in images.items()]}, step=step)

    def advance(self, step: int, status: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self._task, completed=step, status=status)

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
        if self.tensorboard is not None:
            self.tensorboard.close()
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
