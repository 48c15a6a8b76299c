"""Sampling latency: N-step Heun (EDM) with classifier-free guidance for a pack of images, and its TFLOP/s."""

from __future__ import annotations

import time
from typing import Any

import torch

from dfmkit.bench.flops import DiTShape, forward_flops


def sampling_latency(preset: str = "XL", images: int = 1, latent_shape=(16, 1, 64, 64), steps: int = 35,
                     guidance: float = 8.0, text_tokens: int = 77, text_dim: int = 1024,
                     attention: str = "torch") -> dict[str, Any]:
    """Seconds per image and model TFLOP/s of sampling ``images`` prompts together (random weights)."""
    import dfmkit
    from dfmkit import parallel
    from dfmkit.devices import resolve_device
    from dfmkit.generation.sampling import sample_latents

    job = dfmkit.build({
        "model": {"name": "dit", "preset": preset, "in_channels": latent_shape[0], "text_dim": text_dim,
                  "attention": attention},
        "sampler": {"name": "heun", "num_steps": steps},
        "tokenizer": {"name": "identity"}, "text_encoder": {"name": "t5-tiny"}, "task_encoder": {"name": "packed"},
    })
    device = resolve_device("auto")
    parallel.initialize(job.recipe.parallel, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = job.components["model"].build(recipe=job.recipe).to(device, dtype).eval()
    sampler = job.components["sampler"].build(recipe=job.recipe)
    objective = job.components["diffusion"].build(recipe=job.recipe)
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randn(text_tokens, text_dim, generator=generator) for _ in range(images)]
    options = job.recipe.model.options

    def run() -> None:
        sample_latents(lambda x, c, b: model(x, c, b.to(device, dtype)), objective, sampler, texts, [latent_shape] * images,
                       guidance=guidance, seed=0, patch_spatial=options.patch_spatial,
                       patch_temporal=options.patch_temporal, device=device, model_dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    c, t, h, w = latent_shape
    tokens = (t // options.patch_temporal) * (h // options.patch_spatial) * (w // options.patch_spatial)
    evaluations = 2 * steps - 1  # Heun: the last step is an Euler step
    rows = 2 * images if guidance != 1.0 else images
    per_eval = forward_flops(DiTShape.from_options(options), [tokens] * rows,
                             [text_tokens] * images + ([1] * images if guidance != 1.0 else []))
    return {"model": preset, "images": images, "tokens_per_image": tokens, "steps": steps, "guidance": guidance,
            "seconds": seconds, "seconds_per_image": seconds / images,
            "tflops": per_eval * evaluations / seconds / 1e12,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
