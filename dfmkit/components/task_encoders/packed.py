"""The ``packed`` task encoder: Energon samples -> thd-packed sequences (:class:`dfmkit.batch.PackedBatch`).

Per sample (in Energon's cooker, so in the loader's worker processes):

1. find the ``latent`` / ``text`` members (``.safetensors`` or ``.npy``) and the ``json``;
   decode them (no pickle; Energon's own decoder is switched off so that every failure is ours
   to count);
2. check them: latent ``[C, T, H, W]`` (a leading 1 is dropped) with the dataset's channel count,
   finite and within ``max_abs_latent``, dividing into ``pt x p x p`` patches, and no longer than
   ``data.seq_length`` tokens once padded; text ``[L >= 1, D]`` with the dataset's width, finite
   (cut to ``max_text_tokens`` when that is set);
3. patchify, pad the tokens to ``pad_multiple`` (what tensor x 2*context parallelism need), and
   build the (t, h, w) position ids.

A sample failing a check is skipped (Energon's ``SkipSample``) and counted by reason, once by its index in the
split, in the loader's :class:`~dfmkit.data.skips.SkipCounter`; each pack carries the skips counted in its worker
process since the previous pack on to the loader.

Packing: from each packing buffer (``data.packing_buffer_size`` samples) the samples are put into
sequences of at most ``data.seq_length`` tokens by first-fit decreasing on their padded lengths;
the resulting packs are shuffled with a seed taken from their keys (deterministic, so the
loader's saved state replays exactly). Every sample of the buffer lands in exactly one pack.
A pack is one micro-batch: Energon's batch size is ``None``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from megatron.energon import Cooker, Sample, SkipSample, TaskEncoder, basic_sample_keys, stateless

from dfmkit.batch import PackedBatch, patchify, round_up
from dfmkit.components.task_encoders import PackedOptions
from dfmkit.data import model_dims
from dfmkit.latent_sizes import latent_tokens, patch_sizes
from dfmkit.data.shards import LATENT, META_PART, TEXT, decode_tensor, find_member
from dfmkit.data.skips import SkipCounter, SkipError


@dataclasses.dataclass
class EncodedSample(Sample):
    """One sample, patchified and padded, waiting in the packing buffer."""

    tokens: torch.Tensor  # [n_padded, p*p*pt*C]
    pos_ids: torch.Tensor  # [n_padded, 3] int32, zeros in the padding
    seqlen: int  # real tokens
    text: torch.Tensor  # [L, D]
    latent_shape: tuple[int, int, int, int]
    meta: dict  # the sample's json (caption, sizes, ...)


@dataclasses.dataclass
class PackSample(Sample):
    """One packed sequence (one micro-batch), as Energon passes it to the main process.

    Worker processes hand tensors over as shared memory, one file descriptor per tensor, which
    costs more than the data: so the latents, text states and position ids travel in ONE byte
    buffer (``layout`` says where each lies), the lengths as lists, and :meth:`to_batch` builds the
    :class:`PackedBatch` from views of the buffer, without copying.
    """

    buffer: torch.Tensor  # uint8: latents [L, F], text [Lkv, D], pos_ids [L, 3] int32, 16-byte aligned
    layout: list[tuple[str, str, tuple[int, ...], int]]  # (name, dtype, shape, byte offset)
    seqlens: list[int]
    padded: list[int]
    text_lengths: list[int]
    latent_shapes: list[tuple[int, int, int, int]]
    keys: list[str]
    meta: list[dict]  # each sample's json, in pack order
    skipped: list  # the skip records (identity, reason, samples) new in this worker since its last pack

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, dtype_name, shape, offset in self.layout:
            dtype = getattr(torch, dtype_name)
            nbytes = math.prod(shape) * dtype.itemsize
            out[name] = self.buffer[offset: offset + nbytes].view(dtype).view(shape)
        return out

    def to_batch(self) -> PackedBatch:
        tensors = self.tensors()
        return PackedBatch(
            latents=tensors["latents"],
            seqlens=torch.tensor(self.seqlens, dtype=torch.int32),
            cu_seqlens=torch.tensor([0, *_cumsum(self.padded)], dtype=torch.int32),
            text=tensors["text"],
            seqlens_kv=torch.tensor(self.text_lengths, dtype=torch.int32),
            cu_seqlens_kv=torch.tensor([0, *_cumsum(self.text_lengths)], dtype=torch.int32),
            pos_ids=tensors["pos_ids"],
            latent_shapes=torch.tensor(self.latent_shapes, dtype=torch.int32).reshape(-1, 4),
            keys=list(self.keys),
        )


def _concat_into_buffer(parts: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """Concatenate each list of tensors (along dim 0) into one shared uint8 buffer; returns it and its layout."""
    layout, offset = [], 0
    for name, tensors in parts.items():
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        layout.append((name, str(tensors[0].dtype).removeprefix("torch."), shape, offset))
        offset += -(-math.prod(shape) * tensors[0].dtype.itemsize // 16) * 16
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (name, dtype_name, shape, start), tensors in zip(layout, parts.values()):
        nbytes = math.prod(shape) * tensors[0].dtype.itemsize
        dtype = tensors[0].dtype  # a sample stored in another dtype is cast to the first one's
        torch.cat([t.to(dtype) for t in tensors], out=buffer[start: start + nbytes].view(dtype).view(shape))
    return buffer, layout


@functools.lru_cache(maxsize=256)
def _grid(frames: int, height: int, width: int) -> torch.Tensor:
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3).to(torch.int32)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity`` (first fit, longest first).

    Items longer than ``capacity`` get a bin of their own (the task encoder skips them before).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


class PackedTaskEncoder(TaskEncoder):
    """Energon TaskEncoder for CrudeWebdataset shards written by ``dfmkit prepare``."""

    decoder = None  # raw bytes to the cooker: every decode failure is counted as a skip

    def __init__(
        self,
        *,
        seq_length: int,
        patch_spatial: int = 2,
        patch_temporal: int = 1,
        pad_multiple: int = 1,
        options: PackedOptions | None = None,
        text_dim: int = 0,
        latent_channels: int = 0,
        skips: SkipCounter | None = None,
    ):
        self.options = options = options or PackedOptions()
        self.seq_length = int(seq_length)
        self.patch_spatial = int(patch_spatial)
        self.patch_temporal = int(patch_temporal)
        self.pad_multiple = max(1, int(pad_multiple))
        self.text_dim = options.text_dim or text_dim
        self.latent_channels = options.latent_channels or latent_channels
        self.skips = skips if skips is not None else SkipCounter()
        if round_up(1, self.pad_multiple) > self.seq_length:
            raise ValueError(f"data.seq_length ({self.seq_length}) is smaller than the pad multiple {self.pad_multiple}")
        self.cookers = [Cooker(self.cook)]

    # -- per sample ----------------------------------------------------------------------------

    def _decode(self, sample: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        found = {}
        for name in (LATENT, TEXT):
            member = find_member(sample, name)
            if member is None:
                raise SkipError("missing_member", f"no {name}.safetensors or {name}.npy")
            found[name] = member
        if META_PART not in sample:
            raise SkipError("missing_member", "no json")
        tensors = {}
        for name, (fmt, data) in found.items():
            try:
                tensors[name] = decode_tensor(data, name, fmt)
            except Exception as exc:
                raise SkipError("undecodable", f"{name}.{fmt}: {type(exc).__name__}: {exc}") from None
        try:
            meta = json.loads(sample[META_PART])
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except Exception as exc:
            raise SkipError("undecodable", f"json: {type(exc).__name__}: {exc}") from None
        return tensors[LATENT], tensors[TEXT], meta

    def check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim == 5 and latent.shape[0] == 1:
            latent = latent[0]
        if latent.ndim != 4 or not latent.is_floating_point() or latent.numel() == 0:
            raise SkipError("bad_latent", f"expected a floating latent [C, T, H, W], got {latent.dtype} {tuple(latent.shape)}")
        c, t, h, w = latent.shape
        if self.latent_channels and c != self.latent_channels:
            raise SkipError("bad_latent", f"latent has {c} channels, the dataset's tokenizer gives {self.latent_channels}")
        p, pt = self.patch_spatial, self.patch_temporal
        if t % pt or h % p or w % p:
            raise SkipError("bad_latent", f"latent {tuple(latent.shape)} does not divide into {pt}x{p}x{p} patches")
        largest = float(latent.abs().max())  # NaN propagates through max: one reduction checks both
        if not math.isfinite(largest):
            raise SkipError("nonfinite", "latent holds NaN or Inf")
        bound = self.options.max_abs_latent
        if bound and largest > bound:
            raise SkipError("nonfinite", f"latent has values up to {largest:g}, beyond max_abs_latent={bound:g}")
        tokens = round_up(latent_tokens(latent.shape, p, pt), self.pad_multiple)
        if tokens > self.seq_length:
            raise SkipError("too_long", f"latent {list(latent.shape)} makes {tokens} tokens ({pt}x{p}x{p} patches, "
                            f"padded to a multiple of {self.pad_multiple}), more than a pack of "
                            f"data.seq_length = {self.seq_length} holds", size=tokens)
        return latent

    def check_text(self, text: torch.Tensor) -> torch.Tensor:
        if text.ndim == 3 and text.shape[0] == 1:
            text = text[0]
        if text.ndim != 2 or text.numel() == 0 or not text.is_floating_point():
            raise SkipError("bad_text", f"expected floating text states [L >= 1, D], got {text.dtype} {tuple(text.shape)}")
        if self.text_dim and text.shape[1] != self.text_dim:
            raise SkipError("bad_text", f"text width {text.shape[1]}, the dataset's text encoder gives {self.text_dim}")
        if not math.isfinite(float(text.abs().max())):
            raise SkipError("bad_text", "text states hold NaN or Inf")
        if self.options.max_text_tokens and text.shape[0] > self.options.max_text_tokens:
            text = text[: self.options.max_text_tokens]
        return text

    def encode(self, latent: torch.Tensor, text: torch.Tensor, meta: dict) -> dict[str, Any]:
        """The fields of an :class:`EncodedSample` for a checked latent and text."""
        p, pt = self.patch_spatial, self.patch_temporal
        c, t, h, w = latent.shape
        tokens = patchify(latent, p, pt)
        n = tokens.shape[0]
        padded = round_up(n, self.pad_multiple)
        pos = _grid(t // pt, h // p, w // p)
        if padded != n:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, padded - n))
            pos = torch.nn.functional.pad(pos, (0, 0, 0, padded - n))
        return dict(tokens=tokens.contiguous(), pos_ids=pos, seqlen=n, text=text.contiguous(),
                    latent_shape=(c, t, h, w), meta=meta)

    @stateless
    def cook(self, sample: dict) -> EncodedSample:
        size = None
        try:
            latent, text, meta = self._decode(sample)
            fields = self.encode(self.check_latent(latent), self.check_text(text), meta)
        except SkipError as skip:
            reason, detail, size = skip.reason, skip.detail, skip.size
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError, OverflowError) as exc:
            reason, detail = "error", f"{type(exc).__name__}: {exc}"  # data nobody foresaw: a skip all the same
        else:
            self.skips.usable()
            return EncodedSample(**basic_sample_keys(sample), **fields)
        where = f"{sample.get('__shard__', '')}/{sample.get('__key__', '')}".lstrip("/")
        self.skips.count(reason, sample_index(sample, where), detail, where=where, size=size)
        raise SkipSample()

    # -- packing -------------------------------------------------------------------------------

    def select_samples_to_pack(self, samples: list[EncodedSample]) -> list[list[EncodedSample]]:
        bins = first_fit_decreasing([s.tokens.shape[0] for s in samples], self.seq_length)
        packs = [[samples[i] for i in sorted(b)] for b in bins]
        if self.options.shuffle_packs and len(packs) > 1:
            digest = hashlib.sha1("|".join(s.__key__ for s in samples).encode()).digest()
            random.Random(int.from_bytes(digest[:8], "big")).shuffle(packs)
        return packs

    @stateless
    def pack_selected_samples(self, samples: list[EncodedSample]) -> PackSample:
        """One pack of ``samples``; it also carries the skips counted in this process since the last pack to the
        loader's counter (see :mod:`dfmkit.data.skips`)."""
        keys = [s.__key__ for s in samples]
        buffer, layout = _concat_into_buffer({
            "latents": [s.tokens for s in samples],
            "text": [s.text for s in samples],
            "pos_ids": [s.pos_ids for s in samples],
        })
        return PackSample.derive_from(
            samples[0], __key__=",".join(keys), buffer=buffer, layout=layout,
            seqlens=[s.seqlen for s in samples],
            padded=[s.tokens.shape[0] for s in samples],
            text_lengths=[s.text.shape[0] for s in samples],
            latent_shapes=[s.latent_shape for s in samples],
            keys=keys,
            meta=[s.meta for s in samples],
            skipped=self.skips.take_new(),
        )


