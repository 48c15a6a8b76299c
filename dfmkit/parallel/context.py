"""Context parallelism for packed sequences: split a :class:`PackedBatch` across CP ranks and gather back.

Layout (load balancing). Every sample of the pack is padded to a multiple of ``2 * CP`` tokens
(:func:`required_pad_multiple`), cut into ``2 * CP`` equal chunks, and CP rank ``r`` keeps chunks
``r`` and ``2*CP - 1 - r`` of every sample, in that order. This is megatron's / TransformerEngine's
"thd" load-balanced layout (``thd_get_partitioned_indices``): for causal attention it evens out the
work; DiT attention is bidirectional, where every split of equal size is already balanced, and the
layout is kept for compatibility with TE's context-parallel attention. Each rank thus holds
``P_i / CP`` tokens of sample ``i`` (``P_i`` its padded length) and the same number of tokens overall.

Attention under CP: each rank computes queries, keys and values for its own tokens, all-gathers the
keys and values of the CP group (backward: reduce-scatter) and attends each sample's local queries
to all real keys of that sample. Text (cross-attention keys) is small and is replicated on every CP rank.

Gradients: each CP rank sees only its tokens, so its parameter gradients are partial sums; they are
summed over the CP group (megatron's DDP sums over data x context: the DiT's config sets
``calculate_per_token_loss``). The per-rank loss that makes the sum exact is
:func:`dfmkit.diffusion.objective.loss_share`: the rank's own error sums over each sample's total count of real tokens.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dfmkit.batch import BatchError, PackedBatch

if TYPE_CHECKING:
    from dfmkit.recipe import ParallelConfig


def required_pad_multiple(parallel: ParallelConfig | None) -> int:
    """Every sample's token count must be padded to a multiple of this for ``parallel``
    (:attr:`ParallelConfig.pad_multiple <dfmkit.recipe.ParallelConfig.pad_multiple>`; 1 without a layout)."""
    return 1 if parallel is None else parallel.pad_multiple


def shard_index(cu_seqlens: list[int], cp_size: int, cp_rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[L / cp_size] int64: the positions in the full pack of the tokens CP rank ``cp_rank`` holds, in its order."""
    pieces = []
    for start, end in zip(cu_seqlens, cu_seqlens[1:]):
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, device=device))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64, device=device)


def check_divisible(cu_seqlens: list[int], multiple: int, what: str) -> None:
    padded = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    bad = [p for p in padded if p % multiple]
    if bad:
        raise BatchError(
            f"{what} needs every sample padded to a multiple of {multiple} tokens, but the padded sample "
            f"lengths are {padded} ({bad} do not divide); pack with "
            f"pad_multiple=dfmkit.parallel.required_pad_multiple(recipe.parallel)"
        )


@dataclasses.dataclass
class ContextParallelBatch(PackedBatch):
    """This CP rank's shard of a :class:`PackedBatch` (see the module docstring for the layout).

    Differences from a full pack: ``latents`` and ``pos_ids`` hold only this rank's tokens and
    ``cu_seqlens`` their boundaries (sample ``i`` has ``P_i / cp_size`` tokens here);
    ``seqlens`` keeps each sample's TOTAL real-token count (the denominator of a per-sample mean),
    while :meth:`token_mask` marks the real tokens of this shard. ``text`` is the whole pack's text.
    Sums over tokens of a shard must be summed over the CP group.
    """

    cp_size: int = 1
    cp_rank: int = 0
    global_cu_seqlens: torch.Tensor | None = None  # [N+1] int32, boundaries in the full pack

    HOST_FIELDS = PackedBatch.HOST_FIELDS + ("global_cu_seqlens",)
    LAYOUT_FIELDS = PackedBatch.LAYOUT_FIELDS + ("global_cu_seqlens",)

    def global_index(self) -> torch.Tensor:
        """[L_local] int64: each local token's position in the full pack."""
        return shard_index(self.host("global_cu_seqlens"), self.cp_size, self.cp_rank, device=self.latents.device)

    def _token_mask(self) -> torch.Tensor:
        padded, n = self.padded_seqlens().to(torch.int64), self.num_tokens
        offsets = self.global_index() - torch.repeat_interleave(
            self.global_cu_seqlens[:-1].to(self.latents.device, torch.int64), padded, output_size=n
        )
        return offsets < torch.repeat_interleave(self.seqlens.to(torch.int64), padded, output_size=n)

    def with_unconditional(self) -> ContextParallelBatch:
        """This shard of ``dfmkit.batch.with_unconditional(full pack)`` (the pack then its null-text copy).

        Sample ``i + N`` is sample ``i`` again, so the doubled pack's shard is this shard twice over.
        """
        from dfmkit.batch import with_unconditional

        names = [f.name for f in dataclasses.fields(PackedBatch) if f.init]
        plain = PackedBatch(**{name: getattr(self, name) for name in names})
        plain._host.update({name: self._host[name] for name in PackedBatch.HOST_FIELDS if name in self._host})
        doubled = with_unconditional(plain)
        cu = self.global_cu_seqlens
        result = ContextParallelBatch(
            **{name: getattr(doubled, name) for name in names},
            cp_size=self.cp_size, cp_rank=self.cp_rank, global_cu_seqlens=torch.cat([cu, cu[1:] + cu[-1]]),
        )
        result._host.update(doubled._host)
        global_cu = self.host("global_cu_seqlens")
        result.keep_host("global_cu_seqlens", global_cu + [c + global_cu[-1] for c in global_cu[1:]])
        return result

    def validate(self) -> ContextParallelBatch:
        n = self.num_samples
        cu = self.host("cu_seqlens")
        global_cu = self.host("global_cu_seqlens")
        local = [(b - a) * self.cp_size for a, b in zip(cu, cu[1:])]
        padded = [b - a for a, b in zip(global_cu, global_cu[1:])]
        problems = []
        if len(global_cu) != n + 1 or local != padded:
            problems.append(
                f"local cu_seqlens {cu} are not the global {global_cu} divided by context parallelism {self.cp_size}"
            )
        if cu[0] != 0 or cu[-1] != self.num_tokens:
            problems.append(f"cu_seqlens {cu} must rise from 0 to the {self.num_tokens} local latent tokens")
        if self.pos_ids.shape != (self.num_tokens, 3):
            problems.append(f"pos_ids must be [{self.num_tokens}, 3], got {tuple(self.pos_ids.shape)}")
        if problems:
            raise BatchError("inconsistent context-parallel shard: " + "; ".join(problems))
        return self


