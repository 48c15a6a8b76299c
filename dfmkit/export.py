"""``dfmkit export``: a checkpoint as plain safetensors + ``config.json``, loadable without megatron's
distributed checkpoint.

Layout of an export folder::

    config.json         {"format": "dfmkit-export", "version": 1, "recipe": <resolved recipe TOML>,
                         "backbone": {"name": ..., options}, "tokenizer": {...}, "text_encoder": {...},
                         "iteration": n, "weights": {"ema": "ema.safetensors", "model": "model.safetensors"}, ...}
    ema.safetensors     the EMA weights (float32)
    model.safetensors   the raw trained weights (in the dtype they were trained in)

Both weight files hold the FULL tensors (tensor-parallel shards gathered) under the plain names of
``model.state_dict()`` (``x_embedder.weight``, ``decoder.layers.0.mlp.linear_fc1.weight``, ...), each
a complete state dict of the backbone. The export is made by loading the checkpoint into a model
with tensor and context parallelism 1 in each process (megatron's distributed checkpoint reshards
on load), so a checkpoint of any parallel layout exports the same files.

``backbone``/``tokenizer``/``text_encoder`` describe the components; loading an export
(:func:`dfmkit.generate.load`) takes them from config.json over the stored recipe, so editing
them (for example ``text_encoder.path`` to a local copy of the T5 weights) changes what is built.
The text-encoder and tokenizer weights are not copied into the export: they are named there
(hub ids or paths) as in the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import torch

from dfmkit.devices import resolve_device
from dfmkit.errors import DfmkitError

EXPORT_FORMAT = "dfmkit-export"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}


class ExportError(DfmkitError):
    """An export folder that is missing, incomplete, or of another format."""


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with a dfmkit export's config.json."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json of the export at ``path``, checked: format, version, sections and weight files."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path / CONFIG_FILE} cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path / CONFIG_FILE} is not a dfmkit export (its format is not '{EXPORT_FORMAT}')")
    if config.get("version") != EXPORT_VERSION:
        raise ExportError(f"{path} is a dfmkit export of version {config.get('version')}; this dfmkit reads version "
                          f"{EXPORT_VERSION}")
    problems = []
    if not isinstance(config.get("recipe"), str):
        problems.append("'recipe' (the resolved recipe as TOML text) is missing")
    for key in ("backbone", "tokenizer", "text_encoder"):
        section = config.get(key)
        if not isinstance(section, dict) or not isinstance(section.get("name"), str):
            problems.append(f"'{key}' must be a table with a 'name'")
    if problems:
        raise ExportError(f"{path / CONFIG_FILE}: " + "; ".join(problems))
    return config


def recipe_data(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe (TOML data) an export describes: its stored recipe with config.json's component sections."""
    try:
        data = tomllib.loads(config["recipe"])
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise ExportError(f"the recipe in the export's {CONFIG_FILE} is not valid TOML text: {exc}") from None
    data["model"] = dict(config["backbone"])
    data["tokenizer"] = dict(config["tokenizer"])
    data["text_encoder"] = dict(config["text_encoder"])
    return data


def load_weights(path: str | os.PathLike[str], config: dict[str, Any], weights: str = "ema") -> dict[str, torch.Tensor]:
    """The full weights ("ema" or "model") of the export at ``path``, by ``model.state_dict()`` name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = config.get("weights", WEIGHT_FILES).get(weights)
    if name is None:
        raise ExportError(f"the export {path} has no '{weights}' weights (it has {sorted(config.get('weights', {}))})")
    file = Path(path) / name
    if not file.is_file():
        raise ExportError(f"the export {path} lacks {name}; export the checkpoint again with `dfmkit export`")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{file} is not a readable safetensors file ({exc})") from None


def export(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    plugins: Any = None,
    device: str = "auto",
) -> Path:
    """Write the export of ``checkpoint`` (a checkpoint.dir or one iter_* folder) to ``out``; returns ``out``.

    Every process loads the whole model (tensor and context parallelism 1); rank 0 writes. ``out`` must
    not exist, be empty, or (with ``overwrite``) hold an earlier export; the files appear together (the
    folder is written aside and renamed).
    """
    import attrs
    from safetensors.torch import save_file

    from dfmkit import __version__, parallel
    from dfmkit.generate import (
        GenerateError,
        checkpoint_recipe_data,
        read_checkpoint_states,
        resolve_source,
    )
    from dfmkit.job import Job
    from dfmkit.plugins import default_plugins
    from dfmkit.recipe import ParallelConfig, dump_recipe, load_recipe, recipe_to_dict

    out = Path(out)
    kind, found = resolve_source(checkpoint)
    if kind != "checkpoint":
        raise ExportError(f"'{checkpoint}' is already an export; give a checkpoint folder of `dfmkit run`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite and is_export(out)):
        what = "an earlier export (pass --overwrite to replace it)" if is_export(out) else "other files"
        raise ExportError(f"--out '{out}' already holds {what}; give a new or empty folder")
    plugins = plugins or default_plugins()
    data, marker = checkpoint_recipe_data(found)
    stored = load_recipe(data, registries=plugins.registries)
    layout = ParallelConfig(tensor=1, context=1)
    recipe = attrs.evolve(stored, parallel=layout)
    torch_device = resolve_device(device, "--device", "use --device cpu")
    env = parallel.initialize(layout, torch_device, seed=recipe.train.seed)
    job = Job(recipe, plugins)
    model = job.components["model"].build(recipe=recipe).to(torch_device)
    try:
        states = read_checkpoint_states(model, found)
    except GenerateError as exc:
        raise ExportError(str(exc)) from None
    names = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    buffers = {k: v.detach() for k, v in model.state_dict().items() if k in names and k not in states["model"]}
    files = {}
    for weights, state in (("model", states["model"]), ("ema", {**states["model"], **states["ema"]})):
        tensors = {**buffers, **state}
        missing = sorted(names - set(tensors))
        if missing:
            raise ExportError(f"{found} lacks {weights} weights for {', '.join(missing[:5])}")
        files[weights] = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(names)}

    if env.rank == 0:
        registries = plugins.registries
        sections = recipe_to_dict(stored, registries=registries)
        config = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "recipe": dump_recipe(stored, registries=registries),
            "backbone": sections["model"],
            "tokenizer": sections["tokenizer"],
            "text_encoder": sections["text_encoder"],
            "iteration": marker.get("iteration"),
            "weights": dict(WEIGHT_FILES),
            "parameters": sum(t.numel() for k, t in files["ema"].items()),
            "dtypes": {w: sorted({str(t.dtype).removeprefix("torch.") for t in files[w].values()}) for w in files},
            "source": {"checkpoint": str(found.resolve()), "parallel": marker.get("parallel")},
            "dfmkit_version": __version__,
        }
        tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for weights, tensors in files.items():
                save_file(tensors, str(tmp / WEIGHT_FILES[weights]),
                          metadata={"format": "pt", "dfmkit_export": str(EXPORT_VERSION), "weights": weights,
                                    "iteration": str(marker.get("iteration"))})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    return out


def cmd_export(args: Any) -> int:
    out = export(args.checkpoint, args.out, overwrite=args.overwrite, device=args.device)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        config = read_config(out)
        print(f"exported iteration {config['iteration']} ({config['parameters']:,} parameters) to {out}")
    return 0


__all__ = ["CONFIG_FILE", "EXPORT_FORMAT", "EXPORT_VERSION", "ExportError", "WEIGHT_FILES", "export", "is_export",
           "load_weights", "read_config", "recipe_data"]
