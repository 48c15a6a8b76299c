"""Loading a trained model: a checkpoint of ``dfmkit run`` or an export of ``dfmkit export``, built for a parallel
layout, device and dtype (:func:`load_model`, used by :func:`dfmkit.generation.load` and ``dfmkit export``).

Where the weights come from (:func:`resolve_source` tells them apart):

- a **checkpoint** (a ``checkpoint.dir`` with ``iter_NNNNNNN/`` folders, or one of them): its resolved recipe
  (in ``dfmkit.json``) gives the model, tokenizer, text encoder, sampler and defaults, and only the ``model``
  and ``ema`` entries of megatron's distributed checkpoint are read (optimizer state is left on disk).
  megatron reshards on load, so a checkpoint saved with any tensor/context-parallel layout loads into the
  layout generation runs with.
- an **export** (``config.json`` + ``ema.safetensors`` + ``model.safetensors``): plain safetensors, no
  distributed checkpoint; see :mod:`dfmkit.generation.export_format`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

from dfmkit import parallel
from dfmkit.devices import resolve_device, resolve_precision
from dfmkit.errors import GenerateError
from dfmkit.generation import export_format
from dfmkit.generation.weights import WEIGHTS, assign_weights, full_shapes, read_checkpoint_states, slice_for_layout
from dfmkit.job import Job
from dfmkit.parallel import ParallelLayout
from dfmkit.plugins import PluginManager, default_plugins
from dfmkit.recipe import ParallelConfig, Recipe, load_recipe, objective_mismatch
from dfmkit.train import checkpoint as ckpt


def resolve_source(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """("export", folder) or ("checkpoint", iteration folder) for ``path``; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise GenerateError(f"checkpoint '{path}' does not exist; give a checkpoint folder of `dfmkit run` "
                            "(checkpoint.dir or one of its iter_* folders) or an export folder of `dfmkit export`")
    if export_format.is_export(path):
        return "export", path
    found = ckpt.find_checkpoint(path)
    if found is None:
        partial = sorted(p.name for p in path.glob("iter_*")) + sorted(p.name for p in path.glob(".tmp_iter_*"))
        detail = (f"; it has {', '.join(partial[:5])} without {ckpt.MARKER} (a save that did not finish)"
                  if partial else "")
        raise GenerateError(
            f"'{path}' holds no complete checkpoint: a complete one is an iter_NNNNNNN folder with {ckpt.MARKER} "
            f"(written last by a save){detail}. Point --checkpoint at a checkpoint.dir of `dfmkit run`, one of its "
            "iter_* folders, or a folder written by `dfmkit export`")
    return "checkpoint", found


def checkpoint_recipe_data(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the recipe as TOML data, the marker) of a complete checkpoint."""
    marker = ckpt.read_marker(checkpoint)
    text = marker.get("recipe")
    if not isinstance(text, str):
        raise GenerateError(f"{checkpoint / ckpt.MARKER} holds no recipe; it was not written by dfmkit's trainer")
    try:
        return tomllib.loads(text), marker
    except tomllib.TOMLDecodeError as exc:
        raise GenerateError(f"the recipe in {checkpoint / ckpt.MARKER} is not valid TOML: {exc}") from None


def generation_parallel(tensor: int = 1, context: int | None = None) -> ParallelConfig:
    """The layout generation runs with: ``tensor`` x ``context`` (default: the processes left over)."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if tensor < 1 or world % tensor:
        raise GenerateError(f"tensor parallelism {tensor} does not divide the {world} processes")
    context = world // tensor if context is None else context
    if context < 1 or world % (tensor * context):
        raise GenerateError(f"{world} processes cannot run tensor {tensor} x context {context}")
    return ParallelConfig(tensor=tensor, context=context)


@attrs.frozen
class LoadedModel:
    """A model built from a checkpoint or an export, with what it was built from.

    ``recipe`` is the recipe as the source holds it (with the overrides); ``job.recipe`` is that recipe with
    the parallel layout it runs with. ``source`` is ``{"kind", "path", "iteration"}``; ``saved`` the
    checkpoint's ``dfmkit.json`` marker or the export's ``config.json``."""

    recipe: Recipe
    job: Job
    model: torch.nn.Module
    env: ParallelLayout
    device: torch.device
    dtype: torch.dtype
    source: dict[str, Any]
    saved: dict[str, Any]


def load_model(
    path: str | os.PathLike[str],
    *,
    layout: ParallelConfig,
    weights: str | None = "ema",
    recipe: Recipe | None = None,
    overrides: Sequence[str] = (),
    plugins: PluginManager | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> LoadedModel:
    """The model of the checkpoint or export at ``path``, built for ``layout`` on ``device``.

    ``recipe`` (default: the one stored with the weights) and ``overrides`` give the components. With
    ``weights`` ("ema" or "model") those weights are copied in and the model is readied for sampling: in the
    dtype of ``precision`` ("auto": the recipe's ``train.precision``), in eval mode, without gradients.
    ``weights=None`` leaves the model as built, for a caller that reads the weights itself (``dfmkit export``).
    """
    if weights is not None and weights not in WEIGHTS:
        raise GenerateError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    plugins = plugins or default_plugins()
    kind, where = resolve_source(path)
    if kind == "export":
        saved = export_format.read_config(where)
        data, iteration = export_format.recipe_data(saved), saved.get("iteration")
        model_name = saved["backbone"]["name"]
    else:
        data, saved = checkpoint_recipe_data(where)
        iteration, model_name = saved.get("iteration"), saved.get("model")
    if recipe is None:
        recipe = load_recipe(data, overrides, registries=plugins.registries)
    else:
        recipe = load_recipe(recipe, overrides, registries=plugins.registries)
        if recipe.model.name != model_name:
            raise GenerateError(f"{where} holds a '{model_name}' model, the recipe builds '{recipe.model.name}'")
    if mismatch := objective_mismatch(data, recipe):
        raise GenerateError(f"{where} was trained with {mismatch}: its outputs mean what that objective taught it; "
                            "leave diffusion.name and these options as they are (the sampling options, such as the "
                            "grid, may change)")
    device = resolve_device(device, "--device", "use --device cpu")
    running = attrs.evolve(recipe, parallel=layout)
    env = parallel.initialize(layout, device, seed=running.train.seed)
    dtype = resolve_precision(recipe.train.precision if precision == "auto" else precision, device, "--precision")

    job = Job(running, plugins)
    model = job.components["model"].build(recipe=running).to(device)
    if weights is not None:
        if kind == "export":
            full = export_format.load_weights(where, saved, weights, full_shapes(model))
            state = slice_for_layout(model, full)
        else:
            states = read_checkpoint_states(model, where, WEIGHTS if weights == "ema" else ("model",))
            state = dict(states["model"])
            if weights == "ema":
                state.update(states["ema"])  # the EMA covers the trained parameters; buffers come from the model
        assign_weights(model, {k: v.to(device) for k, v in state.items()})
        model.to(dtype).eval().requires_grad_(False)
    source = {"kind": kind, "path": str(where), "iteration": iteration}
    return LoadedModel(recipe=recipe, job=job, model=model, env=env, device=device, dtype=dtype, source=source,
                       saved=saved)
