"""The ``cosmos`` tokenizer: NVIDIA's Cosmos continuous tokenizers, loaded from their TorchScript release files.

The reference (NeMo DFM) trains DiT on latents of ``Cosmos-0.1-Tokenizer-CV4x8x8``. Like the
reference, dfmkit does not re-implement the tokenizer network: it loads the official release
artifacts, ``encoder.jit`` and ``decoder.jit``, published on the Hugging Face hub under
``nvidia/<variant>``.

Variants (all continuous, 16 latent channels):

===============================  =====  ===========  ========  ======================================
variant                          input  temporal     spatial   latent of ``T x H x W`` pixels
===============================  =====  ===========  ========  ======================================
Cosmos-0.1-Tokenizer-CV4x8x8     video  4x, causal   8x8       ``16 x (1 + (T-1)/4) x H/8 x W/8``
Cosmos-0.1-Tokenizer-CV8x8x8     video  8x, causal   8x8       ``16 x (1 + (T-1)/8) x H/8 x W/8``
Cosmos-0.1-Tokenizer-CI8x8       image  none         8x8       ``16 x T x H/8 x W/8`` (frame by frame)
Cosmos-0.1-Tokenizer-CI16x16     image  none         16x16     ``16 x T x H/16 x W/16`` (frame by frame)
===============================  =====  ===========  ========  ======================================

The short names (``CV4x8x8``) mean the ``Cosmos-0.1-Tokenizer-`` release; other releases with the
same naming (``Cosmos-1.0-Tokenizer-CV8x8x8``) are accepted by their full name.

Where the files come from:

- ``path`` set: a local folder holding ``encoder.jit`` and ``decoder.jit`` (the layout of the hub
  repo; ``hf download nvidia/<variant> encoder.jit decoder.jit --local-dir <path>`` makes one).
  A missing file is reported when the tokenizer is built.
- ``path`` empty: each file is fetched on first use with ``huggingface_hub.snapshot_download``
  from ``nvidia/<variant>`` into ``cache_dir`` (the hub's default cache when empty), using
  ``HF_TOKEN`` if set. Offline, the error names the files and the repo id.

The official TorchScript interface (checked against NVIDIA's ``CausalVideoTokenizer`` /
``ImageTokenizer`` inference code and README): a video encoder takes ``[B, 3, T, H, W]`` in [-1, 1]
and returns a tuple whose first element is the latent ``[B, 16, T', H', W']`` (``(latent,) =
encode(x)`` after the official wrapper drops the last element); an image encoder takes and
returns 4-D tensors ``[B, 3, H, W]`` -> ``[B, 16, H', W']``; the decoders map a latent back to
pixels in [-1, 1]. The official usage runs them in bf16 on CUDA. Assumptions dfmkit adds: the
modules also run on CPU (loaded with ``map_location``; parameters cast to the chosen dtype), and
an encoder that returns a bare tensor instead of a tuple is accepted. Every encoder output is
checked against the latent-shape arithmetic below, so a folder holding another variant's files
gives a clear error rather than wrong latents.

Alignment rules (``latent_shape``, ``encode``):

- Height and width must be multiples of 16 (the official spatial alignment; 16 is a multiple of
  every variant's spatial factor) and at least the spatial factor.
- Video variants: a chunk of ``n`` frames must have ``(n - 1)`` divisible by the temporal factor
  (causal: the first frame gets a latent frame of its own, then one per ``temporal_factor`` frames).
- ``align = "error"`` (default) raises :class:`TokenizerInputError` for sizes that do not align.
  ``align = "pad"`` pads instead, as documented: sides with zeros, split evenly between the two
  edges (as the official inference code does); frames by repeating the last frame at the end
  (the official code edge-pads both ends; dfmkit keeps the first, causal frame in place).
  ``latent_shape`` and ``decode`` then describe the padded video, so data preparation should
  rather resize to aligned sizes (as the reference does: short side 512, sides to multiples of 16).
  Sides smaller than the spatial factor are an error in both modes.

Temporal windows (``temporal_window``, video variants): ``0`` (default) encodes the whole video
in one call, giving ``1 + (T-1)/temporal_factor`` latent frames. A positive window ``W`` (with
``(W - 1)`` divisible by the temporal factor, e.g. 17 or 49 for CV4x8x8) splits long videos
into consecutive, non-overlapping chunks of ``W`` frames (the last one may be shorter, and must
align itself), each encoded independently (causally from its own first frame), as the official
``forward(video, temporal_window)`` does; the latents are concatenated along time. A chunk of
``n`` frames gives ``1 + (n-1)/temporal_factor`` latent frames; ``decode`` splits the latents the
same way (``1 + (W-1)/temporal_factor`` latent frames per chunk), so encode and decode round-trip.

Scale: ``encode`` returns ``latent * scale`` and ``decode`` divides by ``scale`` first. The default
0.5 is the reference's ``sigma_data``: it trains on ``latent * 0.5`` and decodes ``latent / 0.5``,
so the tokenizer's output is the diffusion model's x0 directly (EDM's sigma_data then describes it).

Dtypes and devices: the networks run on ``device`` in ``dtype`` (``auto``: bf16 on CUDA, fp32 on
CPU); ``encode`` returns latents in the input's dtype on the input's device, ``decode`` returns
pixels clamped to [-1, 1] in the latents' dtype on their device.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from dfmkit.components.tokenizers.base import MissingArtifactError, TokenizerInputError
from dfmkit.devices import resolve_device
from dfmkit.errors import DfmkitError

DEFAULT_VARIANT = "Cosmos-0.1-Tokenizer-CV4x8x8"
KNOWN_VARIANTS = (
    "Cosmos-0.1-Tokenizer-CV4x8x8",
    "Cosmos-0.1-Tokenizer-CV8x8x8",
    "Cosmos-0.1-Tokenizer-CI8x8",
    "Cosmos-0.1-Tokenizer-CI16x16",
)
ARTIFACTS = ("encoder.jit", "decoder.jit")
LATENT_CHANNELS = 16
SPATIAL_ALIGN = 16  # the official inference code pads every variant's sides to multiples of 16

_NAME = re.compile(r"^(?:(?P<release>Cosmos-[0-9.]+-Tokenizer)-)?(?P<kind>[CD][VI])(?P<factors>\d+(?:x\d+)+)$")


@attrs.frozen
class Variant:
    """A Cosmos tokenizer release, parsed from its name."""

    name: str  # the full name, also the hub repo's name under nvidia/
    video: bool  # CV (causal video, 5-D input) or CI (image, 4-D input)
    temporal_factor: int
    spatial_factor: int

    @property
    def repo_id(self) -> str:
        return f"nvidia/{self.name}"


def parse_variant(name: str) -> Variant:
    """The variant a name means: ``CV4x8x8`` or ``Cosmos-0.1-Tokenizer-CV4x8x8`` and so on."""
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(
            f"unknown Cosmos tokenizer variant {name!r}; use one of {', '.join(KNOWN_VARIANTS)} "
            "(or its short name, e.g. 'CV4x8x8')"
        )
    kind, factors = match["kind"], [int(f) for f in match["factors"].split("x")]
    if kind[0] == "D":
        raise ValueError(
            f"{name!r} is a discrete Cosmos tokenizer (integer codes); dfmkit trains on continuous latents: "
            f"use one of {', '.join(KNOWN_VARIANTS)}"
        )
    video = kind == "CV"
    if len(factors) != (3 if video else 2) or factors[-1] != factors[-2] or min(factors) < 1:
        raise ValueError(
            f"cannot read the compression factors of {name!r}: a video variant is CV<t>x<s>x<s> "
            "(e.g. CV4x8x8), an image variant CI<s>x<s> (e.g. CI8x8)"
        )
    release = match["release"] or "Cosmos-0.1-Tokenizer"
    return Variant(
        name=f"{release}-{kind}{match['factors']}",
        video=video,
        temporal_factor=factors[0] if video else 1,
        spatial_factor=factors[-1],
    )


def _check_variant(_instance: Any, attribute: Any, value: str) -> None:
    try:
        parse_variant(value)
    except ValueError as exc:
        raise ValueError(f"'{attribute.name}' must name a continuous Cosmos tokenizer: {exc}") from None


def _check_window(instance: CosmosOptions, attribute: Any, value: int) -> None:
    if value < 0:
        raise ValueError(f"'{attribute.name}' must be 0 (no windows) or a positive number of frames (got {value})")
    try:
        variant = parse_variant(instance.variant)
    except ValueError:
        return  # the variant's own validator reports it
    if value and variant.video and (value - 1) % variant.temporal_factor:
        good = [1 + k * variant.temporal_factor for k in (4, 12)]
        raise ValueError(
            f"'{attribute.name}' must be 1 + a multiple of the temporal factor {variant.temporal_factor} "
            f"of {variant.name} "
            f"(e.g. {good[0]} or {good[1]}), got {value}"
        )


@attrs.define(kw_only=True)
class CosmosOptions:
    """NVIDIA Cosmos continuous tokenizer (CV4x8x8 by default), from its encoder.jit/decoder.jit files."""

    variant: str = attrs.field(default=DEFAULT_VARIANT, validator=_check_variant)
    path: str = ""  # a local folder with encoder.jit and decoder.jit; empty: the hub repo nvidia/<variant>
    cache_dir: str = ""  # Hugging Face cache for hub downloads; empty: the hub's default
    scale: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))  # latents = raw * scale
    device: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "cpu", "cuda"]))
    dtype: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "bf16", "fp32"]))
    temporal_window: int = attrs.field(default=0, validator=_check_window)  # frames per chunk; 0: whole video
    align: str = attrs.field(default="error", validator=attrs.validators.in_(["error", "pad"]))

    # The shape arithmetic is a fact of the options (no weights needed), so a recipe's sizes can be checked
    # when it is loaded (see dfmkit.recipe_checks); the tokenizer uses the same methods.

    def frame_chunks(self, frames: int) -> list[int]:
        """Frames per independently encoded chunk, after padding the last one if ``align = 'pad'``."""
        variant = parse_variant(self.variant)
        if frames < 1:
            raise TokenizerInputError(f"{variant.name} needs at least one frame, got {frames}")
        if not variant.video:
            return [frames]
        window = self.temporal_window or frames
        chunks = [window] * (frames // window) + ([frames % window] if frames % window else [])
        last, factor = chunks[-1], variant.temporal_factor
        if (last - 1) % factor:
            if self.align == "error":
                where = f"the last window of {last} frames" if len(chunks) > 1 else f"{frames} frames"
                good = frames - last + 1 + (last - 1) // factor * factor  # total frames that would align
                raise TokenizerInputError(
                    f"{variant.name} is causal with {factor}x temporal compression: a clip needs 1 + a multiple "
                    f"of {factor} frames, but {where} do not align (use {good} or {good + factor} frames, "
                    "or set tokenizer.align = 'pad' to repeat the last frame)"
                )
            chunks[-1] = 1 + _ceil_to(last - 1, factor)
        return chunks

    def aligned_side(self, side: int, what: str) -> int:
        """``side`` (height or width) as encoded: itself, or padded to a multiple of 16 if ``align = 'pad'``."""
        variant = parse_variant(self.variant)
        if side < variant.spatial_factor:
            raise TokenizerInputError(
                f"{what} {side} is smaller than the spatial factor {variant.spatial_factor} of {variant.name}; "
                f"the smallest input it takes is {SPATIAL_ALIGN}x{SPATIAL_ALIGN} pixels"
            )
        if side % SPATIAL_ALIGN:
            if self.align == "error":
                raise TokenizerInputError(
                    f"{what} {side} is not a multiple of {SPATIAL_ALIGN} ({variant.name} needs sides that are); "
                    f"resize to {side // SPATIAL_ALIGN * SPATIAL_ALIGN or SPATIAL_ALIGN} or "
                    f"{_ceil_to(side, SPATIAL_ALIGN)}, or set tokenizer.align = 'pad' to pad with zeros"
                )
            return _ceil_to(side, SPATIAL_ALIGN)
        return side

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(16, T', H', W') of the latent of a ``frames x height x width`` video (padded if ``align='pad'``)."""
        variant = parse_variant(self.variant)
        latent_frames = sum(1 + (n - 1) // variant.temporal_factor for n in self.frame_chunks(frames))
        h = self.aligned_side(height, "height") // variant.spatial_factor
        w = self.aligned_side(width, "width") // variant.spatial_factor
        return (LATENT_CHANNELS, latent_frames, h, w)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _first(output: Any) -> torch.Tensor:
    """The latent (or pixels) of a TorchScript module's output: a bare tensor or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DfmkitError(f"a Cosmos TorchScript module returned {type(output).__name__}, expected a tensor or a tuple")


class CosmosTokenizer:
    """Encodes pixels to scaled Cosmos latents and back; see the module docstring for the rules."""

    name = "cosmos"
    latent_channels = LATENT_CHANNELS

    def __init__(self, options: CosmosOptions | None = None):
        options = options or CosmosOptions()
        self.options = options
        self.variant = parse_variant(options.variant)
        self.spatial_factor = self.variant.spatial_factor
        self.temporal_factor = self.variant.temporal_factor
        self.scale = options.scale
        self.device = resolve_device(options.device, "tokenizer.device")
        if options.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = torch.bfloat16 if options.dtype == "bf16" else torch.float32
        self._modules: dict[str, Callable[..., Any]] = {}
        if options.path:
            folder = Path(options.path).expanduser()
            missing = [f for f in ARTIFACTS if not (folder / f).is_file()]
            if missing:
                raise MissingArtifactError(self._missing_message(missing, folder))

    @property
    def identity(self) -> str:
        """What determines the latents: variant, where its files come from, scale and windows."""
        source = str(Path(self.options.path).expanduser().resolve()) if self.options.path else self.variant.repo_id
        return f"cosmos:{self.variant.name}:{source}:scale={self.scale}:window={self.options.temporal_window}"

    def __repr__(self) -> str:
        return f"CosmosTokenizer({self.variant.name}, device={self.device}, dtype={self.dtype}, scale={self.scale})"

    # ---------------------------------------------------------------------------------- shapes

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(16, T', H', W') of the latent of a ``frames x height x width`` video (padded if ``align='pad'``)."""
        return self.options.latent_shape(frames, height, width)

    # --------------------------------------------------------------------------------- loading

    def _missing_message(self, missing: list[str], folder: Path | None) -> str:
        where = f"in {folder}" if folder is not None else f"from the Hugging Face hub repo {self.variant.repo_id}"
        return (
            f"Cosmos tokenizer {self.variant.name}: {', '.join(missing)} not found {where}. "
            f"The folder needs {' and '.join(ARTIFACTS)} as published in the hub repo {self.variant.repo_id}; "
            f"get them with `hf download {self.variant.repo_id} {' '.join(ARTIFACTS)} --local-dir <folder>` "
            "(set HF_TOKEN if the repo asks for it) and set tokenizer.path = '<folder>', "
            "or leave tokenizer.path empty to download them where the network allows."
        )

    def _artifact(self, filename: str) -> Path:
        if self.options.path:
            file = Path(self.options.path).expanduser() / filename
            if not file.is_file():  # removed since the tokenizer was built
                raise MissingArtifactError(self._missing_message([filename], file.parent))
            return file
        import huggingface_hub

        try:
            folder = huggingface_hub.snapshot_download(
                repo_id=self.variant.repo_id, allow_patterns=[filename], cache_dir=self.options.cache_dir or None
            )
        except Exception as exc:  # offline, gated, unknown repo: one message with the way out
            raise MissingArtifactError(
                self._missing_message([filename], None) + f" (The download failed: {type(exc).__name__}: {exc})"
            ) from exc
        file = Path(folder) / filename
        if not file.is_file():
            raise MissingArtifactError(self._missing_message([filename], None))
        return file

    def _module(self, part: str) -> Callable[..., Any]:
        """The TorchScript ``encoder`` or ``decoder``, loaded on first use (prepare needs only the encoder)."""
        if part not in self._modules:
            file = self._artifact(f"{part}.jit")
            try:
                module = torch.jit.load(str(file), map_location=self.device)
            except Exception as exc:
                raise DfmkitError(f"cannot load {file} as TorchScript ({type(exc).__name__}: {exc})") from exc
            self._modules[part] = module.eval().to(self.dtype)
        return self._modules[part]

    # ------------------------------------------------------------------------- encode / decode

    def _pad(self, pixels: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        _, _, frames, height, width = pixels.shape
        extra_frames = sum(chunks) - frames
        if extra_frames:
            pixels = torch.cat([pixels, pixels[:, :, -1:].expand(-1, -1, extra_frames, -1, -1)], dim=2)
        pad_h = self.options.aligned_side(height, "height") - height
        pad_w = self.options.aligned_side(width, "width") - width
        if pad_h or pad_w:
            pixels = torch.nn.functional.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return pixels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 16, T', H', W']`` (times ``scale``) of pixels ``[B, 3, T, H, W]`` in [-1, 1]."""
        if pixels.ndim != 5 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise TokenizerInputError(
                f"{self.variant.name} expects float pixels [B, 3, T, H, W] in [-1, 1], "
                f"got {tuple(pixels.shape)} {pixels.dtype}"
            )
        batch, _, frames, height, width = pixels.shape
        expected = self.latent_shape(frames, height, width)  # validates sizes before any work
        chunks = self.options.frame_chunks(frames)
        encoder = self._module("encoder")
        x = self._pad(pixels, chunks).to(self.device, self.dtype)
        with torch.inference_mode():
            if self.variant.video:
                starts = [sum(chunks[:i]) for i in range(len(chunks))]
                latent = torch.cat([_first(encoder(x[:, :, s : s + n])) for s, n in zip(starts, chunks)], dim=2)
            else:  # image tokenizer: frames are encoded one by one as a batch of images
                images = x.transpose(1, 2).flatten(0, 1)
                latent = _first(encoder(images))
                latent = latent.unflatten(0, (batch, -1)).transpose(1, 2) if latent.ndim == 4 else latent
        if tuple(latent.shape) != (batch, *expected):
            raise DfmkitError(
                f"the encoder.jit of {self.variant.name} returned latents of shape {tuple(latent.shape)} for pixels "
                f"{tuple(x.shape)}; expected {(batch, *expected)}. Does the folder hold another variant's files?"
            )
        return (latent.float() * self.scale).to(pixels.device, pixels.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] of latents made by :meth:`encode` (divided by ``scale`` first)."""
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS or not latents.is_floating_point():
            raise TokenizerInputError(
                f"{self.variant.name} decodes float latents [B, {LATENT_CHANNELS}, T, H, W], "
                f"got {tuple(latents.shape)} {latents.dtype}"
            )
        batch, _, latent_frames, _, _ = latents.shape
        decoder = self._module("decoder")
        z = (latents.float() / self.scale).to(self.device, self.dtype)
        with torch.inference_mode():
            if self.variant.video:
                window = self.options.temporal_window
                step = 1 + (window - 1) // self.temporal_factor if window else latent_frames
                chunks = [_first(decoder(z[:, :, s : s + step])) for s in range(0, latent_frames, step)]
                pixels = torch.cat(chunks, dim=2)
            else:
                pixels = _first(decoder(z.transpose(1, 2).flatten(0, 1)))
                pixels = pixels.unflatten(0, (batch, -1)).transpose(1, 2)
        return pixels.float().clamp(-1, 1).to(latents.device, latents.dtype)


def build(options: CosmosOptions, **_context) -> CosmosTokenizer:
    return CosmosTokenizer(options)