def split_for_context_parallel(
    batch: PackedBatch, cp_size: int | None = None, cp_rank: int | None = None
) -> PackedBatch:
    """This CP rank's :class:`ContextParallelBatch` of ``batch`` (``batch`` itself when CP is 1).

    ``cp_size``/``cp_rank`` default to megatron's context-parallel group. Every padded sample
    length must be a multiple of ``2 * cp_size`` (a clear error names the lengths otherwise).
    """
    if cp_size is None or cp_rank is None:
        from megatron.core import parallel_state

        cp_size = parallel_state.get_context_parallel_world_size() if cp_size is None else cp_size
        cp_rank = parallel_state.get_context_parallel_rank() if cp_rank is None else cp_rank
    if cp_size == 1:
        return batch
    if isinstance(batch, ContextParallelBatch):
        raise BatchError("the batch is already a context-parallel shard; split the full pack")
    batch.validate()
    cu = batch.host("cu_seqlens")
    check_divisible(cu, 2 * cp_size, f"context parallelism {cp_size}")
    index = shard_index(cu, cp_size, cp_rank, device=batch.latents.device)
    return ContextParallelBatch(
        latents=batch.latents[index],
        seqlens=batch.seqlens,
        cu_seqlens=(batch.cu_seqlens // cp_size).to(torch.int32),
        text=batch.text,
        seqlens_kv=batch.seqlens_kv,
        cu_seqlens_kv=batch.cu_seqlens_kv,
        pos_ids=batch.pos_ids[index.to(batch.pos_ids.device)],
        latent_shapes=batch.latent_shapes,
        keys=list(batch.keys),
        null_text_from=batch.null_text_from,
        cp_size=cp_size,
        cp_rank=cp_rank,
        global_cu_seqlens=batch.cu_seqlens,
    )


def shard_for_context_parallel(
    batch: PackedBatch, tokens: torch.Tensor, env=None
) -> tuple[PackedBatch, torch.Tensor]:
    """This CP rank's shard of ``batch`` and the matching rows of a per-token tensor ``tokens [L, ...]``
    (noise, targets). ``env`` (a :class:`~dfmkit.parallel.ParallelLayout`) defaults to megatron's groups."""
    cp_size = env.cp_size if env is not None else None
    cp_rank = env.cp_rank if env is not None else None
    shard = split_for_context_parallel(batch, cp_size, cp_rank)
    if not isinstance(shard, ContextParallelBatch):
        return shard, tokens
    index = shard_index(batch.host("cu_seqlens"), shard.cp_size, shard.cp_rank, device=tokens.device)
    return shard, tokens[index]


def gather_from_context_parallel(
    local: torch.Tensor, shard: PackedBatch | None = None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The full-pack tensor ``[L, ...]`` from every CP rank's ``[L / CP, ...]`` piece (no autograd).

    The inverse of the token selection of :func:`split_for_context_parallel`, for sampling and
    validation: ``shard`` is the :class:`ContextParallelBatch` the pieces belong to. Without context
    parallelism (a plain :class:`PackedBatch`, or a ParallelLayout / None with CP of 1) ``local`` comes
    back unchanged.
    """
    if not isinstance(shard, ContextParallelBatch):
        cp_size = getattr(shard, "cp_size", None)
        if cp_size is None and not isinstance(shard, PackedBatch):
            from megatron.core import parallel_state

            cp_size = parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        if cp_size not in (None, 1):
            raise BatchError(
                f"gathering over context parallelism {cp_size} needs the ContextParallelBatch the pieces belong to "
                "(the shard from split_for_context_parallel / shard_for_context_parallel), to put tokens back in order"
            )
        return local
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    pieces = [torch.empty_like(local) for _ in range(shard.cp_size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    global_cu = shard.host("global_cu_seqlens")
    index = torch.cat([shard_index(global_cu, shard.cp_size, r, device=local.device) for r in range(shard.cp_size)])
    full = torch.empty((global_cu[-1], *local.shape[1:]), dtype=local.dtype, device=local.device)
    full[index] = torch.cat(pieces)
    return full
