"""Shared pieces of the data tests (no tests here): a deterministic test-only text encoder, a stub
backbone carrying patch sizes, recipes, and writers of good and deliberately broken shards."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from dfmkit.data.prepare import index_dataset
from dfmkit.data.shards import DATASET_INFO, ShardWriter, encode_tensor
from dfmkit.hookspecs import hookimpl
from dfmkit.plugins import PluginManager
from dfmkit.recipe import load_recipe

TEXT_DIM = 8


class HashTextEncoder:
    """TEST-ONLY text encoder implementing the TextEncoder protocol: one state per word plus an end
    token, values seeded by the word, so equal captions give equal states and lengths vary."""

    def __init__(self, dim: int = TEXT_DIM):
        self.dim = dim
        self.identity = f"test-hash:{dim}"

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for text in texts:
            rows = []
            for word in [*text.split(), "</s>"]:
                seed = int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "big")
                rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
            out.append(torch.stack(rows))
        return out


@attrs.define(kw_only=True)
class StubBackboneOptions:
    """Patch sizes, as the real backbone's options carry them."""

    patch_spatial: int = 2
    patch_temporal: int = 1


@attrs.define(kw_only=True)
class HashOptions:
    dim: int = TEXT_DIM


class DataTestComponents:
    @hookimpl
    def dfmkit_register(self, registries):
        registries.backbone.register("test-dit", dict, options=StubBackboneOptions)
        registries.text_encoder.register("test-hash", lambda options, **_: HashTextEncoder(options.dim), options=HashOptions)


def data_plugins() -> PluginManager:
    return PluginManager(entry_points=False, extra=[(DataTestComponents(), "dfmkit-tests")])


def recipe_dict(path: str | Path = "", text_encoder: str = "test-hash", **data) -> dict:
    return {
        "model": {"name": "test-dit"},
        "tokenizer": {"name": "identity"},
        "text_encoder": {"name": text_encoder},
        "data": {"path": str(path), "image_size": 16, "num_workers": 0, "seq_length": 256, "packing_buffer_size": 16,
                 "shuffle_buffer_size": 0, **data},
    }


def recipe(path: str | Path = "", **data):
    plugins = data.pop("plugins", None) or data_plugins()
    return load_recipe(recipe_dict(path, **data), registries=plugins.registries)


# ------------------------------------------------------------------------------------------------
# Writing shards by hand (for loader and task-encoder tests)
# ------------------------------------------------------------------------------------------------


def latent(shape=(3, 1, 8, 8), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def text(length: int = 4, seed: int = 0, dim: int = TEXT_DIM) -> torch.Tensor:
    return torch.randn(length, dim, generator=torch.Generator().manual_seed(1000 + seed))


def write_good(root: Path, prefix: str, keys: Sequence[int], shape=(3, 1, 8, 8)) -> list[str]:
    """Good samples with keys ``{k:09d}``; latent and text seeded by the key."""
    with ShardWriter(root, prefix, max_samples=len(keys)) as writer:
        for k in keys:
            writer.write(f"{k:09d}", latent(shape, k), text(2 + k % 5, k), {"caption": f"good {k}"})
    return [f"{k:09d}" for k in keys]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_raw(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """A tar of samples given as (key, {part: bytes})."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for part, data in parts.items():
                add_member(tar, f"{key}.{part}", data)


def members(key: int, lat: torch.Tensor | None = None, txt: torch.Tensor | None = None) -> dict[str, bytes]:
    return {
        "latent.safetensors": encode_tensor(latent(seed=key) if lat is None else lat, "latent"),
        "text.safetensors": encode_tensor(text(3, key) if txt is None else txt, "text"),
        "json": json.dumps({"caption": f"sample {key}"}).encode(),
    }


def write_info(root: Path, latent_channels: int = 3, text_dim: int = TEXT_DIM, **more) -> None:
    """A ``dfmkit.json`` with the fields given (such as ``shard_samples`` and ``latent_shapes``, which ``dfmkit
    prepare`` writes)."""
    (root / DATASET_INFO).write_text(json.dumps({"latent_channels": latent_channels, "text_dim": text_dim, **more}))


def run_recipe(data: Path, checkpoints: Path, *, num_workers: int = 0, train_iters: int = 2,
               save_interval: int = 0) -> str:
    """A TOML recipe for ``dfmkit run``: the tiny DiT on a dataset written by these helpers (3 channels, width 8)."""
    return f"""
[model]
name = "dit"
preset = "tiny"
in_channels = 3
text_dim = {TEXT_DIM}

[tokenizer]
name = "identity"

[text_encoder]
name = "t5-tiny"

[task_encoder]
name = "packed"

[data]
path = "{data}"
seq_length = 256
num_workers = {num_workers}
packing_buffer_size = 8
shuffle_buffer_size = 0

[train]
train_iters = {train_iters}
global_batch_size = 1
log_interval = 1

[optim]
warmup_iters = 1

[checkpoint]
dir = "{checkpoints}"
save_interval = {save_interval}

[validation]
interval = 0

[logging]
progress = false
"""


__all__ = [
    "HashTextEncoder", "TEXT_DIM", "add_member", "data_plugins", "index_dataset", "latent", "members", "recipe",
    "recipe_dict", "run_recipe", "text", "write_good", "write_info", "write_raw",
]
