"""Which pixel sizes fit a tokenizer's latent and the backbone's patches, and the nearest ones that do; and how many
tokens a latent makes.

One implementation for every place that checks a size: the recipe checks (validation sizes, through a tokenizer's
options), ``dfmkit generate`` and validation during training (through the built tokenizer). A ``tokenizer`` here
is anything with ``latent_shape(frames, height, width) -> (C, T, H, W)`` that raises
:class:`~dfmkit.errors.DfmkitError` or ``ValueError`` for sizes it does not take. No torch import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dfmkit.errors import DfmkitError

LatentShape = tuple[int, int, int, int]


def latent_tokens(shape: Sequence[int], patch_spatial: int, patch_temporal: int) -> int:
    """The tokens of a latent ``(C, T, H, W)`` (before padding): one per ``patch_temporal x patch_spatial^2``
    patch."""
    _, t, h, w = shape
    return (t // patch_temporal) * (h // patch_spatial) * (w // patch_spatial)


def patch_sizes(model_options: Any) -> tuple[int, int]:
    """(spatial, temporal) patch size of a backbone's options; 1 where it has none (no patching)."""
    return int(getattr(model_options, "patch_spatial", 1)), int(getattr(model_options, "patch_temporal", 1))


def _fit(tokenizer: Any, p: int, pt: int, frames: int, height: int, width: int) -> tuple[LatentShape | None, str]:
    try:
        shape = tuple(int(s) for s in tokenizer.latent_shape(frames, height, width))
    except (DfmkitError, ValueError) as exc:
        return None, str(exc)
    _, t, h, w = shape
    if t % pt or h % p or w % p:
        return None, f"its latent {shape} (C, T, H, W) does not divide into the patches"
    return shape, ""  # type: ignore[return-value]


def _reference_size(tokenizer: Any, p: int, pt: int) -> tuple[int, int] | None:
    """Some (frames, side) that fits, to try one size at a time against."""
    for side in range(8, 1025, 8):
        for frames in range(1, 129):
            if _fit(tokenizer, p, pt, frames, side, side)[0] is not None:
                return frames, side
    return None


def _nearest(fits: Callable[[int], bool], value: int, limit: int) -> list[int]:
    below = next((n for n in range(value - 1, max(value - limit, 0), -1) if fits(n)), None)
    above = next((n for n in range(value + 1, value + limit + 1) if fits(n)), None)
    return [n for n in (below, above) if n is not None]


def fit_latent(tokenizer: Any, patch_spatial: int, patch_temporal: int, frames: int, height: int,
               width: int) -> tuple[LatentShape | None, str, dict[str, list[int]]]:
    """``(latent (C, T, H, W), "", {})`` when a ``frames x height x width`` video fits, else ``(None, the reason,
    {"frames"/"height"/"width": the nearest values that fit})`` for each size that does not fit on its own."""
    p, pt = patch_spatial, patch_temporal
    shape, reason = _fit(tokenizer, p, pt, frames, height, width)
    if shape is not None:
        return shape, "", {}
    nearest: dict[str, list[int]] = {}
    reference = _reference_size(tokenizer, p, pt)
    if reference is not None:
        ref_frames, ref_side = reference
        sizes = {"frames": (frames, 256, lambda n: (n, ref_side, ref_side)),
                 "height": (height, 1024, lambda n: (ref_frames, n, ref_side)),
                 "width": (width, 1024, lambda n: (ref_frames, ref_side, n))}
        for key, (value, limit, size) in sizes.items():
            def fits(n: int, size=size) -> bool:
                return _fit(tokenizer, p, pt, *size(n))[0] is not None

            if not fits(value):
                nearest[key] = _nearest(fits, value, limit)
    return None, reason, nearest


def misfit_message(tokenizer_name: str, patch_spatial: int, patch_temporal: int, frames: int, height: int,
                   width: int, reason: str, nearest: dict[str, list[int]]) -> str:
    """The message for a size that :func:`fit_latent` refused, naming the nearest valid sizes."""
    p, pt = patch_spatial, patch_temporal
    message = (f"size {frames} frames x {height} x {width} (height x width) does not fit the '{tokenizer_name}' "
               f"tokenizer with the backbone's {pt} x {p} x {p} patches: {reason}")
    values = {"frames": frames, "height": height, "width": width}
    if nearest:
        message += ". Nearest valid sizes: " + "; ".join(
            f"{key} {values[key]} -> {' or '.join(map(str, near)) or 'none nearby'}" for key, near in nearest.items())
    return message


def latent_shape_for(tokenizer: Any, patch_spatial: int, patch_temporal: int, frames: int, height: int,
                     width: int, tokenizer_name: str = "", error: type[DfmkitError] = DfmkitError) -> LatentShape:
    """The latent (C, T, H, W) of a ``frames x height x width`` video, or ``error`` with :func:`misfit_message`."""
    shape, reason, nearest = fit_latent(tokenizer, patch_spatial, patch_temporal, frames, height, width)
    if shape is not None:
        return shape
    name = tokenizer_name or getattr(tokenizer, "name", type(tokenizer).__name__)
    raise error(misfit_message(name, patch_spatial, patch_temporal, frames, height, width, reason, nearest))
