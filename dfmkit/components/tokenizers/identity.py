"""The ``identity`` tokenizer: pixels are the latents (3 channels, times a scale)."""

from __future__ import annotations

import attrs
import torch


@attrs.define(kw_only=True)
class IdentityOptions:
    """Pixels as latents: 3 channels at full resolution, multiplied by ``scale``."""

    scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))


class IdentityTokenizer:
    """Pixels in [-1, 1] times ``scale`` are the latents; decoding divides by it."""

    name = "identity"
    latent_channels = 3
    spatial_factor = 1
    temporal_factor = 1

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (3, frames, height, width)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"identity tokenizer expects pixels [B, 3, T, H, W], got {tuple(pixels.shape)}")
        return pixels * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents / self.scale).clamp(-1, 1)


def build(options: IdentityOptions, **_context) -> IdentityTokenizer:
    return IdentityTokenizer(scale=options.scale)
