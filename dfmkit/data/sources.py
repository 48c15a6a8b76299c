"""Where ``dfmkit prepare`` reads images and videos from, and how it resizes them.

Sources (the ``--source`` argument):

- ``digits``: scikit-learn's bundled handwritten digits (1797 images of 8x8), upsampled; the
  caption is exactly ``"a handwritten digit K"``. Needs no network: the offline quickstart.
- ``hf:OWNER/NAME``: a Hugging Face dataset's parquet files, read through ``hf://`` (fsspec,
  huggingface_hub) without the ``datasets`` package; needs the network.
- ``path/to/file.parquet`` (or a folder of ``*.parquet``): rows with an image column (encoded
  image bytes, or a ``{"bytes": ...}`` struct as Hugging Face stores them) and a caption column.
- ``path/to/folder``: images (png, jpg, jpeg, webp, bmp) and videos (mp4, webm, mov, avi, mkv,
  gif) with a caption each, from a sidecar ``<name>.txt`` or from ``captions.jsonl`` (or
  ``metadata.jsonl``) lines like ``{"file": "a/b.jpg", "caption": "..."}`` (``file_name`` and
  ``text`` are accepted too).

Resizing (as in the reference): the short side is scaled to ``image_size`` (0 keeps the size) and
each side is then rounded to the nearest multiple of ``size_multiple`` (16: the Cosmos tokenizer's
8x spatial factor times patch 2), in one interpolation (``resize_mode``: bilinear, bicubic or
nearest; antialiased when shrinking). Pixels come out as float32 ``[3, T, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import torch

from dfmkit.data.skips import SkipError
from dfmkit.errors import DfmkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"}
RESIZE_MODES = ("bilinear", "bicubic", "nearest")

#: Column names of known Hugging Face datasets (used when --caption-column is not given).
HF_PRESETS: dict[str, dict[str, str]] = {
    "huggan/smithsonian_butterflies_subset": {"image_column": "image", "caption_column": "name"},
}


class SourceError(DfmkitError):
    """A source that cannot be opened (missing path, no network for hf:, unknown columns)."""


@attrs.frozen
class ResizeOptions:
    image_size: int = 512  # short side in pixels; 0 keeps the size
    size_multiple: int = 16
    mode: str = "bilinear"
    max_frames: int = 0  # 0: all frames
    fps: float = 30.0  # recorded for images and videos whose rate is unknown


@attrs.define
class SourceItem:
    """One image or video, resized, with its caption."""

    name: str  # where it came from, for logs (file name, row number)
    pixels: torch.Tensor  # [3, T, H, W] float32 in [-1, 1]
    caption: str
    meta: dict[str, Any]  # original_height/width/frames, fps, and source-specific fields


class Source(Protocol):
    """A random-access collection of items; ``load`` may raise :class:`SkipError`."""

    description: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> SourceItem: ...


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def target_size(height: int, width: int, image_size: int, multiple: int) -> tuple[int, int]:
    """(H, W): short side scaled to ``image_size`` (0: unchanged), each side rounded to ``multiple``."""
    scale = image_size / min(height, width) if image_size > 0 else 1.0
    multiple = max(1, multiple)

    def fit(side: int) -> int:
        return max(multiple, int(math.floor(side * scale / multiple + 0.5)) * multiple)

    return fit(height), fit(width)


def to_pixels(frames: np.ndarray | torch.Tensor, options: ResizeOptions, value_range: float = 255.0) -> torch.Tensor:
    """Frames ``[T, H, W, 3]`` (uint8, or float in [0, value_range]) -> float32 ``[3, T, H', W']`` in [-1, 1]."""
    x = torch.tensor(np.asarray(frames), dtype=torch.float32) / value_range
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {tuple(x.shape)}")
    if options.max_frames > 0:
        x = x[: options.max_frames]
    t, h, w, _ = x.shape
    out_h, out_w = target_size(h, w, options.image_size, options.size_multiple)
    x = x.permute(0, 3, 1, 2)  # T 3 H W
    if (out_h, out_w) != (h, w):
        shrinking = out_h < h or out_w < w
        kwargs: dict[str, Any] = {"mode": options.mode}
        if options.mode != "nearest":
            kwargs.update(align_corners=False, antialias=shrinking)
        x = torch.nn.functional.interpolate(x, size=(out_h, out_w), **kwargs)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()  # 3 T H W


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``[1, H, W, 3]`` uint8 (grey becomes RGB, alpha is dropped)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))[None]


def read_video(path: Path) -> tuple[np.ndarray, float | None]:
    """``[T, H, W, 3]`` uint8 frames and the frame rate (None when unknown)."""
    import imageio.v3 as iio

    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)])
            duration = image.info.get("duration")
        return frames, (1000.0 / duration if duration else None)
    frames = iio.imread(path, plugin="pyav") if _has_pyav() else iio.imread(path)
    try:
        meta = iio.immeta(path)
        fps = meta.get("fps")
    except Exception:
        fps = None
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    return frames, (float(fps) if fps else None)


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _item(name: str, frames: np.ndarray, caption: str, options: ResizeOptions, fps: float | None, **extra: Any) -> SourceItem:
    t, h, w = (int(s) for s in frames.shape[:3])
    pixels = to_pixels(frames, options)
    meta = {"original_height": h, "original_width": w, "original_frames": t, "fps": float(fps or options.fps), **extra}
    return SourceItem(name=name, pixels=pixels, caption=caption, meta=meta)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class DigitsSource:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16), upsampled; caption 'a handwritten digit K'."""

    description = "scikit-learn digits"

    def __init__(self, options: ResizeOptions):
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise SourceError("the digits source needs scikit-learn: pip install scikit-learn") from exc
        digits = load_digits()
        self.images = digits.images.astype(np.float32)  # [N, 8, 8] in 0..16
        self.labels = digits.target.astype(int)
        self.options = options

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> SourceItem:
        grey = self.images[index]
        frames = np.repeat(grey[None, :, :, None], 3, axis=-1)  # [1, 8, 8, 3] in 0..16
        label = int(self.labels[index])
        pixels = to_pixels(frames, self.options, value_range=16.0)
        meta = {"original_height": 8, "original_width": 8, "original_frames": 1, "fps": float(self.options.fps),
                "label": label, "source_index": int(index)}
        return SourceItem(name=f"digits[{index}]", pixels=pixels, caption=f"a handwritten digit {label}", meta=meta)


