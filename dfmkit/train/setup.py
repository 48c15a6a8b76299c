"""What a run settles before its state is built: the device and the model's dtype, the micro-batches each
data-parallel rank runs per step, and the dataset (prepared from ``data.prepare_source`` when it is missing); and,
for the parts of the set-up that can fail on some ranks only, that every rank learns of it (:func:`on_every_rank`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dfmkit.devices import resolve_device, resolve_precision
from dfmkit.errors import DfmkitError, RecipeError
from dfmkit.parallel import ParallelLayout
from dfmkit.plugins import PluginManager
from dfmkit.recipe import Recipe, TrainConfig

log = logging.getLogger("dfmkit")

T = TypeVar("T")

#: Bytes of a failed rank's message that the other ranks receive.
MESSAGE_BYTES = 4096


def on_every_rank(build: Callable[[], T], group: Any) -> T:
    """``build()``, a part of the set-up that may fail on some ranks only (the data of one node, the validation
    prompts that data-parallel group 0 prepares), then every rank of ``group`` (a gloo group of all ranks, or None
    in a run of one process) learns whether it failed anywhere. A rank that failed raises its own error; the others
    raise a :class:`DfmkitError` with the first failed rank's message. Without this they would go on into the
    first collective of training and wait there for a rank that has ended."""
    error: Exception | None = None
    try:
        result = build()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = exc
    if group is not None:
        message = f"{type(error).__name__}: {error}" if error is not None and not isinstance(error, DfmkitError) \
            else str(error or "")
        encoded = message.encode()[:MESSAGE_BYTES]
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
        dist.all_gather(lengths, torch.tensor([len(encoded) if error is not None else -1]), group=group)
        failed = [rank for rank, length in enumerate(lengths) if int(length) >= 0]
        if failed:
            payload = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
            if dist.get_rank() == failed[0] and encoded:
                payload[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
            dist.broadcast(payload, src=failed[0], group=group)
            if error is None:
                text = bytes(payload[: int(lengths[failed[0]])].tolist()).decode(errors="replace")
                raise DfmkitError(f"rank {failed[0]} could not set up the run ({len(failed)} of {len(lengths)} "
                                  f"ranks failed), so this rank stops too: {text}")
    if error is not None:
        raise error
    return result


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
