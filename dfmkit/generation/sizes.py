"""Sizes for generation: a size that does not fit the tokenizer and the patches is a :class:`GenerateError` naming
the nearest valid sizes (the fitting itself is :mod:`dfmkit.latent_sizes`, shared with the recipe checks)."""

from __future__ import annotations

from typing import Any

from dfmkit import latent_sizes
from dfmkit.errors import GenerateError


def latent_shape_for(tokenizer: Any, patch_spatial: int, patch_temporal: int, frames: int, height: int,
                     width: int, tokenizer_name: str = "") -> latent_sizes.LatentShape:
    """The latent (C, T, H, W) of a ``frames x height x width`` video, or a :class:`GenerateError`."""
    return latent_sizes.latent_shape_for(tokenizer, patch_spatial, patch_temporal, frames, height, width,
                                         tokenizer_name, error=GenerateError)
