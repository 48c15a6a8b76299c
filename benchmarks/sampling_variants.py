"""One guided DiT evaluation under variants of how it computes, timed in one process (issue #29's next levers).

A pack of ``--images`` 512 x 512 prompts (1024 latent tokens each, 77 text tokens) and its null-text copy, as the
samplers evaluate it: on CUDA each variant's evaluation is captured as a CUDA graph and replayed (the default
sampling path), elsewhere it runs eagerly. Random weights, bf16 on CUDA (float32 on the CPU). Variants:

- ``baseline``: as dfmkit samples; ``baseline-again`` last, to see the machine's drift over the run;
- ``no-null-text-skip``: the unconditional rows run their cross-attention (which outputs zero) as well;
- ``unfused-gelu``: fc1 and GELU as two kernels (megatron's MLP), not one cuBLASLt call;
- ``recomputed-text-keys``: the cross-attention keys and values of the text computed in every evaluation, not kept;
- ``cublaslt`` (CUDA): ``torch.backends.cuda.preferred_blas_library("cublaslt")`` for every matmul;
- ``adaln-<elements>x<warps>``, ``qkv-<tokens>x<warps>`` (CUDA): other launch shapes of the Triton kernels;
- ``short-key-cross``: the short-key kernels for the cross-attention to 77 text tokens, not cuDNN;
  ``short-key-cross-<query tile>x<warps>``: with other forward launch shapes;
- ``cudnn-no-lse``: cuDNN's attention without the log-sum-exp that only a backward pass needs;
- ``flash-varlen``: flash-attention varlen for every attention, not cuDNN.

A variant that cannot run on this device is reported as such. Prints milliseconds per evaluation and the ratio to
the baseline; ``--out`` writes them as JSON with the device and torch version. On the GPU machine:

    python benchmarks/sampling_variants.py --images 16 --out $OUT/sampling_variants.json
    python benchmarks/sampling_variants.py --tiny --images 2 --replays 2   # tiny model, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

GUIDANCE = 8.0


def _setting(owner: Any, name: str, value: Any) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def apply() -> Iterator[None]:
        old = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, old)

    return apply


def _blas(library: str) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def apply() -> Iterator[None]:
        old = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            yield
        finally:
            torch.backends.cuda.preferred_blas_library(old)

    return apply


def variants() -> dict[str, tuple[Callable[[], contextlib.AbstractContextManager], bool]]:
    """name -> (context that applies the variant, whether it needs CUDA)."""
    from megatron.core.transformer.mlp import MLP

    from dfmkit import kernels
    from dfmkit.components.attention import torch_backend
    from dfmkit.components.backbones.dit.attention import CrossAttention
    from dfmkit.components.backbones.dit.block import DiTMLP
    from dfmkit.kernels import short_keys

    found: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], bool]] = {
        "baseline": (contextlib.nullcontext, False),
        "no-null-text-skip": (contextlib.nullcontext, False),  # applied to the pack (see evaluation_ms)
        "unfused-gelu": (_setting(DiTMLP, "forward", MLP.forward), False),
        "recomputed-text-keys": (_setting(CrossAttention, "text_keys_values", _recomputed_text_keys), False),
        "cublaslt": (_blas("cublaslt"), True),
        "short-key-cross": (_setting(short_keys, "BEATS_CUDNN_UP_TO", 128), True),
        "cudnn-no-lse": (_setting(torch_backend, "_cudnn_attention", _cudnn_without_lse), True),
        "flash-varlen": (_setting(torch_backend, "cudnn_available", lambda q: False), True),
    }
    for elements, warps in ((2048, 2), (8192, 2), (4096, 4), (8192, 8)):
        found[f"adaln-{elements}x{warps}"] = (_both(_setting(kernels.adaln, "FORWARD_ELEMENTS", elements),
                                                    _setting(kernels.adaln, "FORWARD_WARPS", warps)), True)
    for tokens, warps in ((2, 4), (1, 8), (4, 8)):
        found[f"qkv-{tokens}x{warps}"] = (_both(_setting(kernels.qkv, "TOKENS_PER_TILE", tokens),
                                                _setting(kernels.qkv, "FORWARD_WARPS", warps)), True)
    for block_q, warps in ((32, 4), (64, 8), (128, 4), (128, 8)):  # forward launch shapes of the 128-key tile
        launch = {**short_keys.LAUNCH, 128: (block_q, warps, *short_keys.LAUNCH[128][2:])}
        found[f"short-key-cross-{block_q}x{warps}"] = (_both(_setting(short_keys, "BEATS_CUDNN_UP_TO", 128),
                                                             _setting(short_keys, "LAUNCH", launch)), True)
    found["baseline-again"] = (contextlib.nullcontext, False)
    return found


def _recomputed_text_keys(self, context: torch.Tensor, layout: Any) -> tuple[torch.Tensor, torch.Tensor]:
    rows = layout.text_tokens[1] if layout.text_tokens is not None else context.shape[0]
    return self._keys_values(context[:rows])


def _cudnn_without_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]


def _both(first, second) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def apply() -> Iterator[None]:
        with first(), second():
            yield

    return apply


def evaluation_ms(denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, replays: int, cuda: bool) -> float:
    """Milliseconds per evaluation: a CUDA graph's replays on CUDA (timed with events), eager calls elsewhere."""
    from dfmkit.generation.graphs import graphed_denoiser

    with torch.no_grad():
        if cuda:
            denoise = graphed_denoiser(denoise, x, sigma)
        for _ in range(2):
            denoise(x, sigma)
        if not cuda:
            start = time.perf_counter()
            for _ in range(replays):
                denoise(x, sigma)
            return (time.perf_counter() - start) * 1000 / replays
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(replays):
            denoise(x, sigma)
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / replays


