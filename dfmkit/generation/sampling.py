"""Sampling: text states and latent shapes -> packed sequences -> the sampler with guidance -> latents.

Used by ``dfmkit generate`` (:class:`dfmkit.generation.Generator`) and by validation during training. Each
sample's starting noise is drawn from its own generator (``seed + index``), so a sample does not depend on
what else shares its pack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from dfmkit import parallel
from dfmkit.batch import PackedBatch, Sample, pack, round_up, unpack
from dfmkit.diffusion.objective import ModelFn, Objective
from dfmkit.diffusion.guidance import guided_denoiser
from dfmkit.generation.graphs import PackGraphs
from dfmkit.generation.memory import MemoryNeed, memory_need
from dfmkit.generation.prompts import Request
from dfmkit.job import Job
from dfmkit.latent_sizes import latent_tokens
from dfmkit.parallel import ParallelLayout
from dfmkit.recipe import load_recipe

ShardFn = Callable[[PackedBatch, torch.Tensor], tuple[PackedBatch, torch.Tensor]]
GatherFn = Callable[[torch.Tensor, PackedBatch], torch.Tensor]


def starting_noise(batch: PackedBatch, seeds: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian ``[L, F]``, sample i drawn from a generator seeded with ``seeds[i]``; zero on padding."""
    noise = torch.zeros_like(batch.latents, dtype=torch.float32)
    for seed, start, n in zip(seeds, batch.cu_seqlens[:-1].tolist(), batch.seqlens.tolist(), strict=True):
        generator = torch.Generator().manual_seed(seed)
        noise[start : start + n] = torch.randn(n, batch.latents.shape[1], generator=generator)
    return noise


@torch.no_grad()
def sample_latents(
    model_fn: ModelFn,
    objective: Objective,
    sampler: Any,
    texts: Sequence[torch.Tensor],
    latent_shapes: Sequence[Sequence[int]],
    *,
    guidance: float,
    seed: int | Sequence[int],
    patch_spatial: int,
    patch_temporal: int,
    pad_multiple: int = 1,
    device: torch.device | str = "cpu",
    model_dtype: torch.dtype | None = None,
    shard: ShardFn | None = None,
    gather: GatherFn | None = None,
    cuda_graphs: bool = False,
    graphs: PackGraphs | None = None,
) -> list[torch.Tensor]:
    """Latents ``[C, T, H, W]`` for each (text states, latent shape), all sampled in one packed sequence; latent i
    starts from noise seeded with ``seed + i``, or ``seed[i]`` when ``seed`` is one per latent.

    ``shard(batch, noise)`` splits the pack across context-parallel ranks and ``gather(x, shard)`` puts the
    result back in the full pack's order.

    ``cuda_graphs`` on a CUDA ``device``: every evaluation of the guided denoiser replays one CUDA graph
    (:mod:`dfmkit.generation.graphs`; for a network on one GPU, without collectives inside). ``graphs`` keeps the
    graphs between calls, by pack (default: captured for this call and dropped after it). Elsewhere it has no effect.
    """
    device = torch.device(device)
    samples = [Sample(torch.zeros(*(int(s) for s in shape)), text.float().cpu(), f"sample_{i}")
               for i, (text, shape) in enumerate(zip(texts, latent_shapes))]
    batch = pack(samples, patch_spatial, patch_temporal, pad_multiple)
    seeds = [seed + i for i in range(len(samples))] if isinstance(seed, int) else [int(s) for s in seed]
    noise = starting_noise(batch, seeds)
    local_batch, local_noise = shard(batch, noise) if shard else (batch, noise)
    # On the device in the network's dtype once: every evaluation hands the network this same pack, with nothing
    # to convert or copy, and the network lays the pack out once (kept on the batch).
    local_batch = local_batch.to(device, model_dtype)
    local_noise = local_noise.to(device)
    denoise = guided_denoiser(model_fn, objective, local_batch, guidance, model_dtype)
    if cuda_graphs and device.type == "cuda":
        key = (model_fn, repr(objective), guidance, model_dtype, device, patch_spatial, patch_temporal, pad_multiple,
               tuple(tuple(int(s) for s in shape) for shape in latent_shapes), tuple(tuple(t.shape) for t in texts))
        # An example of what the sampler passes: its float64 state, and a level of the objective's grid.
        x_example, sigma_example = local_noise.to(torch.float64), objective.sampling_sigmas(1, device)[0]
        kept = graphs if graphs is not None else PackGraphs(max_packs=1)
        denoise = kept.denoiser(key, denoise, x_example, sigma_example)
    generator = torch.Generator().manual_seed(seeds[0])
    x0 = sampler.sample(denoise, local_noise, objective, generator=generator)
    x0 = gather(x0, local_batch) if gather else x0
    return unpack(batch, x0.float().cpu(), patch_spatial, patch_temporal)


