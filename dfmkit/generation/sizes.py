"""Sizes: which pixel sizes fit the tokenizer's alignment and the backbone's patches, and the nearest ones that do.

``dfmkit generate`` and validation during training check every size here before any sampling, so a size that
cannot work is one clear :class:`~dfmkit.errors.GenerateError` naming the nearest valid sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dfmkit.errors import DfmkitError, GenerateError


def model_patches(model_options: Any) -> tuple[int, int]:
    """(spatial, temporal) patch size of a backbone's options (1 where it has none)."""
    return int(getattr(model_options, "patch_spatial", 1)), int(getattr(model_options, "patch_temporal", 1))


def _fit(tokenizer: Any, p: int, pt: int, frames: int, height: int, width: int) -> tuple[tuple[int, ...] | None, str]:
    try:
        shape = tuple(int(s) for s in tokenizer.latent_shape(frames, height, width))
    except (DfmkitError, ValueError) as exc:
        return None, str(exc)
    _, t, h, w = shape
    if t % pt or h % p or w % p:
        return None, (f"its latent {shape} (C, T, H, W) does not divide into the backbone's patches of "
                      f"{pt} x {p} x {p} (t x h x w)")
    return shape, ""


def _reference_size(tokenizer: Any, p: int, pt: int) -> tuple[int, int] | None:
    """Some (frames, side) that fits, to test one dimension at a time."""
    for side in range(8, 1025, 8):
        for frames in range(1, 129):
            if _fit(tokenizer, p, pt, frames, side, side)[0] is not None:
                return frames, side
    return None


def _nearest(test: Callable[[int], bool], value: int, limit: int) -> list[int]:
    below = next((v for v in range(value - 1, max(value - limit, 0), -1) if test(v)), None)
    above = next((v for v in range(value + 1, value + limit + 1) if test(v)), None)
    return [v for v in (below, above) if v is not None]


def latent_shape_for(tokenizer: Any, patch_spatial: int, patch_temporal: int, frames: int, height: int,
                     width: int, tokenizer_name: str = "") -> tuple[int, int, int, int]:
    """The latent (C, T, H, W) of a ``frames x height x width`` video, or a :class:`GenerateError` naming
    the sizes that do not fit and the nearest ones that do."""
    p, pt = patch_spatial, patch_temporal
    shape, reason = _fit(tokenizer, p, pt, frames, height, width)
    if shape is not None:
        return shape  # type: ignore[return-value]
    name = tokenizer_name or getattr(tokenizer, "name", type(tokenizer).__name__)
    message = (f"size {frames} frames x {height} x {width} (height x width) does not fit the '{name}' tokenizer "
               f"with the backbone's {pt} x {p} x {p} patches: {reason}")
    reference = _reference_size(tokenizer, p, pt)
    if reference is not None:
        ref_frames, ref_side = reference
        tests = {
            "height": (height, 1024, lambda v: _fit(tokenizer, p, pt, ref_frames, v, ref_side)[0] is not None),
            "width": (width, 1024, lambda v: _fit(tokenizer, p, pt, ref_frames, ref_side, v)[0] is not None),
            "frames": (frames, 256, lambda v: _fit(tokenizer, p, pt, v, ref_side, ref_side)[0] is not None),
        }
        hints = []
        for dim, (value, limit, test) in tests.items():
            if not test(value):
                near = _nearest(test, value, limit)
                hints.append(f"{dim} {value} -> {' or '.join(str(v) for v in near) or 'none nearby'}")
        if hints:
            message += ". Nearest valid sizes: " + "; ".join(hints)
    raise GenerateError(message)
