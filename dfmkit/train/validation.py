"""Validation during training, with the EMA weights: loss at fixed noise levels, and generation.

The loss uses the same few batches, the same noise and every sample conditioned, at each
``validation.loss_sigmas`` level, so the numbers are comparable across steps and runs. Generation
samples ``validation.prompts`` with the recipe's sampler and writes PNG/MP4 files under
``<checkpoint.dir>/validation_generation/step_<n>/``, and logs them to TensorBoard (and W&B).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch
import torch.distributed as dist

from dfmkit.generation.outputs import save_media, to_uint8_frames
from dfmkit.generation.sampling import sample_latents

if TYPE_CHECKING:
    from dfmkit.train.loop import Trainer

log = logging.getLogger("dfmkit")


class Validator:
    def __init__(self, trainer: Trainer):
        from dfmkit.data.loader import build_validation_batches

        self.trainer = trainer
        recipe = trainer.recipe
        self.config = recipe.validation
        self.batches = build_validation_batches(
            trainer.job, dp_rank=trainer.env.dp_rank, dp_size=trainer.env.dp_size,
            pad_multiple=trainer.pad_multiple, count=self.config.loss_batches,
        ) if self.config.loss_batches else []
        self.prompt_states: list[torch.Tensor] = []
        self.tokenizer = None
        self.sampler = None
        if self.config.prompts and trainer.env.dp_rank == 0:
            self.sampler = trainer.job.components["sampler"].build(recipe=recipe)
            self.tokenizer = trainer.job.components["tokenizer"].build(recipe=recipe)
            # Encode the prompts once; the (possibly very large) text encoder is not kept.
            encoder = trainer.job.components["text_encoder"].build(recipe=recipe)
            self.prompt_states = [s.float().cpu() for s in encoder.encode(self.config.prompts)]
            del encoder

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        from dfmkit import parallel

        trainer = self.trainer
        results = {}
        for sigma in self.config.loss_sigmas:
            total = torch.zeros(2, device=trainer.device, dtype=torch.float64)  # sum of per-sample losses, samples
            for index, batch in enumerate(self.batches):
                generator = torch.Generator().manual_seed(self.config.seed + index)
                draw = trainer.edm.draw(batch, generator)
                draw = attrs.evolve(draw, sigma=torch.full_like(draw.sigma, sigma),
                                    keep_text=torch.ones_like(draw.keep_text))
                local_batch, local_draw = trainer.shard_draw(batch, draw)
                terms = trainer.edm.loss_terms(trainer._model_fn, local_batch, local_draw, trainer.model_dtype)
                counts = parallel.all_reduce_context_parallel(terms.token_count.clone(), trainer.env)
                total[0] += (terms.sq_err_sum / counts.clamp(min=1)).sum().double()
                if trainer.env.cp_rank == 0:
                    total[1] += (counts > 0).sum()
            dist.all_reduce(total, group=parallel.data_and_context_group(trainer.env))
            results[f"val/loss_sigma_{sigma:g}"] = float(total[0] / total[1].clamp(min=1))
        if results:
            results["val/loss_mean"] = sum(results.values()) / len(results)
        return results

    @torch.no_grad()
    def generate(self, step: int) -> list[Path]:
        from dfmkit import parallel

        trainer = self.trainer
        if not self.prompt_states:
            return []
        config = self.config
        options = trainer.model_options
        shape = self.tokenizer.latent_shape(config.frames, config.height, config.width)
        latents = sample_latents(
            trainer._model_fn, trainer.edm, self.sampler, self.prompt_states, [shape] * len(self.prompt_states),
            guidance=config.guidance, seed=config.seed, patch_spatial=options.patch_spatial,
            patch_temporal=options.patch_temporal, pad_multiple=trainer.pad_multiple, device=trainer.device,
            model_dtype=trainer.model_dtype,
            shard=lambda batch, noise: parallel.shard_for_context_parallel(batch, noise, trainer.env),
            gather=parallel.gather_from_context_parallel,
        )
        if trainer.env.rank != 0:
            return []
        pixels = [self.tokenizer.decode(latent[None].to(trainer.device))[0].float().cpu() for latent in latents]
        out_dir = trainer.checkpoint_dir / "validation_generation" / f"step_{step}"
        settings = {"step": step, "guidance": config.guidance, "num_steps": getattr(self.sampler, "num_steps", None),
                    "sampler": trainer.recipe.sampler.name, "seed": config.seed, "weights": "ema",
                    "height": config.height, "width": config.width, "frames": config.frames}
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for index, (video, prompt) in enumerate(zip(pixels, config.prompts)):
            stem = out_dir / f"{index:03d}"
            path = save_media(to_uint8_frames(video), stem)
            stem.with_suffix(".json").write_text(json.dumps({**settings, "prompt": prompt, "index": index,
                                                              "file": path.name}, indent=2))
            written.append(path)
        trainer.logger.images(step, "validation/generated", [to_uint8_frames(p)[0] for p in pixels])
        return written

    def run(self, step: int) -> dict[str, float]:
        trainer = self.trainer
        trainer.model.eval()
        try:
            with trainer.ema.applied():
                losses = self.validation_loss()
                written = self.generate(step)
        finally:
            trainer.model.train()
        trainer.logger.scalars(step, losses)
        if losses:
            trainer.logger.message(f"step {step}: validation loss {losses['val/loss_mean']:.4f}"
                                   + (f", {len(written)} samples in {written[0].parent}" if written else ""))
        return losses
