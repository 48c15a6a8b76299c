"""What every tokenizer component provides: pixels in [-1, 1] <-> latents the diffusion model trains on."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from dfmkit.errors import DfmkitError


class MissingArtifactError(DfmkitError, FileNotFoundError):
    """Model files (tokenizer or text-encoder weights) that are neither in the given folder nor on the hub.

    The message names the files expected, the folder looked in and where to get them (the hub repo id).
    """


class TokenizerInputError(DfmkitError, ValueError):
    """Pixels or latents a tokenizer cannot take: wrong rank, too small, or sides/frames that do not align."""


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
