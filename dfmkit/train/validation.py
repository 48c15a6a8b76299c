"""Validation during training, with the EMA weights: loss at fixed noise levels, and generation.

The loss uses the same few batches, the same noise and every sample conditioned, at each
``validation.loss_sigmas`` level, so the numbers are comparable across steps and runs. Generation
samples ``validation.prompts`` with the recipe's sampler through the same code as ``dfmkit generate``
(:mod:`dfmkit.generation`) and writes its files (``NNN.png``/``NNN.mp4`` + ``NNN.json``) under
``<checkpoint.dir>/validation_generation/step_<n>/``, and logs them to TensorBoard (and W&B). A sample that
holds NaN or inf (EMA weights of a run that diverged, or a guidance so large that it overflows) is not written
nor logged, which a warning says; training goes on (the loss guard of the training loop deals with divergence).
On a GPU each pack's evaluations replay one CUDA graph, captured at each validation and freed after it
(:mod:`dfmkit.generation.graphs`; ``validation.cuda_graphs = false`` samples eagerly).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

from dfmkit import parallel
from dfmkit.data.loader import build_validation_batches
from dfmkit.diffusion.objective import ModelFn, loss_share
from dfmkit.errors import GenerateError
from dfmkit.generation.graphs import whole_denoiser_graphs
from dfmkit.generation.memory import check_memory
from dfmkit.generation.outputs import (
    decode,
    non_finite,
    non_finite_cause,
    non_finite_message,
    sample_settings,
    sampler_settings,
    to_uint8_frames,
    write_output,
)
from dfmkit.generation.prompts import encode_prompts, make_requests
from dfmkit.generation.sampling import SamplingModel, build_sampler
from dfmkit.generation.sizes import latent_shape_for
from dfmkit.latent_sizes import patch_sizes
from dfmkit.job import Job
from dfmkit.parallel import ParallelLayout
from dfmkit.train.ema import EMA
from dfmkit.train.logger import MetricsLogger
from dfmkit.train.step import shard_draw

log = logging.getLogger("dfmkit")

VIDEO_FPS = 24

@contextlib.contextmanager
def ema_evaluation(model: torch.nn.Module, ema: EMA) -> Iterator[None]:
    """Inside the block ``model`` is in eval mode with the EMA weights; after it, trained weights in train mode."""
    model.eval()
    try:
        with ema.applied():
            yield
    finally:
        model.train()


def validation_shape(job: Job, tokenizer: Any) -> tuple[int, int, int, int]:
    """The latent shape of ``validation.frames/height/width``, or the :class:`GenerateError` ``dfmkit generate``
    gives a size that does not fit the tokenizer and the backbone's patches (naming the nearest ones that do)."""
    config = job.recipe.validation
    p, pt = patch_sizes(job.recipe.model.options)
    try:
        return latent_shape_for(tokenizer, p, pt, config.frames, config.height, config.width,
                                job.recipe.tokenizer.name)
    except GenerateError as exc:
        raise GenerateError(f"validation.frames/height/width: {exc}") from None


