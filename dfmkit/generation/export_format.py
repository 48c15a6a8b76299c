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

An export is read as untrusted input: ``weights`` must name files inside the export folder (no absolute
paths, no ``..``, no symlinks that lead out of it), and every tensor's name, dtype and shape in a weight
file's header is checked against the model before any tensor is read, so a tampered header cannot make
dfmkit allocate more than the model's own size.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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
    for key in ("backbone", "tokenizer", "text_encoder", "objective"):
        section = config.get(key)
        if key == "objective" and section is None:
            continue  # exports written before objectives existed: the recipe's [diffusion] (EDM)
        if not isinstance(section, dict) or not isinstance(section.get("name"), str):
            problems.append(f"'{key}' must be a table with a 'name'")
    problems += _weight_file_problems(path, config.setdefault("weights", dict(WEIGHT_FILES)))
    if problems:
        raise ExportError(f"{path / CONFIG_FILE}: " + "; ".join(problems))
    return config


def _weight_file_problems(path: Path, weights: Any) -> list[str]:
    """What is wrong with config.json's ``weights`` table: it maps "ema"/"model" to file names inside the folder."""
    example = json.dumps(WEIGHT_FILES)
    if not isinstance(weights, dict):
        return [f"'weights' must be a table of weight files such as {example}, got {type(weights).__name__} "
                f"{json.dumps(weights)[:80]}"]
    problems = []
    folder = path.resolve()
    for key, name in weights.items():
        if not isinstance(name, str) or not name:
            example_name = WEIGHT_FILES.get(key, "ema.safetensors")
            problems.append(f"'weights.{key}' must be a file name such as \"{example_name}\", "
                            f"got {json.dumps(name)[:80]}")
        elif Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"'weights.{key}' = \"{name}\" points outside the export folder; an export's weight files "
                            "are names inside its folder")
        elif not (path / name).resolve().is_relative_to(folder):
            problems.append(f"'weights.{key}' = \"{name}\" is a link to {(path / name).resolve()}, outside the export "
                            "folder; copy the file into the folder instead of linking it")
    return problems


def recipe_data(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe (TOML data) an export describes: its stored recipe with config.json's component sections (the
    objective among them, where the export names it)."""
    try:
        data = tomllib.loads(config["recipe"])
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise ExportError(f"the recipe in the export's {CONFIG_FILE} is not valid TOML text: {exc}") from None
    data["model"] = dict(config["backbone"])
    data["tokenizer"] = dict(config["tokenizer"])
    data["text_encoder"] = dict(config["text_encoder"])
    if "objective" in config:
        data["diffusion"] = dict(config["objective"])
    return data


# The dtype names of safetensors headers, and the ones a floating-point tensor of the model may be stored in
# (the EMA in float32, the raw weights in the dtype they were trained in).
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_FLOAT_STORAGE = ("F32", "BF16", "F16")


def _header_problems(header: Mapping[str, tuple[str, tuple[int, ...]]],
                     expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    problems = [f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    for name in sorted(set(header) & set(expected)):
        (dtype, shape), (want_shape, want_dtype) = header[name], expected[name]
        want = _FLOAT_STORAGE if want_dtype.is_floating_point else (_DTYPE_NAMES.get(want_dtype, str(want_dtype)),)
        if shape != tuple(want_shape):
            problems.append(f"{name} has shape {shape}, the model's is {tuple(want_shape)}")
        elif dtype not in want:
            problems.append(f"{name} has dtype {dtype}, the model's needs {' or '.join(want)}")
    return problems


def load_weights(path: str | os.PathLike[str], config: dict[str, Any], weights: str,
                 expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """The full weights ("ema" or "model") of the export at ``path`` (``config`` from :func:`read_config`), by
    ``model.state_dict()`` name. ``expected`` gives each tensor's full shape and dtype in the model: the
    file's header is checked against it before any tensor is read (so a tampered header is refused without
    allocating what it claims)."""
    name = config["weights"].get(weights)
    if name is None:
        raise ExportError(f"the export {path} has no '{weights}' weights (it has {sorted(config['weights'])})")
    file = Path(path) / name
    if not file.is_file():
        raise ExportError(f"the export {path} lacks {name}; export the checkpoint again with `dfmkit export`")
    try:
        with safe_open(str(file), framework="pt") as weights_file:
            header = {}
            for key in weights_file.keys():
                entry = weights_file.get_slice(key)  # the header's entry: nothing of the tensor is read
                header[key] = (entry.get_dtype(), tuple(entry.get_shape()))
            problems = _header_problems(header, expected)
            if problems:
                shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
                raise ExportError(f"{file} does not fit the model of the export's recipe: {shown}")
            return {key: weights_file.get_tensor(key) for key in header}
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{file} is not a readable safetensors file ({exc})") from None
