"""Outputs: latents -> decoded pixels -> ``NNN.png`` (one frame) or ``NNN.mp4`` plus ``NNN.json`` with the exact
settings that made it. ``dfmkit generate`` and validation during training write their files here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs
import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image

from dfmkit.generation.prompts import Request


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


def sampler_settings(name: str, options: Any) -> dict[str, Any]:
    """The settings entries of a sampler: ``sampler`` (its name and every option) and ``num_steps``."""
    return {"sampler": {"name": name, **attrs.asdict(options)}, "num_steps": getattr(options, "num_steps", None)}


def sample_settings(index: int, request: Request, seed: int, latent_shape: Any, fps: float) -> dict[str, Any]:
    """The settings entries of output ``index``: its prompt, seed and sizes."""
    return {"index": index, "prompt": request.prompt, "seed": seed, "height": request.height,
            "width": request.width, "frames": request.frames, "fps": fps, "latent_shape": list(latent_shape)}


def write_output(out_dir: Path, index: int, pixels: torch.Tensor, settings: dict[str, Any], fps: float) -> Path:
    """Write output ``index`` as ``NNN.png``/``NNN.mp4`` and ``settings`` with its ``file`` name as ``NNN.json``
    (the ``file`` entry is added to ``settings``); returns the image or video path."""
    path = save_media(to_uint8_frames(pixels), out_dir / f"{index:03d}", fps=fps)
    settings["file"] = path.name
    (out_dir / f"{index:03d}.json").write_text(json.dumps(jsonable(settings), indent=2) + "\n")
    return path