def run(images: int, tiny: bool, replays: int, only: list[str] | None) -> dict[str, Any]:
    import dataclasses

    from dfmkit.batch import Sample, pack
    from dfmkit.bench.sampling import sampling_setup
    from dfmkit.diffusion.guidance import guided_denoiser

    preset, latent, text_tokens, text_dim = ("tiny", (16, 1, 8, 8), 8, 64) if tiny else ("XL", (16, 1, 64, 64), 77, 1024)
    setup = sampling_setup(preset, latent[0], text_dim)
    job, device, dtype, model_fn, objective = setup.job, setup.device, setup.dtype, setup.model_fn, setup.objective
    cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    samples = [Sample(torch.zeros(*latent), torch.randn(text_tokens, text_dim, generator=generator), f"s{i}")
               for i in range(images)]
    options = job.recipe.model.options
    batch = pack(samples, options.patch_spatial, options.patch_temporal).to(device, dtype)
    x = torch.randn(batch.latents.shape, generator=generator, dtype=torch.float64).to(device)
    sigma = objective.sampling_sigmas(35, device)[3]

    results: dict[str, Any] = {}
    for name, (apply, needs_cuda) in variants().items():
        if only and name not in only:
            continue
        if needs_cuda and not cuda:
            results[name] = "needs CUDA"
        else:
            with apply():
                denoise = guided_denoiser(model_fn, objective, batch, GUIDANCE, dtype)
                if name == "no-null-text-skip":
                    denoise.pack = dataclasses.replace(denoise.pack, null_text_from=None)
                results[name] = evaluation_ms(denoise, x, sigma, replays, cuda)
        print(f"{name}: {results[name] if isinstance(results[name], str) else f'{results[name]:.3f} ms'}",
              flush=True)
    base = results.get("baseline")
    ratios = {name: ms / base for name, ms in results.items() if isinstance(ms, float) and isinstance(base, float)}
    return {"benchmark": "sampling_variants", "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "preset": preset, "images": images, "replays": replays,
            "cuda_graphs": cuda, "ms_per_evaluation": results, "ratio_to_baseline": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset and 8 x 8 latents (a CPU smoke run)")
    parser.add_argument("--replays", type=int, default=30, help="timed evaluations per variant")
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.replays < 1:
        parser.error("--images and --replays must be at least 1")
    only = [v for v in args.variants.split(",") if v] or None
    results = run(args.images, args.tiny, args.replays, only)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
