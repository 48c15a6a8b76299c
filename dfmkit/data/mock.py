"""Mock data (``data.mock = true``, ``dfmkit run --mock``): random packed batches of configured sizes.

Every sample has a latent of ``data.mock_latent_shape`` ``[C, T, H, W]`` and ``data.mock_text_tokens``
text states of width ``data.mock_text_dim`` (standard normal, float32; C = 0 and width 0 take the
backbone's ``in_channels`` and ``text_dim``, 16 and 1024 without them), and each pack holds
``data.mock_samples_per_pack`` of them (0: as many as ``data.seq_length`` holds, at least one),
patchified and padded exactly as real data is. Batch ``i`` of DP rank ``r`` is drawn from a
generator seeded by (seed, r, i), so the stream is reproducible, DP ranks differ, and the saved
state is just the batch counter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dfmkit.batch import PackedBatch, Sample, pack, round_up
from dfmkit.data import check_fits_model, model_dims
from dfmkit.latent_sizes import latent_tokens, patch_sizes
from dfmkit.data.skips import SkipCounter
from dfmkit.errors import DfmkitError

STATE_FORMAT = "dfmkit-loader-state/1"


class MockLoader:
    """An endless iterator of random :class:`PackedBatch` with the same interface as the Energon loader."""

    def __init__(self, recipe: Any, *, dp_rank: int = 0, dp_size: int = 1, pad_multiple: int = 1, seed: int | None = None):
        data = recipe.data
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.pad_multiple = max(1, int(pad_multiple))
        self.patch_spatial, self.patch_temporal = patch_sizes(recipe.model.options)
        channels, width = model_dims(recipe)
        c, t, h, w = (int(s) for s in data.mock_latent_shape)
        self.latent_shape = (c or channels or 16, t, h, w)
        self.text_tokens, self.text_dim = int(data.mock_text_tokens), int(data.mock_text_dim) or width or 1024
        self.seed = int(getattr(recipe.train, "seed", 0) if seed is None else seed)
        check_fits_model(recipe, {"latent_channels": self.latent_shape[0], "text_dim": self.text_dim},
                         "mock data", hint="set data.mock_latent_shape = [0, ...] and data.mock_text_dim = 0 "
                                           "to take the model's sizes")
        c, t, h, w = self.latent_shape
        p, pt = self.patch_spatial, self.patch_temporal
        if t % pt or h % p or w % p:
            raise DfmkitError(f"data.mock_latent_shape {list(self.latent_shape)} does not divide into {pt}x{p}x{p} patches")
        self.tokens_per_sample = round_up(latent_tokens(self.latent_shape, p, pt), self.pad_multiple)
        if self.tokens_per_sample > data.seq_length:
            raise DfmkitError(f"a mock sample has {self.tokens_per_sample} tokens, more than data.seq_length={data.seq_length}")
        fits = data.seq_length // self.tokens_per_sample
        if data.mock_samples_per_pack > fits:  # real packs never exceed seq_length: neither do mock ones
            raise DfmkitError(
                f"data.mock_samples_per_pack = {data.mock_samples_per_pack} samples of {self.tokens_per_sample} tokens "
                f"do not fit in data.seq_length = {data.seq_length}; give at most {fits}, or 0 (as many as fit)")
        self.samples_per_pack = data.mock_samples_per_pack or fits
        self.skips = SkipCounter()
        self.batches = 0

    def __iter__(self) -> MockLoader:
        return self

    def __next__(self) -> PackedBatch:
        seed = ((self.seed * 1_000_003 + self.dp_rank) * 1_000_033 + self.batches) % (1 << 63)
        generator = torch.Generator().manual_seed(seed)
        samples = [
            Sample(
                latent=torch.randn(self.latent_shape, generator=generator),
                text=torch.randn(self.text_tokens, self.text_dim, generator=generator),
                key=f"mock-r{self.dp_rank}-{self.batches}-{i}",
            )
            for i in range(self.samples_per_pack)
        ]
        self.batches += 1
        return pack(samples, self.patch_spatial, self.patch_temporal, self.pad_multiple)

    @property
    def samples(self) -> int:
        return self.batches * self.samples_per_pack

    def save_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": "mock", "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "batches": self.batches, "skips": {}}

    def position(self) -> int:
        return self.batches

    def rewind(self, position: int) -> None:
        self.batches = position

    def restore_state(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        if state.get("kind") != "mock":
            raise DfmkitError("this loader state is not from mock data; resume with the same data.mock setting")
        self.batches = int(state["batches"])

    def close(self) -> None:
        pass
