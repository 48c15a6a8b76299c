"""What a run settles before its state is built: the device and the model's dtype, the micro-batches each
data-parallel rank runs per step, and the dataset (prepared from ``data.prepare_source`` when it is missing)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dfmkit.devices import resolve_device, resolve_precision
from dfmkit.errors import RecipeError
from dfmkit.parallel import ParallelLayout
from dfmkit.plugins import PluginManager
from dfmkit.recipe import Recipe, TrainConfig

log = logging.getLogger("dfmkit")


def training_device(train: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device ``train.device`` names and the model's dtype ``train.precision`` names on it."""
    device = resolve_device(train.device, "train.device", "use train.device=cpu")
    return device, resolve_precision(train.precision, device, "train.precision")


def micro_batches_per_rank(train: TrainConfig, env: ParallelLayout) -> int:
    """How many packed sequences (micro-batches) each data-parallel rank runs per optimizer step."""
    if train.global_batch_size % env.dp_size:
        raise RecipeError([
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by the data-parallel size "
            f"{env.dp_size} (= {env.world_size} processes / tensor {env.tp_size} / context {env.cp_size}); a "
            "micro-batch is one packed sequence"
        ])
    return train.global_batch_size // env.dp_size


def ensure_dataset(recipe: Recipe, plugins: PluginManager) -> None:
    """Check that ``data.path`` holds a dataset (nothing to check with mock data); prepare it from
    ``data.prepare_source`` when the folder does not exist and a source is named."""
    data = recipe.data
    if data.mock:
        return
    if not data.path:
        raise RecipeError(["data.path is empty: point it at a folder written by `dfmkit prepare`, "
                           "or train on mock data with --mock (data.mock=true)"])
    if Path(data.path).exists():
        return
    if not data.prepare_source:
        raise RecipeError([f"data.path: dataset folder '{data.path}' does not exist; create it with "
                           f"`dfmkit prepare RECIPE --source ... --out {data.path}`, or name a source "
                           "in data.prepare_source"])
    from dfmkit.data.prepare import prepare

    log.info("data.path '%s' does not exist: preparing it from data.prepare_source '%s' first",
             data.path, data.prepare_source)
    prepare(recipe, data.prepare_source, data.path, plugins=plugins)