def split_packs(shapes: Sequence[Sequence[int]], patch_spatial: int, patch_temporal: int, max_tokens: int,
                pad_multiple: int, by_size: bool = False) -> list[list[int]]:
    """Indices of the latents of each pack: in order, at most ``max_tokens`` latent tokens each (0: no limit);
    ``by_size``: a pack holds latents of one token count only (the sizes in order of first appearance)."""
    tokens = [latent_tokens(shape, patch_spatial, patch_temporal) for shape in shapes]
    groups = [[i for i in range(len(shapes)) if tokens[i] == n] for n in dict.fromkeys(tokens)] if by_size else [
        list(range(len(shapes)))]
    packs: list[list[int]] = []
    for group in groups:
        packs.append([])
        used = 0
        for i in group:
            padded = round_up(tokens[i], pad_multiple)
            if max_tokens and packs[-1] and used + padded > max_tokens:
                packs.append([])
                used = 0
            packs[-1].append(i)
            used += padded
    return packs


@attrs.frozen
class SamplingModel:
    """A model as sampling sees it: its call ``model_fn(x, c_noise, batch)``, its objective, where it
    runs, and the parallel layout (``env``) its packs are split over (context parallelism)."""

    model_fn: ModelFn
    objective: Objective
    env: ParallelLayout
    device: torch.device
    dtype: torch.dtype
    patch_spatial: int
    patch_temporal: int
    pad_multiple: int
    graphs: PackGraphs | None = None  # CUDA graphs kept between calls (None: each call captures its own)

    def packs(self, shapes: Sequence[Sequence[int]], max_tokens: int = 0) -> list[list[int]]:
        """The indices of the latents of ``shapes`` that :meth:`sample` samples together, pack by pack."""
        return split_packs(shapes, self.patch_spatial, self.patch_temporal, max_tokens, self.pad_multiple,
                           self.objective.grid_by_tokens)  # each size on its own grid: packs of one size

    def memory_need(self, requests: Sequence[Request], shapes: Sequence[Sequence[int]], max_tokens: int, *,
                    guided: bool, model: torch.nn.Module) -> MemoryNeed:
        """What sampling ``requests`` of latent ``shapes`` in :meth:`packs` needs at least (``model``: the backbone,
        for its sizes; :mod:`dfmkit.generation.memory`)."""
        return memory_need(requests, shapes, self.packs(shapes, max_tokens), patch_spatial=self.patch_spatial,
                           patch_temporal=self.patch_temporal, pad_multiple=self.pad_multiple, guided=guided,
                           model=model, dtype=self.dtype, tensor=self.env.tp_size, context=self.env.cp_size)

    def _shard(self, batch: PackedBatch, noise: torch.Tensor) -> tuple[PackedBatch, torch.Tensor]:
        return parallel.shard_for_context_parallel(batch, noise, self.env)

    @torch.no_grad()
    def sample(self, sampler: Any, texts: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]], *,
               guidance: float, seed: int, max_tokens: int = 0, cuda_graphs: bool = False) -> list[torch.Tensor]:
        """Latents ``[C, T, H, W]`` (float32, CPU, on every rank) for each (text states, latent shape); latent i
        starts from noise seeded with ``seed + i``. ``max_tokens`` > 0 samples packs of at most that many
        latent tokens, one after the other (0: one pack; or one per size where the objective's grid depends on
        it, :attr:`~dfmkit.diffusion.objective.Objective.grid_by_tokens`). ``cuda_graphs``: each pack's evaluations
        replay one CUDA graph (see :func:`sample_latents`) where the network runs on one GPU; under tensor or
        context parallelism the packs are sampled eagerly (collectives inside a captured graph are untried here)."""
        cuda_graphs = cuda_graphs and self.env.tp_size == 1 and self.env.cp_size == 1
        latents: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
        for indices in self.packs(shapes, max_tokens):
            objective = self.objective.for_tokens(latent_tokens(shapes[indices[0]], self.patch_spatial,
                                                                self.patch_temporal))
            pack_latents = sample_latents(
                self.model_fn, objective, sampler, [texts[i] for i in indices], [shapes[i] for i in indices],
                guidance=guidance, seed=[seed + i for i in indices], patch_spatial=self.patch_spatial,
                patch_temporal=self.patch_temporal, pad_multiple=self.pad_multiple, device=self.device,
                model_dtype=self.dtype, shard=self._shard, gather=parallel.gather_from_context_parallel,
                cuda_graphs=cuda_graphs, graphs=self.graphs,
            )
            for i, latent in zip(indices, pack_latents):
                latents[i] = latent
        return latents


def build_sampler(job: Job, name: str | None = None, steps: int | None = None) -> tuple[str, Any, Any]:
    """(name, sampler, options): the job's sampler, or the registered sampler ``name``, with ``num_steps = steps``
    when given: the recipe's ``sampler.name=...``/``sampler.num_steps=...`` overrides, so switching samplers keeps
    the options the new one shares, as any component switch does (:func:`dfmkit.recipe.load_recipe`)."""
    overrides = [f"sampler.name={name}"] if name and name != job.recipe.sampler.name else []
    overrides += [f"sampler.num_steps={steps}"] if steps is not None else []
    registries = job.plugins.registries
    section = load_recipe(job.recipe, overrides, registries=registries).sampler if overrides else job.recipe.sampler
    component = registries.sampler.get(section.name)
    return section.name, component.build(section.options, recipe=job.recipe, registries=registries), section.options