def sample_index(sample: Mapping[str, Any], fallback: str) -> int | str:
    """A crude sample's identity: its index in the split (Energon's source info or restore key), else ``fallback``."""
    sources = sample.get("__sources__") or ()
    if sources and isinstance(getattr(sources[0], "index", None), int):
        return sources[0].index
    restore_key = sample.get("__restore_key__") or ()
    return restore_key[-1] if restore_key and isinstance(restore_key[-1], int) else fallback


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def build(
    options: PackedOptions,
    *,
    recipe: Any,
    pad_multiple: int = 1,
    skips: SkipCounter | None = None,
    dataset_info: Mapping[str, Any] | None = None,
    seq_length: int | None = None,
    **_context: Any,
) -> PackedTaskEncoder:
    """The task encoder for ``recipe``: patch sizes from ``[model]``, capacity from ``data.seq_length``.

    The latent channels and text width a sample must have come from the options, else from the
    dataset's ``dfmkit.json``, else from the backbone's ``in_channels`` / ``text_dim``.
    """
    patch_spatial, patch_temporal = patch_sizes(recipe.model.options)
    if seq_length is None:
        seq_length = recipe.data.seq_length
    info = dataset_info or {}
    channels, width = model_dims(recipe)
    return PackedTaskEncoder(
        seq_length=seq_length, patch_spatial=patch_spatial, patch_temporal=patch_temporal,
        pad_multiple=pad_multiple, options=options, skips=skips,
        text_dim=int(info.get("text_dim") or width or 0), latent_channels=int(info.get("latent_channels") or channels or 0),
    )