def _caption_records(folder: Path) -> dict[str, str | None]:
    captions: dict[str, str | None] = {}
    for name in ("captions.jsonl", "metadata.jsonl"):
        path = folder / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    file = next(record[k] for k in ("file", "file_name", "path", "image", "video") if k in record)
                    caption = next(record[k] for k in ("caption", "text") if k in record)
                except (json.JSONDecodeError, StopIteration, TypeError) as exc:
                    raise SourceError(
                        f"{path}:{line_no}: expected a JSON object with 'file' and 'caption', got {line.strip()[:80]!r}"
                    ) from exc
                captions[str(Path(file))] = None if caption is None else str(caption)  # null: no caption
    return captions


class FolderSource:
    """Images and videos under a folder, captioned by sidecar .txt files or captions.jsonl."""

    def __init__(self, folder: Path, options: ResizeOptions):
        if not folder.is_dir():
            raise SourceError(f"source folder {str(folder)!r} does not exist")
        self.folder = folder
        self.options = options
        self.captions = _caption_records(folder)
        self.files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
        )
        if not self.files:
            raise SourceError(
                f"no images or videos in {str(folder)!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})"
            )
        self.description = f"folder {folder}"

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, path: Path) -> str | None:
        relative = str(path.relative_to(self.folder))
        if relative in self.captions:
            return self.captions[relative]
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise SkipError("unreadable_source", f"{sidecar.relative_to(self.folder)}: {exc}") from None
        return None

    def load(self, index: int) -> SourceItem:
        path = self.files[index]
        relative = str(path.relative_to(self.folder))
        caption = self.caption(path)
        if caption is None:
            raise SkipError("no_caption", f"{relative}: no {path.with_suffix('.txt').name} and no entry in captions.jsonl")
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                frames, fps = decode_image(path.read_bytes()), None
            else:
                frames, fps = read_video(path)
        except Exception as exc:
            raise SkipError("unreadable_source", f"{relative}: {type(exc).__name__}: {exc}") from None
        return _item(relative, frames, caption, self.options, fps, file=relative)


