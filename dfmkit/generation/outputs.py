"""Outputs: latents -> decoded pixels -> ``NNN.png`` (one frame) or ``NNN.mp4`` plus ``NNN.json`` with the exact
settings that made it. ``dfmkit generate`` and validation during training write their files here.

A sample that holds NaN or inf (non-finite weights, or a guidance so large that the guided denoiser overflows)
would be written as a black or saturated image: it is never written. ``dfmkit generate`` refuses the request
(:class:`NonFiniteOutputError`, naming the outputs and the likely cause); validation during training skips such
samples with a warning and goes on training."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image

from dfmkit.errors import GenerateError
from dfmkit.generation.prompts import Request


class NonFiniteOutputError(GenerateError):
    """Outputs whose latents or pixels hold NaN or inf; none of the request's files are written.
    ``indices`` are the outputs' indices."""

    def __init__(self, message: str, indices: Sequence[int]):
        super().__init__(message)
        self.indices = list(indices)


def check_out_dir(out: Path) -> None:
    """A clear :class:`GenerateError` when ``out`` cannot become the output folder (it is a file, lies under a
    file, or under a folder that is not writable); nothing is created."""
    for folder in (out, *out.parents):
        if not folder.exists():
            continue
        if folder == out and not folder.is_dir():
            raise GenerateError(f"the output folder '{out}' is a file; give --out a folder")
        if not folder.is_dir():
            raise GenerateError(f"the output folder '{out}' cannot be made: '{folder}' is a file")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise GenerateError(f"the output folder '{out}' cannot be written: '{folder}' is not writable")
        return


def non_finite(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The indices of the ``tensors`` that hold NaN or inf."""
    return [i for i, tensor in enumerate(tensors) if not bool(torch.isfinite(tensor).all())]


def non_finite_message(indices: Sequence[int], prompts: Sequence[str]) -> str:
    """"output 2 ('a red car') holds NaN or inf" for the outputs ``indices`` of ``prompts``."""
    named = ", ".join(f"{i} ({prompts[i][:60]!r})" for i in indices[:5]) + (" ..." if len(indices) > 5 else "")
    return f"output {named} holds NaN or inf" if len(indices) == 1 else f"outputs {named} hold NaN or inf"


def non_finite_cause(guidance: float, bad_weights: Sequence[str] | None) -> str:
    """The likely cause of non-finite samples: the weights ``bad_weights`` (names of those that hold NaN or inf; None
    when they were not looked at), else a guidance ``w`` large enough to overflow the guided denoiser."""
    if bad_weights:
        more = f" and {len(bad_weights) - 3} more" if len(bad_weights) > 3 else ""
        return (f"the weights hold NaN or inf ({', '.join(bad_weights[:3])}{more}), as after a run that diverged; "
                "use other weights (--weights model, or an earlier checkpoint)")
    causes = ["weights that hold NaN or inf (a run that diverged)"] if bad_weights is None else []
    if guidance != 1.0:
        causes.append(f"guidance w = {guidance:g} too large (D_uncond + w (D_cond - D_uncond) overflows; usual values "
                      "are 1 to about 15)")
    else:
        causes.append("a sampler that diverged (another sampler, or fp32 precision, may not)")
    return ", or ".join(causes)


def decode(tokenizer: Any, latent: torch.Tensor) -> torch.Tensor:
    """Pixels ``[3, T, H, W]`` in [-1, 1] (float32, CPU) of one latent ``[C, T', H', W']``."""
    return tokenizer.decode(latent[None])[0].float().cpu()


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def save_media(frames: np.ndarray, path_stem: Path, fps: float = 24) -> Path:
    """A PNG for one frame, an MP4 for several; returns the written path."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[0] == 1:
        path = path_stem.with_suffix(".png")
        Image.fromarray(frames[0]).save(path)
        return path
    path = path_stem.with_suffix(".mp4")
    imageio.mimwrite(path, list(frames), fps=fps, quality=8, macro_block_size=1)
    return path


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("inf"), so that it is strict JSON."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def sampler_settings(name: str, options: Any, objective: Any) -> dict[str, Any]:
    """The settings entries of sampling: ``sampler`` (its name and every option), ``objective`` (the recipe's
    ``[diffusion]`` section: its name and options, the sampling grid among them) and ``num_steps``."""
    return {"sampler": {"name": name, **attrs.asdict(options)},
            "objective": {"name": objective.name, **attrs.asdict(objective.options)},
            "num_steps": getattr(options, "num_steps", None)}


def sample_settings(index: int, request: Request, seed: int, latent_shape: Any, fps: float) -> dict[str, Any]:
    """The settings entries of output ``index``: its prompt, seed and sizes."""
    return {"index": index, "prompt": request.prompt, "seed": seed, "height": request.height,
            "width": request.width, "frames": request.frames, "fps": fps, "latent_shape": list(latent_shape)}


def write_output(out_dir: Path, index: int, pixels: torch.Tensor, settings: dict[str, Any], fps: float) -> Path:
    """Write output ``index`` as ``NNN.png``/``NNN.mp4`` and ``settings`` with its ``file`` name as ``NNN.json``
    (the ``file`` entry is added to ``settings``); returns the image or video path."""
    try:
        path = save_media(to_uint8_frames(pixels), out_dir / f"{index:03d}", fps=fps)
        settings["file"] = path.name
        (out_dir / f"{index:03d}.json").write_text(json.dumps(jsonable(settings), indent=2) + "\n")
    except OSError as exc:
        raise GenerateError(f"cannot write output {index} to '{out_dir}': {exc.strerror or exc}") from None
    return path
