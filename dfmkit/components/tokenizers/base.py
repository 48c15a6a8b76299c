"""What every tokenizer component provides: pixels in [-1, 1] <-> latents the diffusion model trains on."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    """Encodes videos ``[B, 3, T, H, W]`` in [-1, 1] to latents ``[B, C, T', H', W']`` and back.

    Latents are already scaled for training (the diffusion model's x0), so a tokenizer's
    ``scale`` option is where the reference's ``latent * sigma_data`` lives. Images are videos
    with ``T = 1``.
    """

    name: str
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a ``frames x height x width`` video."""
        ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
