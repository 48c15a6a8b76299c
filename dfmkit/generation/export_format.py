"""The export folder of ``dfmkit export``: its files, and reading them (written by :mod:`dfmkit.generation.export`).

Layout of an export folder::

    config.json         {"format": "dfmkit-export", "version": 1, "recipe": <resolved recipe TOML>,
                         "backbone": {"name": ..., options}, "tokenizer": {...}, "text_encoder": {...},
                         "iteration": n, "weights": {"ema": "ema.safetensors", "model": "model.safetensors"}, ...}
    ema.safetensors     the EMA weights (float32)
    model.safetensors   the raw trained weights (in the dtype they were trained in)

Both weight files hold the FULL tensors (tensor-parallel shards gathered) under the plain names of
``model.state_dict()`` (``x_embedder.weight``, ``decoder.layers.0.mlp.linear_fc1.weight``, ...), each
a complete state dict of the backbone, so an export loads without megatron's distributed checkpoint.

``backbone``/``tokenizer``/``text_encoder`` describe the components; loading an export
(:func:`dfmkit.generation.load`) takes them from config.json over the stored recipe, so editing
them (for example ``text_encoder.path`` to a local copy of the T5 weights) changes what is built.
The text-encoder and tokenizer weights are not copied into the export: they are named there
(hub ids or paths) as in the recipe.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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

