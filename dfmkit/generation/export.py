"""``dfmkit export``: a checkpoint as plain safetensors + ``config.json`` (the format of
:mod:`dfmkit.generation.export_format`), loadable without megatron's distributed checkpoint.

The export is made by loading the checkpoint into a model with tensor and context parallelism 1 in each
process (megatron's distributed checkpoint reshards on load), so a checkpoint of any parallel layout exports
the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dfmkit import parallel
from dfmkit.errors import GenerateError
from dfmkit.generation.export_format import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    WEIGHT_FILES,
    ExportError,
    is_export,
)
from dfmkit.generation.loading import load_model, resolve_source
from dfmkit.generation.outputs import check_out_dir
from dfmkit.generation.weights import read_checkpoint_states
from dfmkit.recipe import ParallelConfig, dump_recipe, recipe_to_dict
from dfmkit.version import __version__


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
    out = Path(out)
    check_out_dir(out)
    kind, found = resolve_source(checkpoint)
    if kind != "checkpoint":
        raise ExportError(f"'{checkpoint}' is already an export; give a checkpoint folder of `dfmkit run`")
    if out.exists() and any(out.iterdir()) and not (overwrite and is_export(out)):
        what = "an earlier export (pass --overwrite to replace it)" if is_export(out) else "other files"
        raise ExportError(f"--out '{out}' already holds {what}; give a new or empty folder")
    # The model as built, not readied for sampling: both weight sets are read in the dtypes they were saved in.
    loaded = load_model(found, layout=ParallelConfig(tensor=1, context=1), weights=None, plugins=plugins,
                        device=device)
    model, marker = loaded.model, loaded.saved
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

    if loaded.env.rank == 0:
        registries = loaded.job.plugins.registries
        sections = recipe_to_dict(loaded.recipe, registries=registries)
        config = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "recipe": dump_recipe(loaded.recipe, registries=registries),
            "backbone": sections["model"],
            "objective": sections["diffusion"],
            "tokenizer": sections["tokenizer"],
            "text_encoder": sections["text_encoder"],
            "iteration": marker.get("iteration"),
            "weights": dict(WEIGHT_FILES),
            "parameters": sum(t.numel() for k, t in files["ema"].items()),
            "dtypes": {w: sorted({str(t.dtype).removeprefix("torch.") for t in files[w].values()}) for w in files},
            "source": {"checkpoint": str(found.resolve()), "parallel": marker.get("parallel")},
            "dfmkit_version": __version__,
        }
        _write_atomically(out, files, config, marker.get("iteration"))
    parallel.barrier()
    return out


def _write_atomically(out: Path, files: dict[str, dict[str, torch.Tensor]], config: dict[str, Any],
                      iteration: Any) -> None:
    """Write the export into a folder beside ``out``, then put it in place of ``out``."""
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for weights, tensors in files.items():
            save_file(tensors, str(tmp / WEIGHT_FILES[weights]),
                      metadata={"format": "pt", "dfmkit_export": str(EXPORT_VERSION), "weights": weights,
                                "iteration": str(iteration)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        # safetensors >= 0.8 writes through a temporary file created with mode 0600 and renamed into place
        # (safetensors#782), so the weights would be readable by their owner alone; they get the mode the
        # user's umask gave config.json (0644 under umask 022), like every other output.
        mode = stat.S_IMODE((tmp / CONFIG_FILE).stat().st_mode)
        for name in WEIGHT_FILES.values():
            (tmp / name).chmod(mode)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"cannot write the export to '{out}': {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
