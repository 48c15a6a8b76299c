"""Generation: prompts and sizes -> one packed sequence -> sampler with guidance -> decoded pixels -> files.

Used by validation during training and by ``dfmkit generate``. Each sample's starting noise is
drawn from its own generator (``seed + index``), so a sample does not depend on what else shares
its pack.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfmkit.batch import PackedBatch, Sample, pack, unpack
from dfmkit.diffusion.edm import EDM, ModelFn
from dfmkit.diffusion.guidance import guided_denoiser

ShardFn = Callable[[PackedBatch, torch.Tensor], tuple[PackedBatch, torch.Tensor]]
GatherFn = Callable[[torch.Tensor, PackedBatch], torch.Tensor]


def starting_noise(batch: PackedBatch, seed: int) -> torch.Tensor:
    """Unit Gaussian ``[L, F]``, sample i drawn from a generator seeded with ``seed + i``; zero on padding."""
    noise = torch.zeros_like(batch.latents, dtype=torch.float32)
    for i, (start, n) in enumerate(zip(batch.cu_seqlens.tolist(), batch.seqlens.tolist())):
        generator = torch.Generator().manual_seed(seed + i)
        noise[start : start + n] = torch.randn(n, batch.latents.shape[1], generator=generator)
    return noise


@torch.no_grad()
def sample_latents(
    model_fn: ModelFn,
    edm: EDM,
    sampler: Any,
    texts: Sequence[torch.Tensor],
    latent_shapes: Sequence[Sequence[int]],
    *,
    guidance: float,
    seed: int,
    patch_spatial: int,
    patch_temporal: int,
    pad_multiple: int = 1,
    device: torch.device | str = "cpu",
    model_dtype: torch.dtype | None = None,
    shard: ShardFn | None = None,
    gather: GatherFn | None = None,
) -> list[torch.Tensor]:
    """Latents ``[C, T, H, W]`` for each (text states, latent shape), all sampled in one packed sequence.

    ``shard(batch, noise)`` splits the pack across context-parallel ranks and ``gather(x, shard)`` puts the
    result back in the full pack's order.
    """
    samples = [Sample(torch.zeros(*(int(s) for s in shape)), text.float().cpu(), f"sample_{i}")
               for i, (text, shape) in enumerate(zip(texts, latent_shapes))]
    batch = pack(samples, patch_spatial, patch_temporal, pad_multiple)
    noise = starting_noise(batch, seed)
    local_batch, local_noise = shard(batch, noise) if shard else (batch, noise)
    local_batch = local_batch.to(device)
    denoise = guided_denoiser(model_fn, edm, local_batch, guidance, model_dtype)
    generator = torch.Generator().manual_seed(seed)
    x0 = sampler.sample(denoise, local_noise.to(device), generator=generator)
    x0 = gather(x0, local_batch) if gather else x0
    return unpack(batch, x0.float().cpu(), patch_spatial, patch_temporal)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def save_media(frames: np.ndarray, path_stem: Path, fps: int = 24) -> Path:
    """A PNG for one frame, an MP4 for several; returns the written path."""
    from PIL import Image

    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[0] == 1:
        path = path_stem.with_suffix(".png")
        Image.fromarray(frames[0]).save(path)
        return path
    import imageio.v2 as imageio

    path = path_stem.with_suffix(".mp4")
    imageio.mimwrite(path, list(frames), fps=fps, quality=8, macro_block_size=1)
    return path


def save_outputs(
    pixels: Sequence[torch.Tensor], prompts: Sequence[str], out_dir: Path, settings: dict[str, Any], fps: int = 24
) -> list[Path]:
    """Each decoded sample as PNG/MP4 plus a JSON of the exact settings that produced it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (video, prompt) in enumerate(zip(pixels, prompts)):
        stem = out_dir / f"{index:03d}"
        path = save_media(to_uint8_frames(video), stem, fps)
        stem.with_suffix(".json").write_text(json.dumps({**settings, "prompt": prompt, "index": index,
                                                          "file": path.name}, indent=2))
        written.append(path)
    return written
