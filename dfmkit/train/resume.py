"""Resuming a run: which checkpoint it continues (``checkpoint.load``, else the newest complete one in
``checkpoint.dir`` with ``checkpoint.resume``), what may differ from the recipe it was saved with, and loading it
into the training state, this rank's RNGs and the data loader's position.

What may change on resume: how the model is computed, not what it is. The backbone's options mark the fields that
only change how it is computed (``dfmkit.hookspecs.COMPUTATION_ONLY``; the DiT's attention, recompute, compile,
fused_kernels, cuda_graphs, use_cpu_initialization); any other difference in ``[model]`` is refused before anything
is loaded, naming each difference.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

import attrs

from dfmkit.hookspecs import COMPUTATION_ONLY
from dfmkit.parallel import ParallelLayout
from dfmkit.recipe import CheckpointConfig, Recipe, dump_recipe
from dfmkit.registry import Registries
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.state import TrainState

log = logging.getLogger("dfmkit")


def checkpoint_to_resume(config: CheckpointConfig) -> Path | None:
    """The checkpoint a run with these settings continues from, or None to start fresh."""
    source = config.load or (config.dir if config.resume else "")
    if not source:
        return None
    found = ckpt.find_checkpoint(source)
    if found is None and config.load:
        raise ckpt.CheckpointError(f"checkpoint.load: no complete checkpoint in '{config.load}' "
                                   f"(a complete one holds {ckpt.MARKER})")
    return found


def computation_only_options(options: Any) -> frozenset[str]:
    """The fields of a component's attrs options marked as changing only how it computes (COMPUTATION_ONLY)."""
    return frozenset(field.name for field in attrs.fields(type(options)) if field.metadata.get(COMPUTATION_ONLY))


def check_same_model(found: Path, marker: dict[str, Any], recipe: Recipe, registries: Registries) -> None:
    """Refuse a checkpoint whose ``[model]`` section differs from the recipe's in more than the options that only
    change how the model is computed."""
    saved = tomllib.loads(marker.get("recipe", "")).get("model", {})
    current = tomllib.loads(dump_recipe(recipe, registries=registries))["model"]
    free = computation_only_options(recipe.model.options)
    differences = [f"model.{key}: checkpoint {saved.get(key)!r}, recipe {current.get(key)!r}"
                   for key in sorted((set(saved) | set(current)) - free) if saved.get(key) != current.get(key)]
    if differences:
        raise ckpt.CheckpointError(
            f"{found} does not fit the model of this recipe ({'; '.join(differences)}); point checkpoint.dir "
            "elsewhere, or set checkpoint.resume=false to start fresh")


def resume(state: TrainState, data: Any, recipe: Recipe, registries: Registries, env: ParallelLayout) -> Path | None:
    """Load the checkpoint ``recipe`` continues from into ``state``, this rank's RNGs and ``data`` (when it has
    ``restore_state``); returns it, or None when the run starts fresh."""
    found = checkpoint_to_resume(recipe.checkpoint)
    if found is None:
        return None
    check_same_model(found, ckpt.read_marker(found), recipe, registries)
    rank_state = state.load(found)
    ckpt.set_rng_state(rank_state["rng"])
    if rank_state.get("loader") is not None and hasattr(data, "restore_state"):
        data.restore_state(rank_state["loader"])
    if env.rank == 0:
        log.info("resumed from %s at step %d", found, state.step)
    return found
