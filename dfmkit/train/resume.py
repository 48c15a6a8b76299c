"""Resuming a run: which checkpoint it continues (``checkpoint.load``, else the newest complete one in
``checkpoint.dir`` with ``checkpoint.resume``), what may differ from the recipe it was saved with, and loading it
into the training state, this rank's RNGs and the data loader's position.

What may change on resume: how the model is computed, not what it is. The backbone's options mark the fields that
only change how it is computed (``dfmkit.hookspecs.COMPUTATION_ONLY``; the DiT's attention, recompute, compile,
fused_kernels, cuda_graphs, use_cpu_initialization); any other difference in ``[model]`` is refused before anything
is loaded, naming each difference; so is another objective (``diffusion.name``). The optimizer and its schedule (``[optim]``, ``train.train_iters``) are the
recipe's: a run resumed with other settings follows them from its next step (the learning rate of the new schedule
at the checkpoint's step; AdamW's betas, eps and weight decay; a longer or shorter run), and says so, one line per
setting that changed; the optimizer's state (moments, step counts) comes from the checkpoint. The data position
is restored only on the data it was saved on (the split's index: shards and samples; another path with the same
index is fine); other data is refused, naming what changed, unless ``checkpoint.on_data_change = "restart"``, which
resumes everything else and reads the data from its start.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

import attrs

from dfmkit.data.loader import DatasetChanged
from dfmkit.hookspecs import COMPUTATION_ONLY
from dfmkit.parallel import ParallelLayout
from dfmkit.recipe import CheckpointConfig, Recipe, dump_recipe, objective_mismatch
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
    change how the model is computed, or that was trained with another objective."""
    saved_recipe = tomllib.loads(marker.get("recipe", ""))
    mismatch = objective_mismatch(saved_recipe, recipe) if saved_recipe else None
    if mismatch:
        raise ckpt.CheckpointError(
            f"{found} was trained with {mismatch}: a model learns what its objective asks, so it cannot go on "
            f"under another; set the recipe's [diffusion] back to the checkpoint's, or point checkpoint.dir "
            "elsewhere to start fresh")
    saved = saved_recipe.get("model", {})
    current = tomllib.loads(dump_recipe(recipe, registries=registries))["model"]
    free = computation_only_options(recipe.model.options)
    differences = [f"model.{key}: checkpoint {saved.get(key)!r}, recipe {current.get(key)!r}"
                   for key in sorted((set(saved) | set(current)) - free) if saved.get(key) != current.get(key)]
    if differences:
        raise ckpt.CheckpointError(
            f"{found} does not fit the model of this recipe ({'; '.join(differences)}); point checkpoint.dir "
            "elsewhere, or set checkpoint.resume=false to start fresh")


def changed_settings(marker: dict[str, Any], recipe: Recipe, registries: Registries) -> list[tuple[str, Any, Any]]:
    """The optimizer and schedule settings (``[optim]``, ``train.train_iters``) in which ``recipe`` differs from the
    recipe the checkpoint was saved with: (key, the checkpoint's value, the recipe's)."""
    if not marker.get("recipe"):
        return []
    saved = tomllib.loads(marker["recipe"])
    current = tomllib.loads(dump_recipe(recipe, registries=registries))
    keys = [f"optim.{name}" for name in sorted(set(saved.get("optim", {})) | set(current["optim"]))]

    def value(tree: dict[str, Any], key: str) -> Any:
        section, name = key.split(".")
        return tree.get(section, {}).get(name)

    return [(key, value(saved, key), value(current, key)) for key in [*keys, "train.train_iters"]
            if value(saved, key) != value(current, key)]


def restore_data(data: Any, loader_state: dict[str, Any], config: CheckpointConfig, step: int,
                 env: ParallelLayout) -> None:
    """Put ``data`` at its saved position; on data other than the checkpoint's (:class:`DatasetChanged`) refuse, or
    with ``checkpoint.on_data_change = "restart"`` leave it at its start."""
    try:
        data.restore_state(loader_state)
    except DatasetChanged as exc:
        if config.on_data_change != "restart":
            raise ckpt.CheckpointError(
                f"cannot resume the data position: {exc}. Point data.path at the data the checkpoint read, or resume "
                "on this data from its start with checkpoint.on_data_change=\"restart\" (the model, optimizer, "
                f"schedule and step {step} are restored)") from None
        if env.rank == 0:
            log.warning("%s; checkpoint.on_data_change = \"restart\": the data is read from its start (and its "
                        "skipped samples counted afresh), everything else resumes at step %d", exc, step)


def resume(state: TrainState, data: Any, recipe: Recipe, registries: Registries, env: ParallelLayout) -> Path | None:
    """Load the checkpoint ``recipe`` continues from into ``state``, this rank's RNGs and ``data`` (when it has
    ``restore_state``); returns it, or None when the run starts fresh."""
    found = checkpoint_to_resume(recipe.checkpoint)
    if found is None:
        return None
    marker = ckpt.read_marker(found)
    check_same_model(found, marker, recipe, registries)
    rank_state = state.load(found)
    ckpt.set_rng_state(rank_state["rng"])
    if rank_state.get("loader") is not None and hasattr(data, "restore_state"):
        restore_data(data, rank_state["loader"], recipe.checkpoint, state.step, env)
    if env.rank == 0:
        log.info("resumed from %s at step %d", found, state.step)
        for key, saved, current in changed_settings(marker, recipe, registries):
            log.info("%s is %r in the recipe, %r in the checkpoint: the recipe's applies from step %d", key, current,
                     saved, state.step + 1)
    return found