class ParquetSource:
    """Rows of parquet files: encoded image bytes and a caption."""

    def __init__(
        self,
        files: Sequence[str],
        options: ResizeOptions,
        *,
        image_column: str = "image",
        caption_column: str = "",
        filesystem: Any = None,
        description: str = "",
    ):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise SourceError("parquet sources need pyarrow: pip install pyarrow") from exc
        tables = []
        for file in files:
            schema = pq.read_schema(file, filesystem=filesystem)
            caption = caption_column or next((c for c in ("caption", "text") if c in schema.names), "caption")
            missing = [c for c in (image_column, caption) if c not in schema.names]
            if missing:
                raise SourceError(
                    f"parquet file {file} has no column {', '.join(repr(m) for m in missing)}; its columns are "
                    f"{', '.join(schema.names)}. Choose them with --image-column and --caption-column"
                )
            tables.append(pq.read_table(file, columns=[image_column, caption], filesystem=filesystem))
            caption_column = caption
        import pyarrow as pa

        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.images = table.column(image_column).to_pylist()
        self.captions = table.column(caption_column).to_pylist()
        self.options = options
        self.columns = (image_column, caption_column)
        self.description = description or f"parquet {', '.join(files)}"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> SourceItem:
        value, caption = self.images[index], self.captions[index]
        if caption is None or not str(caption).strip():
            raise SkipError("no_caption", f"row {index}: empty {self.columns[1]!r}")
        if isinstance(value, Mapping):
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise SkipError("unreadable_source", f"row {index}: column {self.columns[0]!r} holds no image bytes")
        try:
            frames = decode_image(bytes(value))
        except Exception as exc:
            raise SkipError("unreadable_source", f"row {index}: {type(exc).__name__}: {exc}") from None
        return _item(f"row {index}", frames, str(caption).strip(), self.options, None, source_index=index)


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def hf_parquet_files(name: str) -> tuple[list[str], Any]:
    """The parquet files of Hugging Face dataset ``name`` and the filesystem to read them with."""
    hint = (
        f"Reading the Hugging Face dataset '{name}' needs network access to huggingface.co. Without it, "
        "download its parquet file(s) on a machine that has it and pass --source path/to/file.parquet"
    )
    if _hf_offline():
        raise SourceError(f"HF_HUB_OFFLINE is set. {hint}")
    try:
        from huggingface_hub import HfFileSystem
    except ImportError as exc:
        raise SourceError(f"the hf: source needs huggingface_hub (pip install huggingface_hub). {hint}") from exc
    fs = HfFileSystem()
    try:
        files = sorted(fs.glob(f"datasets/{name}/**/*.parquet"))
    except Exception as exc:
        raise SourceError(f"cannot list the files of '{name}': {type(exc).__name__}: {exc}. {hint}") from None
    if not files:
        raise SourceError(f"the Hugging Face dataset '{name}' has no parquet files (or does not exist). {hint}")
    train = [f for f in files if "/train" in f.split(name, 1)[-1]]
    return (train or files), fs


def open_source(
    source: str,
    options: ResizeOptions,
    *,
    image_column: str = "",
    caption_column: str = "",
) -> Source:
    """The source named by ``--source``: ``digits``, ``hf:OWNER/NAME``, a parquet file or folder, or a media folder."""
    if source == "digits":
        return DigitsSource(options)
    if source.startswith("hf:") or source.startswith("hf://"):
        name = source.removeprefix("hf://").removeprefix("hf:").removeprefix("datasets/").strip("/")
        preset = HF_PRESETS.get(name, {})
        files, fs = hf_parquet_files(name)
        return ParquetSource(
            files, options, filesystem=fs, description=f"hf:{name}",
            image_column=image_column or preset.get("image_column", "image"),
            caption_column=caption_column or preset.get("caption_column", ""),
        )
    path = Path(source)
    if path.is_file() and path.suffix == ".parquet":
        return ParquetSource([str(path)], options, image_column=image_column or "image", caption_column=caption_column)
    if path.is_dir():
        parquet = sorted(str(p) for p in path.glob("*.parquet"))
        if parquet and not any(p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES for p in path.iterdir()):
            return ParquetSource(parquet, options, image_column=image_column or "image", caption_column=caption_column)
        return FolderSource(path, options)
    raise SourceError(
        f"unknown source {source!r}: give 'digits', 'hf:OWNER/NAME', a .parquet file, or a folder of images/videos"
    )
