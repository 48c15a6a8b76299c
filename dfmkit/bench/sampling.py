"""Sampling latency: N-step Heun (EDM) with classifier-free guidance for a pack of images, and its TFLOP/s."""

from __future__ import annotations

import statistics
import time
from typing import Any

import attrs
import torch

from dfmkit.bench.flops import DiTShape, forward_flops


@attrs.frozen
class SamplingSetup:
    """A DiT with random weights on this process's device, ready to sample: bf16 on CUDA, float32 elsewhere."""

    job: Any
    device: torch.device
    dtype: torch.dtype
    model_fn: Any  # the network as the objectives call it (dfmkit.diffusion.objective.as_model_fn)
    objective: Any


def sampling_setup(preset: str, in_channels: int, text_dim: int, *, steps: int = 35, attention: str = "torch",
                   compile: bool = False) -> SamplingSetup:
    """The job (identity tokenizer, Heun with ``steps`` steps, EDM), its model in eval mode and its objective."""
    import dfmkit
    from dfmkit import parallel
    from dfmkit.devices import resolve_device
    from dfmkit.diffusion.objective import as_model_fn

    job = dfmkit.build({
        "model": {"name": "dit", "preset": preset, "in_channels": in_channels, "text_dim": text_dim,
                  "attention": attention, "compile": compile},
        "sampler": {"name": "heun", "num_steps": steps},
        "tokenizer": {"name": "identity"}, "text_encoder": {"name": "t5-tiny"}, "task_encoder": {"name": "packed"},
    })
    device = resolve_device("auto")
    parallel.initialize(job.recipe.parallel, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = job.components["model"].build(recipe=job.recipe).to(device, dtype).eval()
    return SamplingSetup(job=job, device=device, dtype=dtype, model_fn=as_model_fn(model, device, dtype),
                         objective=job.components["diffusion"].build(recipe=job.recipe))


def sampling_latency(preset: str = "XL", images: int = 1, latent_shape=(16, 1, 64, 64), steps: int = 35,
                     guidance: float = 8.0, text_tokens: int = 77, text_dim: int = 1024,
                     attention: str = "torch", cuda_graphs: bool = False, compile: bool = False,
                     repeats: int = 1) -> dict[str, Any]:
    """Seconds per image and model TFLOP/s of sampling ``images`` prompts together (random weights).

    ``compile``: the DiT's layers through torch.compile (``model.compile``); ``cuda_graphs`` (CUDA only): every
    evaluation of the guided denoiser replays one CUDA graph, kept between calls (:mod:`dfmkit.generation.graphs`).
    The first call, which compiles, warms up and captures, is timed apart (``first_call_seconds``); ``seconds`` is
    the median of the ``repeats`` calls after it (``timed_seconds``), which reuse the compiled layers and the graph,
    as a server's later requests would.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    from dfmkit.generation.graphs import PackGraphs
    from dfmkit.generation.sampling import sample_latents

    setup = sampling_setup(preset, latent_shape[0], text_dim, steps=steps, attention=attention, compile=compile)
    job, device, dtype, model_fn, objective = setup.job, setup.device, setup.dtype, setup.model_fn, setup.objective
    sampler = job.components["sampler"].build(recipe=job.recipe)
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randn(text_tokens, text_dim, generator=generator) for _ in range(images)]
    options = job.recipe.model.options
    graphs = PackGraphs(max_packs=1)

    def run() -> float:
        start = time.perf_counter()
        sample_latents(model_fn, objective, sampler, texts, [latent_shape] * images, guidance=guidance, seed=0,
                       patch_spatial=options.patch_spatial, patch_temporal=options.patch_temporal, device=device,
                       model_dtype=dtype, cuda_graphs=cuda_graphs, graphs=graphs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first_call = run()  # compilation, warm-up and capture
    timed = [run() for _ in range(repeats)]
    seconds = statistics.median(timed)
    c, t, h, w = latent_shape
    tokens = (t // options.patch_temporal) * (h // options.patch_spatial) * (w // options.patch_spatial)
    evaluations = 2 * steps - 1  # Heun: the last step is an Euler step
    rows = 2 * images if guidance != 1.0 else images
    per_eval = forward_flops(DiTShape.from_options(options), [tokens] * rows,
                             [text_tokens] * images + ([1] * images if guidance != 1.0 else []))
    return {"model": preset, "images": images, "tokens_per_image": tokens, "steps": steps, "guidance": guidance,
            "seconds": seconds, "seconds_per_image": seconds / images,
            "tflops": per_eval * evaluations / seconds / 1e12,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "compile": compile, "cuda_graphs": cuda_graphs and device.type == "cuda", "first_call_seconds": first_call,
            "timed_seconds": timed}
