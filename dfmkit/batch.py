"""The packed batch: one sequence of N samples of different lengths, and the token layout around it.

A micro-batch is ONE packed sequence (the "thd" layout). Sample i owns the latent tokens
``cu_seqlens[i]:cu_seqlens[i+1]``; the first ``seqlens[i]`` of them are real, the rest is padding
(each sample is padded to a multiple that tensor and context parallelism need). Its text states
are ``text[cu_seqlens_kv[i]:cu_seqlens_kv[i+1]]``, at their true length, unpadded.

Token layout (as in the reference): a latent ``[C, T, H, W]`` is cut into patches of
``pt x p x p``; tokens are raster-ordered with t slowest and w fastest, and each token's
features are ordered (ph, pw, pt, C) with C fastest. ``pos_ids`` holds each token's (t, h, w)
patch coordinates.

The unconditional input for classifier-free guidance is text of zeros: with bias-free
key/value projections, cross-attention to zero states outputs exactly zero whatever their
length, so a dropped caption during training and a one-token null caption at sampling time
are the same condition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from dfmkit.compat.torch_tensor import version
from dfmkit.errors import DfmkitError


T = TypeVar("T")


class BatchError(DfmkitError):
    """A packed batch whose lengths and tensors disagree."""


@dataclasses.dataclass
class PackedBatch:
    latents: torch.Tensor  # [L, F] patchified latent tokens (x0 during training), F = p*p*pt*C
    seqlens: torch.Tensor  # [N] int32, real tokens per sample
    cu_seqlens: torch.Tensor  # [N+1] int32, padded sample boundaries in the token axis
    text: torch.Tensor  # [Lkv, D_text] text-encoder states of all samples, concatenated
    seqlens_kv: torch.Tensor  # [N] int32, text tokens per sample
    cu_seqlens_kv: torch.Tensor  # [N+1] int32, text boundaries (no padding)
    pos_ids: torch.Tensor  # [L, 3] int32 (t, h, w) patch coordinates; padding rows are 0
    latent_shapes: torch.Tensor  # [N, 4] int32 (C, T, H, W) of each sample's latent
    keys: list[str] = dataclasses.field(default_factory=list)
    # Samples from this index on have null text, one token of zeros, written by with_unconditional(): their
    # cross-attention outputs exactly zero, so the DiT skips it (None: no such promise; the text may change in
    # place only in the samples before it).
    null_text_from: int | None = None
    # Host copies of the small index tensors, so a model on the GPU reads lengths without a device sync.
    _host: dict[str, tuple[torch.Tensor, int, list[int]]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)
    # Values derived from the fields once per pack (token ids and mask, a model's layout): see :meth:`derived`.
    _derived: dict[Any, tuple[tuple, tuple, Any]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)

    HOST_FIELDS = ("seqlens", "cu_seqlens", "seqlens_kv", "cu_seqlens_kv")
    # The fields the token layout (which sample a token belongs to, which tokens are real) is made of.
    LAYOUT_FIELDS = ("seqlens", "cu_seqlens")

    def host(self, name: str) -> list[int]:
        """``getattr(self, name).tolist()``, computed once (while the tensor is still on the CPU when the
        batch was made there: :meth:`to` carries the lists over to the moved batch)."""
        tensor = getattr(self, name)
        cached = self._host.get(name)
        if cached is None or cached[0] is not tensor or cached[1] != version(tensor):
            cached = self._host[name] = (tensor, version(tensor), tensor.tolist())
        return cached[2]

    @property
    def num_samples(self) -> int:
        return int(self.seqlens.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.latents.shape[0])

    def padded_seqlens(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int32)

    def derived(self, key: Any, compute: Callable[[], T], fields: Sequence[str]) -> T:
        """``compute()``, kept on this batch under ``key`` for as long as the tensors of ``fields`` are the same
        objects, unchanged in place, and the latents on the same device with as many tokens.

        For values every forward of a pack needs and that its fields fix (token ids, the mask, a model's layout):
        computing them launches small kernels and copies lists from the host, so a sampler's forwards of one pack
        compute them once. A tensor value changed in place by its user is computed again. The values live as long
        as the batch does (a CUDA graph captured from a forward of this pack reads them: whoever keeps the graph
        keeps the batch).
        """
        tensors = tuple(getattr(self, name) for name in fields)
        stamp = (*((id(t), version(t) if isinstance(t, torch.Tensor) else None) for t in tensors),
                 self.latents.device, self.num_tokens)
        cached = self._derived.get(key)
        if cached is not None and cached[0] == stamp:
            value, value_version = cached[2]
            if not isinstance(value, torch.Tensor) or version(value) == value_version:
                return value
        value = compute()
        # The stamp holds ids: keeping the tensors themselves here stops another tensor from taking an id over.
        self._derived[key] = (stamp, tensors, (value, version(value) if isinstance(value, torch.Tensor) else None))
        return value

    def token_sample_ids(self) -> torch.Tensor:
        """[L] int64: the sample each token (real or padding) belongs to (computed once per pack: do not change it
        in place)."""
        return self.derived("token_sample_ids", self._token_sample_ids, self.LAYOUT_FIELDS)

    def token_mask(self) -> torch.Tensor:
        """[L] bool: True for real tokens, False for padding (computed once per pack: do not change it in place)."""
        return self.derived("token_mask", self._token_mask, self.LAYOUT_FIELDS)

    def _token_sample_ids(self) -> torch.Tensor:
        return torch.repeat_interleave(  # output_size: no device sync to learn the length
            torch.arange(self.num_samples, device=self.latents.device), self.padded_seqlens().to(torch.int64),
            output_size=self.num_tokens,
        )

    def _token_mask(self) -> torch.Tensor:
        padded, n = self.padded_seqlens().to(torch.int64), self.num_tokens
        offsets = torch.arange(n, device=self.latents.device) - torch.repeat_interleave(
            self.cu_seqlens[:-1].to(torch.int64), padded, output_size=n
        )
        return offsets < torch.repeat_interleave(self.seqlens.to(torch.int64), padded, output_size=n)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        """On ``device``; ``dtype`` applies to the floating tensors (latents and text). Keeps the subclass."""
        moved, host = {}, {}
        for field in dataclasses.fields(self):
            if not field.init:
                continue
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                if field.name in self.HOST_FIELDS and (value.device.type == "cpu" or field.name in self._host):
                    host[field.name] = self.host(field.name)
                # Pinned memory (the loaders pin their batches) copies without blocking the host.
                value = value.to(device, dtype=dtype if (dtype is not None and value.is_floating_point()) else None,
                                 non_blocking=value.is_pinned())
            moved[field.name] = value
        result = type(self)(**moved)
        for name, values in host.items():
            result.keep_host(name, values)
        return result

    def keep_host(self, name: str, values: list[int]) -> None:
        """Record ``values`` as the host copy of the index tensor ``name`` (what :meth:`host` returns), for a
        batch made on the device from another whose lengths the host knows."""
        tensor = getattr(self, name)
        self._host[name] = (tensor, version(tensor), values)

    def with_text(self, text: torch.Tensor) -> PackedBatch:
        """The same batch with other text states (same shape), keeping the host copies of the lengths and the
        values derived from the token layout."""
        result = dataclasses.replace(self, text=text)
        result._host.update(self._host)
        result._derived.update(self._derived)
        return result

    def pin_memory(self) -> PackedBatch:
        """A copy whose CPU tensors are in page-locked memory (their copies to a GPU then do not block)."""
        pinned = self.to("cpu")
        for field in dataclasses.fields(pinned):
            value = getattr(pinned, field.name)
            if field.init and isinstance(value, torch.Tensor) and value.device.type == "cpu":
                setattr(pinned, field.name, value.pin_memory())
        pinned._host.clear()
        return pinned

    def with_unconditional(self) -> PackedBatch:
        """This pack followed by its null-text copy (see :func:`with_unconditional`)."""
        return with_unconditional(self)

    def validate(self) -> PackedBatch:
        """Check that every length agrees with the tensors; raise :class:`BatchError` naming the values."""
        n = self.num_samples
        problems = []
        if self.latents.ndim != 2:
            problems.append(f"latents must be [L, F], got shape {tuple(self.latents.shape)}")
        if self.text.ndim != 2:
            problems.append(f"text must be [Lkv, D], got shape {tuple(self.text.shape)}")
        for name, tensor, size in (
            ("cu_seqlens", self.cu_seqlens, n + 1),
            ("seqlens_kv", self.seqlens_kv, n),
            ("cu_seqlens_kv", self.cu_seqlens_kv, n + 1),
        ):
            if tensor.ndim != 1 or tensor.numel() != size:
                problems.append(f"{name} must have {size} entries for {n} samples, got shape {tuple(tensor.shape)}")
        if self.latent_shapes.shape != (n, 4):
            problems.append(f"latent_shapes must be [{n}, 4], got {tuple(self.latent_shapes.shape)}")
        if problems:
            raise BatchError("inconsistent packed batch: " + "; ".join(problems))
        cu, cu_kv = self.host("cu_seqlens"), self.host("cu_seqlens_kv")
        if cu[0] != 0 or cu[-1] != self.num_tokens or any(b < a for a, b in zip(cu, cu[1:])):
            problems.append(f"cu_seqlens {cu} must rise from 0 to the {self.num_tokens} latent tokens")
        if cu_kv[0] != 0 or cu_kv[-1] != self.text.shape[0] or any(b < a for a, b in zip(cu_kv, cu_kv[1:])):
            problems.append(f"cu_seqlens_kv {cu_kv} must rise from 0 to the {self.text.shape[0]} text tokens")
        padded = [b - a for a, b in zip(cu, cu[1:])]
        real = self.host("seqlens")
        if any(r < 1 or r > p for r, p in zip(real, padded)):
            problems.append(f"seqlens {real} must each be >= 1 and <= the padded lengths {padded}")
        if self.host("seqlens_kv") != [b - a for a, b in zip(cu_kv, cu_kv[1:])]:
            problems.append(f"seqlens_kv {self.host('seqlens_kv')} disagree with cu_seqlens_kv {cu_kv}")
        if self.pos_ids.shape != (self.num_tokens, 3):
            problems.append(f"pos_ids must be [{self.num_tokens}, 3], got {tuple(self.pos_ids.shape)}")
        if len(self.keys) not in (0, n):
            problems.append(f"{len(self.keys)} keys for {n} samples")
        if self.null_text_from is not None and not 0 <= self.null_text_from <= n:
            problems.append(f"null_text_from {self.null_text_from} is not a sample index of the {n} samples")
        if problems:
            raise BatchError("inconsistent packed batch: " + "; ".join(problems))
        return self


def patchify(latent: torch.Tensor, patch_spatial: int, patch_temporal: int = 1) -> torch.Tensor:
    """``[C, T, H, W]`` -> tokens ``[(T/pt)(H/p)(W/p), p*p*pt*C]`` in the reference's order."""
    c, t, h, w = latent.shape
    p, pt = patch_spatial, patch_temporal
    if t % pt or h % p or w % p:
        raise BatchError(f"latent of shape {(c, t, h, w)} does not divide into patches of {pt}x{p}x{p} (t x h x w)")
    x = latent.reshape(c, t // pt, pt, h // p, p, w // p, p)
    x = x.permute(1, 3, 5, 4, 6, 2, 0)  # T' H' W' ph pw pt C
    return x.reshape((t // pt) * (h // p) * (w // p), p * p * pt * c)


def unpatchify(tokens: torch.Tensor, latent_shape: Sequence[int], patch_spatial: int, patch_temporal: int = 1) -> torch.Tensor:
    """The inverse of :func:`patchify`: tokens ``[n, p*p*pt*C]`` -> latent ``[C, T, H, W]``."""
    c, t, h, w = (int(s) for s in latent_shape)
    p, pt = patch_spatial, patch_temporal
    x = tokens.reshape(t // pt, h // p, w // p, p, p, pt, c)
    x = x.permute(6, 0, 5, 1, 3, 2, 4)  # C T' pt H' ph W' pw
    return x.reshape(c, t, h, w)


def position_ids(frames: int, height: int, width: int) -> torch.Tensor:
    """``[frames*height*width, 3]`` int32 (t, h, w) coordinates of a patch grid, t slowest."""
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3).to(torch.int32)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass
class Sample:
    """One encoded sample before packing."""

    latent: torch.Tensor  # [C, T, H, W]
    text: torch.Tensor  # [Lkv, D] at its true length
    key: str = ""


def pack(samples: Sequence[Sample], patch_spatial: int, patch_temporal: int = 1, pad_multiple: int = 1) -> PackedBatch:
    """Patchify each sample, pad it to ``pad_multiple`` tokens, and concatenate into one sequence."""
    if not samples:
        raise BatchError("cannot pack zero samples")
    tokens, pos, lengths, padded, shapes = [], [], [], [], []
    for sample in samples:
        c, t, h, w = sample.latent.shape
        x = patchify(sample.latent, patch_spatial, patch_temporal)
        n = x.shape[0]
        n_padded = round_up(n, pad_multiple)
        grid = position_ids(t // patch_temporal, h // patch_spatial, w // patch_spatial)
        tokens.append(torch.nn.functional.pad(x, (0, 0, 0, n_padded - n)))
        pos.append(torch.nn.functional.pad(grid, (0, 0, 0, n_padded - n)))
        lengths.append(n)
        padded.append(n_padded)
        shapes.append((c, t, h, w))
    text_lengths = [s.text.shape[0] for s in samples]
    return PackedBatch(
        latents=torch.cat(tokens),
        seqlens=torch.tensor(lengths, dtype=torch.int32),
        cu_seqlens=torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32),
        text=torch.cat([s.text for s in samples]),
        seqlens_kv=torch.tensor(text_lengths, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor([0, *torch.tensor(text_lengths).cumsum(0).tolist()], dtype=torch.int32),
        pos_ids=torch.cat(pos),
        latent_shapes=torch.tensor(shapes, dtype=torch.int32),
        keys=[s.key for s in samples],
    ).validate()


def unpack(batch: PackedBatch, tokens: torch.Tensor, patch_spatial: int, patch_temporal: int = 1) -> list[torch.Tensor]:
    """Per-sample latents ``[C, T, H, W]`` from packed ``tokens [L, F]`` (padding dropped)."""
    cu, lengths = batch.cu_seqlens.tolist(), batch.seqlens.tolist()
    return [
        unpatchify(tokens[start : start + n], shape, patch_spatial, patch_temporal)
        for start, n, shape in zip(cu, lengths, batch.latent_shapes.tolist())
    ]


def with_unconditional(batch: PackedBatch) -> PackedBatch:
    """The pack followed by a copy of itself with null text, for one batched guided forward.

    Sample i + N is sample i with a one-token caption of zeros; token j + L is token j. The copy's samples are
    marked as null text (``null_text_from = N``), so the DiT skips their cross-attention, which outputs zero.
    """
    n = batch.num_samples
    null_text = torch.zeros(n, batch.text.shape[1], dtype=batch.text.dtype, device=batch.text.device)
    ones = torch.ones(n, dtype=torch.int32, device=batch.seqlens_kv.device)
    doubled = PackedBatch(
        latents=torch.cat([batch.latents, batch.latents]),
        seqlens=torch.cat([batch.seqlens, batch.seqlens]),
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[1:] + batch.cu_seqlens[-1]]),
        text=torch.cat([batch.text, null_text]),
        seqlens_kv=torch.cat([batch.seqlens_kv, ones]),
        cu_seqlens_kv=torch.cat([batch.cu_seqlens_kv, batch.cu_seqlens_kv[-1] + ones.cumsum(0, dtype=torch.int32)]),
        pos_ids=torch.cat([batch.pos_ids, batch.pos_ids]),
        latent_shapes=torch.cat([batch.latent_shapes, batch.latent_shapes]),
        keys=[*batch.keys, *(f"{k}/uncond" for k in batch.keys)],
        null_text_from=n,
    )
    # The doubled pack's lengths follow from the pack's: a model reads them without a device sync.
    seqlens, cu, cu_kv = batch.host("seqlens"), batch.host("cu_seqlens"), batch.host("cu_seqlens_kv")
    doubled.keep_host("seqlens", seqlens + seqlens)
    doubled.keep_host("cu_seqlens", cu + [c + cu[-1] for c in cu[1:]])
    doubled.keep_host("seqlens_kv", batch.host("seqlens_kv") + [1] * n)
    doubled.keep_host("cu_seqlens_kv", cu_kv + [cu_kv[-1] + i for i in range(1, n + 1)])
    return doubled
