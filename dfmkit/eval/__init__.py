"""Evaluation of generated samples: digit prompt adherence and FID.

- :mod:`dfmkit.eval.digits`: a scikit-learn classifier trained on ``load_digits`` reads each
  generated image and checks it against the digit its prompt asked for.
- :mod:`dfmkit.eval.fid`: Frechet distance between feature statistics of two image sets, with the
  standard FID Inception-v3 when its weights are on disk, else a fixed offline network.
- :mod:`dfmkit.eval.cli`: ``dfmkit eval digits`` and ``dfmkit eval fid``.

This module holds what both metrics share (the error class, reading image folders) and keeps its
own import light: torch and scikit-learn load only when a metric runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfmkit.errors import DfmkitError

if TYPE_CHECKING:
    from dfmkit.eval.digits import DigitClassifier, DigitsReport, evaluate_digits, render_digits
    from dfmkit.eval.fid import FidReport, compute_fid, frechet_distance

#: Image files that the metrics read (the names ``dfmkit generate`` and validation write are ``NNN.png``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")


class EvalError(DfmkitError):
    """Input that an evaluation cannot use: a missing or empty folder, an unreadable image, a bad sidecar."""


def list_images(folder: str | Path, role: str = "image") -> list[Path]:
    """The image files directly in ``folder``, sorted by name; an :class:`EvalError` when there are none."""
    path = Path(folder)
    if not path.exists():
        raise EvalError(f"{role} folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise EvalError(f"{role} folder {str(path)!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        videos = sum(1 for p in path.iterdir() if p.suffix.lower() in _VIDEO_SUFFIXES)
        hint = f"; it holds {videos} video file(s), which the image metrics do not read" if videos else ""
        raise EvalError(f"{role} folder {str(path)!r} has no images ({', '.join(IMAGE_SUFFIXES)}){hint}")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """One image as ``[H, W, 3]`` uint8 RGB (grey is repeated, alpha dropped); :class:`EvalError` if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise EvalError(f"cannot read image {str(path)!r}: {exc}") from exc
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise EvalError(f"cannot read image {str(path)!r}: unexpected shape {array.shape}")
    return array


_LAZY = {
    "DigitClassifier": "dfmkit.eval.digits",
    "DigitsReport": "dfmkit.eval.digits",
    "evaluate_digits": "dfmkit.eval.digits",
    "render_digits": "dfmkit.eval.digits",
    "FidReport": "dfmkit.eval.fid",
    "compute_fid": "dfmkit.eval.fid",
    "frechet_distance": "dfmkit.eval.fid",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dfmkit.eval' has no attribute {name!r}")


__all__ = [
    "IMAGE_SUFFIXES",
    "DigitClassifier",
    "DigitsReport",
    "EvalError",
    "FidReport",
    "compute_fid",
    "evaluate_digits",
    "frechet_distance",
    "list_images",
    "read_image",
    "render_digits",
]