class Validator:
    """Validation of a training run: :meth:`run` at a step computes the loss and generates the prompts.

    It sees the run through what it needs: the backbone (for its sizes, in the memory check of the validation
    prompts before training starts), ``model_fn(x, c_noise, batch)`` (the live model's call),
    ``ema_weights()`` (a context in which the model holds its EMA weights, in eval mode), the parallel ``env``,
    the device and dtype, the pack padding, the folder for generated files and the logger. Its loss is the
    training loss (the trainer's context-parallel sharding and :func:`~dfmkit.diffusion.objective.loss_share`) at
    fixed noise levels."""

    def __init__(self, job: Job, *, model: torch.nn.Module, model_fn: ModelFn,
                 ema_weights: Callable[[], AbstractContextManager[Any]], env: ParallelLayout, device: torch.device,
                 model_dtype: torch.dtype, pad_multiple: int, out_dir: Path, logger: MetricsLogger):
        self.job = job
        self.config = job.recipe.validation
        self.model_fn = model_fn
        self.ema_weights = ema_weights
        self.env = env
        self.device = device
        self.model_dtype = model_dtype
        self.out_dir = out_dir
        self.logger = logger
        self.diffusion = job.recipe.diffusion
        self.objective = job.components["diffusion"].build(recipe=job.recipe)
        self.loss_sigmas = list(self.config.loss_sigmas or type(self.objective.options).LOSS_SIGMAS)
        self.batches = build_validation_batches(
            job, dp_rank=env.dp_rank, dp_size=env.dp_size, pad_multiple=pad_multiple, count=self.config.loss_batches,
        ) if self.config.loss_batches else []
        p, pt = patch_sizes(job.recipe.model.options)
        self.sampling = SamplingModel(model_fn, self.objective, env, device, model_dtype, p, pt, pad_multiple)
        self.prompt_states: list[torch.Tensor] = []  # generation runs on the ranks that hold them
        self.requests, self.tokenizer, self.latent_shape = [], None, None
        self.sampler_name, self.sampler, self.sampler_options = None, None, None
        if self.config.prompts and env.dp_rank == 0:
            self.requests = make_requests(self.config.prompts, height=None, width=None, frames=None,
                                          defaults=(self.config.frames, self.config.height, self.config.width))
            self.tokenizer = job.components["tokenizer"].build(recipe=job.recipe)
            self.latent_shape = validation_shape(job, self.tokenizer)
            self._check_memory(model)
            self.sampler_name, self.sampler, self.sampler_options = build_sampler(job)
            # Encode the prompts once; the (possibly very large) text encoder is not kept.
            encoder = job.components["text_encoder"].build(recipe=job.recipe)
            self.prompt_states = encode_prompts(encoder, self.config.prompts, job.recipe)
            del encoder

    def _check_memory(self, model: torch.nn.Module) -> None:
        """Refuse, before training starts, validation sizes whose generation cannot fit in the memory there is now
        (the model, its gradients and optimizer state already allocated): the lower bound of
        :mod:`dfmkit.generation.memory`, in the packs :meth:`generate` samples them in."""
        config = self.config
        need = self.sampling.memory_need(self.requests, [self.latent_shape] * len(self.requests), 0,
                                         guided=config.guidance != 1.0, model=model)
        fix = (f"lower validation.height/width/frames (now {config.height} x {config.width} x {config.frames} frames) "
               f"or give fewer validation.prompts (now {len(self.requests)})")
        try:
            check_memory(need, self.device, fix)
        except GenerateError as exc:
            raise GenerateError(f"validation generation: {exc}") from None

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        results = {}
        for sigma in self.loss_sigmas:
            total = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss total, count
            for index, batch in enumerate(self.batches):
                generator = torch.Generator().manual_seed(self.config.seed + index)
                draw = self.objective.draw(batch, generator)
                draw = attrs.evolve(draw, sigma=torch.full_like(draw.sigma, sigma),
                                    keep_text=torch.ones_like(draw.keep_text))
                local_batch, local_draw = shard_draw(batch, draw, self.env, self.device)
                terms = self.objective.loss_terms(self.model_fn, local_batch, local_draw, self.model_dtype)
                share = loss_share(terms, self.objective.loss_normalization, self.env)
                total[0] += share.total.double()
                total[1] += share.count
            dist.all_reduce(total, group=parallel.data_and_context_group(self.env))
            results[f"val/loss_sigma_{sigma:g}"] = float(total[0] / total[1].clamp(min=1))
        if results:
            results["val/loss_mean"] = sum(results.values()) / len(results)
        return results

    @torch.no_grad()
    def generate(self, step: int) -> list[Path]:
        """Sample the validation prompts (the ranks of data-parallel group 0 together); rank 0 writes
        ``step_<step>/NNN.png``/``.mp4`` + ``NNN.json`` and logs the first frames. Returns the written files."""
        if not self.prompt_states:
            return []
        config = self.config
        shapes = [self.latent_shape] * len(self.requests)
        graphs = whole_denoiser_graphs(config.cuda_graphs, self.job.recipe.model.options)
        latents = self.sampling.sample(self.sampler, self.prompt_states, shapes, guidance=config.guidance,
                                       seed=config.seed, cuda_graphs=graphs)
        if self.env.rank != 0:
            return []
        out_dir = self.out_dir / f"step_{step}"
        common = {"step": step, "weights": "ema", **sampler_settings(self.sampler_name, self.sampler_options, self.diffusion),
                  "guidance": config.guidance, "base_seed": config.seed}
        first_frames, written, skipped = {}, [], []
        for index, (request, shape, latent) in enumerate(zip(self.requests, shapes, latents)):
            decoded = decode(self.tokenizer, latent) if not non_finite([latent]) else None
            if decoded is None or non_finite([decoded]):
                skipped.append(index)  # a NaN sample would be written as a black image
                continue
            first_frames[index] = to_uint8_frames(decoded)[0]
            settings = {**common, **sample_settings(index, request, config.seed + index, shape, VIDEO_FPS)}
            written.append(write_output(out_dir, index, decoded, settings, VIDEO_FPS))
        if skipped:
            prompts = [r.prompt for r in self.requests]
            log.warning(f"step {step}: validation {non_finite_message(skipped, prompts)}: not written, training goes "
                        f"on; likely cause: {non_finite_cause(config.guidance, None)}")
        self.logger.images(step, "validation/generated", first_frames)
        return written

    def run(self, step: int) -> dict[str, float]:
        with self.ema_weights():
            losses = self.validation_loss()
            written = self.generate(step)
        self.logger.scalars(step, losses)
        if losses:
            self.logger.message(f"step {step}: validation loss {losses['val/loss_mean']:.4f}"
                                + (f", {len(written)} samples in {written[0].parent}" if written else ""))
        return losses
