"""What a DiT forward needs to know about its pack, computed once per pack: :class:`PackedLayout`.

Which sample each token belongs to (whole sequence, and the share a layer holds under sequence parallelism),
the attention segments of self- and cross-attention (cross-attention only of the samples with text: null-text
samples, the unconditional half of a guided pack, get exactly zero from it and skip it), which keys are real
(padding never serves as a key; under context parallelism: which rows of the all-gathered keys), and the rotary
embedding's angles; and, without autograd, the text's keys and values of each cross-attention.
:meth:`dfmkit.components.backbones.dit.DiT.layout` keeps it on the batch, so every forward of one pack reuses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dfmkit.batch import PackedBatch
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.backbones.dit.layers import Segments, rope3d
from dfmkit.parallel.context import ContextParallelBatch, shard_index


@dataclasses.dataclass
class PackedLayout:
    """What the layers need about the pack, computed once per pack."""

    samples: Segments  # tokens of this (CP) rank, full sequence
    sp_samples: Segments  # the tokens a layer holds: this TP rank's chunk under SP, else == samples
    self_attn: VarlenParams  # local query segments vs. each sample's real keys
    kv_index: torch.Tensor | None  # rows of the (CP-gathered) keys that are real, grouped by sample
    cross_attn: VarlenParams  # local query segments vs. each sample's text, of the samples with text
    # Cross-attention runs on the first `text_tokens` local tokens and text rows (None: all); the tokens after
    # them belong to null-text samples (PackedBatch.null_text_from), whose cross-attention output is zero.
    text_tokens: tuple[int, int] | None
    rope: tuple[torch.Tensor, torch.Tensor] | None
    cp_group: Any = None  # set when keys/values must be all-gathered over context parallelism
    # Each cross-attention's text keys and values, kept between forwards without autograd (the stamp of what they
    # were computed from, (k, v)); see CrossAttention.text_keys_values.
    text_keys_values: dict[int, tuple[Any, tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=dict)


def _real_positions(cu: list[int], seqlens: list[int], device) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(cu, seqlens)])


def build_layout(
    batch: PackedBatch,
    *,
    tp_size: int,
    tp_rank: int,
    sequence_parallel: bool,
    cp_group: Any,
    rope: tuple[int, float] | None,
    dtype: torch.dtype = torch.float32,
) -> PackedLayout:
    device = batch.latents.device
    n = batch.num_samples
    cu = batch.host("cu_seqlens")
    seqlens = batch.host("seqlens")
    padded = [b - a for a, b in zip(cu, cu[1:])]
    equal = n > 0 and all(length == padded[0] for length in padded)
    samples = Segments(batch.token_sample_ids(), n, equal=equal)
    sp_samples = samples
    if sequence_parallel and tp_size > 1:
        chunk = batch.num_tokens // tp_size
        sp_samples = Segments(samples.ids[tp_rank * chunk : (tp_rank + 1) * chunk], n)

    cu_k = [0]
    for length in seqlens:
        cu_k.append(cu_k[-1] + length)
    if isinstance(batch, ContextParallelBatch):
        global_cu = batch.host("global_cu_seqlens")
        gathered = torch.cat([shard_index(global_cu, batch.cp_size, r, device=device) for r in range(batch.cp_size)])
        row_of = torch.empty_like(gathered)
        row_of[gathered] = torch.arange(gathered.numel(), device=device)
        kv_index = row_of[_real_positions(global_cu, seqlens, device)]
    elif cu_k[-1] != batch.num_tokens:
        kv_index = _real_positions(cu, seqlens, device)
    else:
        kv_index = None

    # Null-text samples skip cross-attention, except under sequence parallelism (the projections gather the
    # sequence across ranks, whose chunks cut across samples).
    cross_cu, cross_cu_kv, text_tokens = cu, batch.host("cu_seqlens_kv"), None
    if batch.null_text_from is not None and not (sequence_parallel and tp_size > 1):
        k = batch.null_text_from
        cross_cu, cross_cu_kv = cross_cu[: k + 1], cross_cu_kv[: k + 1]
        text_tokens = (cross_cu[-1], cross_cu_kv[-1])

    rope_cs = None
    if rope is not None:
        head_dim, theta = rope
        rope_cs = rope3d(batch.pos_ids.to(device), head_dim, theta, dtype)
    return PackedLayout(
        samples=samples,
        sp_samples=sp_samples,
        self_attn=VarlenParams.from_host(cu, cu_k, device),
        kv_index=kv_index,
        cross_attn=VarlenParams.from_host(cross_cu, cross_cu_kv, device),
        text_tokens=text_tokens,
        rope=rope_cs,
        cp_group=cp_group,
    )
