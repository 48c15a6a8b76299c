"""The ``identity`` tokenizer: pixels are the latents (3 channels, times a scale).

For the offline quickstart and tests: no weights, no download, exact round trip. ``encode``
returns ``pixels * scale``, the diffusion model's x0 (the default 1.0 keeps pixels in [-1, 1];
``diffusion.sigma_data`` should describe the spread of what comes out), and ``decode`` divides by
``scale`` and clamps to [-1, 1]. Any frame count and size is accepted (factors are 1).
"""

from __future__ import annotations

import attrs
import torch

from dfmkit.components.tokenizers.base import TokenizerInputError


@attrs.define(kw_only=True)
class IdentityOptions:
    """Pixels as latents: 3 channels at full resolution, multiplied by ``scale``."""

    scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(3, frames, height, width): any size of at least one pixel and one frame."""
        if min(frames, height, width) < 1:
            raise TokenizerInputError(
                f"identity tokenizer: frames, height and width must be >= 1, got {frames}, {height}, {width}"
            )
        return (3, frames, height, width)


class IdentityTokenizer:
    """Pixels in [-1, 1] times ``scale`` are the latents; decoding divides by it."""

    name = "identity"
    latent_channels = 3
    spatial_factor = 1
    temporal_factor = 1

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return IdentityOptions(scale=self.scale).latent_shape(frames, height, width)

    @staticmethod
    def _check(tensor: torch.Tensor, what: str) -> None:
        if tensor.ndim != 5 or tensor.shape[1] != 3 or not tensor.is_floating_point():
            raise TokenizerInputError(
                f"identity tokenizer expects float {what} [B, 3, T, H, W], got {tuple(tensor.shape)} {tensor.dtype}"
            )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check(pixels, "pixels")
        return pixels * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, "latents")
        return (latents / self.scale).clamp(-1, 1)


def build(options: IdentityOptions, **_context) -> IdentityTokenizer:
    return IdentityTokenizer(scale=options.scale)
