"""The dataset format on disk: WebDataset tar shards of encoded samples, and how to write and read them.

One sample is three tar members sharing a key (the key has no dots)::

    <key>.latent.safetensors   the tokenizer's latent [C, T, H, W], in the dtype it came out in
                               (safetensors, one tensor named "latent"); or <key>.latent.npy
    <key>.text.safetensors     the text encoder's states [L, D] at their TRUE length L (no padding;
                               one tensor named "text"); or <key>.text.npy
    <key>.json                 metadata: caption, original height/width/frames, fps, latent shape,
                               text length, source and index

``.npy`` members are written with ``allow_pickle=False`` and read the same way; they cannot hold
bfloat16, so safetensors is the default. Nothing in a dataset needs pickle to load.

A dataset folder (written by ``dfmkit prepare``) holds shards named ``<split>-r<rank>-<n>.tar``
(split is train, val or test), ``dfmkit.json`` describing the whole set (tokenizer and text
encoder identities, latent channels, text width, counts, the samples written into each shard
(``shard_samples``), the smallest and largest latent shape of each split (``latent_shapes``)) and
Energon's index in ``.nv-meta/``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from dfmkit.errors import DfmkitError

LATENT = "latent"
TEXT = "text"
META_PART = "json"
FORMATS = ("safetensors", "npy")
DATASET_INFO = "dfmkit.json"
DATASET_FORMAT = "dfmkit-webdataset/1"
#: Energon's ``.nv-meta/dataset.yaml`` as ``dfmkit prepare`` writes it (and ``energon prepare`` for a crude dataset):
#: the only declaration the loader opens, since Energon builds whatever class or function a declaration names.
ENERGON_DECLARATION = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}


def encode_tensor(tensor: torch.Tensor, name: str, fmt: str = "safetensors") -> bytes:
    """``tensor`` as the bytes of one ``.safetensors`` (tensor called ``name``) or ``.npy`` member."""
    tensor = tensor.detach().to("cpu").contiguous()
    if fmt == "safetensors":
        return safetensors.torch.save({name: tensor})
    if fmt == "npy":
        if tensor.dtype == torch.bfloat16:
            raise ValueError("bfloat16 cannot be stored as .npy; use the safetensors format")
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        return buffer.getvalue()
    raise ValueError(f"unknown tensor format {fmt!r}; use one of {', '.join(FORMATS)}")


def decode_tensor(data: bytes, name: str, fmt: str) -> torch.Tensor:
    """The tensor of a member written by :func:`encode_tensor` (raises on anything else)."""
    if fmt == "safetensors":
        tensors = safetensors.torch.load(data)
        if name not in tensors:
            raise ValueError(f"safetensors member has no tensor {name!r} (has {sorted(tensors)})")
        return tensors[name]
    if fmt == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        return torch.from_numpy(np.ascontiguousarray(array))
    raise ValueError(f"unknown tensor format {fmt!r}")


def find_member(sample: Mapping[str, Any], name: str) -> tuple[str, Any] | None:
    """The (format, raw bytes) of member ``name`` (``latent`` or ``text``) in a crude sample."""
    for fmt in FORMATS:
        part = f"{name}.{fmt}"
        if part in sample:
            return fmt, sample[part]
    return None


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    return info, io.BytesIO(data)


class ShardWriter:
    """Writes samples into numbered tar shards ``<prefix>-<n:06d>.tar`` of at most ``max_samples`` each.

    Each shard is written under a ``.tmp`` name and renamed when complete, so a crash never
    leaves a half-written ``.tar`` that looks finished.
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str, max_samples: int = 1000, fmt: str = "safetensors"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown tensor format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_samples = max(1, int(max_samples))
        self.fmt = fmt
        self.shards: list[Path] = []
        self.counts: list[int] = []  # samples written into each finished shard
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def _open(self) -> None:
        path = self.directory / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = path.with_suffix(".tar.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(path)
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.shards[-1])
            self.counts.append(self._in_shard)
            self._tar = None

    def write(self, key: str, latent: torch.Tensor, text: torch.Tensor, meta: Mapping[str, Any]) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if self._tar is None or self._in_shard >= self.max_samples:
            self._close()
            self._open()
        members = (
            (f"{key}.{LATENT}.{self.fmt}", encode_tensor(latent, LATENT, self.fmt)),
            (f"{key}.{TEXT}.{self.fmt}", encode_tensor(text, TEXT, self.fmt)),
            (f"{key}.{META_PART}", json.dumps(dict(meta), sort_keys=True).encode()),
        )
        for name, data in members:
            self._tar.addfile(*_tar_member(name, data))
        self._in_shard += 1
        self.samples += 1

    def close(self) -> list[Path]:
        self._close()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_dataset_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``dfmkit.json`` of a prepared folder, or None for a folder that dfmkit did not write."""
    info = Path(path) / DATASET_INFO
    if not info.is_file():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        found = f"not readable JSON ({data})" if isinstance(data, Exception) else f"a JSON {type(data).__name__}"
        raise DfmkitError(f"{info}: expected the JSON object `dfmkit prepare` writes, found {found}; prepare the "
                          "dataset again (dfmkit prepare ... --overwrite) or restore the file")
    return data
