"""The Generator: a trained model loaded for sampling (:func:`load`), which turns prompts into images and videos.

One call generates any number of prompts, each with its own size (``frames x height x width`` pixels;
``frames`` counts video frames, not latent frames), as ONE packed sequence (or several of at most
``max_tokens`` latent tokens each): the text encoder encodes the prompts, the sampler integrates all of
them together with classifier-free guidance in one batched forward, and the tokenizer decodes each latent.
Output ``i`` starts from noise seeded with ``seed + i`` (whatever else shares its pack), so ``--seed
<seed + i>`` alone regenerates it. Every rank samples; rank 0 decodes and writes.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from dfmkit import parallel
from dfmkit.diffusion.objective import as_model_fn
from dfmkit.errors import GenerateError
from dfmkit.generation.graphs import PackGraphs, whole_denoiser_graphs
from dfmkit.generation.loading import generation_parallel, load_model
from dfmkit.generation.memory import check_memory
from dfmkit.generation.outputs import (
    NonFiniteOutputError,
    check_out_dir,
    decode,
    jsonable,
    non_finite,
    non_finite_cause,
    non_finite_message,
    sample_settings,
    sampler_settings,
    write_output,
)
from dfmkit.generation.prompts import Request, encode_prompts, make_requests
from dfmkit.generation.sampling import SamplingModel, build_sampler
from dfmkit.generation.sizes import latent_shape_for
from dfmkit.latent_sizes import patch_sizes
from dfmkit.job import Job
from dfmkit.parallel import ParallelLayout
from dfmkit.recipe import ParallelConfig, Recipe
from dfmkit.version import __version__


@attrs.frozen
class Output:
    """One generated sample. ``pixels`` ``[3, T, H, W]`` in [-1, 1] and ``path`` are set on rank 0 only."""

    index: int
    prompt: str
    seed: int
    height: int
    width: int
    frames: int
    latent: torch.Tensor  # [C, T', H', W'] float32, CPU
    pixels: torch.Tensor | None
    path: Path | None
    settings: dict[str, Any]


class Generator:
    """A model loaded for sampling, with its recipe; :meth:`generate` makes images and videos.

    Build one with :func:`load`. The text encoder and tokenizer are built on first use and kept
    (``keep_text_encoder=False`` drops the text encoder after each encoding, to save memory).

    On a GPU each pack's sampler evaluations replay one CUDA graph (``cuda_graphs``, on by default), and the
    Generator keeps the graphs of its last two pack shapes, so that calls with prompts of the same sizes only
    replay; each holds about one forward's activations of GPU memory (:mod:`dfmkit.generation.graphs`).
    :meth:`release_graphs` frees them. The graphs read the model's weights where they are: change weights in
    place (``load_state_dict``), or make a new Generator for a new model.
    """

    def __init__(self, job: Job, model: torch.nn.Module, *, source: dict[str, Any], weights: str,
                 device: torch.device, model_dtype: torch.dtype, env: ParallelLayout, overrides: Sequence[str] = (),
                 keep_text_encoder: bool = True):
        self.job = job
        self.recipe: Recipe = job.recipe
        self.model = model
        self.source = source
        self.weights = weights
        self.device = device
        self.model_dtype = model_dtype
        self.env = env
        self.overrides = list(overrides)
        self.keep_text_encoder = keep_text_encoder
        self.objective = job.components["diffusion"].build(recipe=self.recipe)
        self._text_encoder = None
        self._tokenizer = None
        self._sampling: SamplingModel | None = None

    def __repr__(self) -> str:
        return (f"Generator({self.recipe.model.name}, {self.source['kind']} {self.source['path']}, "
                f"weights={self.weights}, device={self.device}, dtype={self.model_dtype})")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.job.components["tokenizer"].build(recipe=self.recipe)
        return self._tokenizer

    def encode_prompts(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        encoder = self._text_encoder or self.job.components["text_encoder"].build(recipe=self.recipe)
        states = encode_prompts(encoder, prompts, self.recipe)
        self._text_encoder = encoder if self.keep_text_encoder else None
        return states

    def _sampling_model(self) -> SamplingModel:
        """The model as sampling sees it, made once (with the CUDA graphs it keeps between calls)."""
        if self._sampling is None:
            p, pt = patch_sizes(self.recipe.model.options)
            pad = parallel.required_pad_multiple(ParallelConfig(tensor=self.env.tp_size, context=self.env.cp_size))
            model_fn = as_model_fn(self.model, self.device, self.model_dtype)
            self._sampling = SamplingModel(model_fn, self.objective, self.env, self.device, self.model_dtype, p, pt,
                                           pad, graphs=PackGraphs(max_packs=2))
        return self._sampling

    def release_graphs(self) -> bool:
        """Free the GPU memory of the CUDA graphs kept for later calls (the next call captures again); whether
        there were any."""
        if self._sampling is None or not self._sampling.graphs:
            return False
        self._sampling.graphs.clear()
        return True

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str | Mapping[str, Any]],
        *,
        height: int | Sequence[int] | None = None,
        width: int | Sequence[int] | None = None,
        frames: int | Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        out: str | os.PathLike[str] | None = None,
        fps: float = 24.0,
        max_tokens: int = 0,
        cuda_graphs: bool = True,
    ) -> list[Output]:
        """Generate ``prompts`` (strings, or mappings with "prompt" and optional "height"/"width"/"frames").

        Sizes are pixels, ``frames`` video frames (one value for all prompts or one per prompt; default:
        the recipe's ``[validation]`` sizes). ``steps``/``sampler`` override the recipe's ``[sampler]``,
        ``guidance`` (w, 1 = none) and ``seed`` its ``[validation]`` values. ``max_tokens`` > 0 splits the
        prompts into several packs of at most that many latent tokens (0: one pack). With ``out`` each
        output is written as ``NNN.png``/``NNN.mp4`` + ``NNN.json`` (rank 0). ``cuda_graphs``: on a GPU, each pack's
        evaluations replay one CUDA graph (the same numbers, far less host time; see the class docstring); False
        runs them eagerly.

        Refused with a :class:`GenerateError` before anything is sampled: an ``out`` that cannot be a folder, a
        request that cannot fit in memory (:mod:`dfmkit.generation.memory`). After sampling, outputs that hold
        NaN or inf are a :class:`~dfmkit.generation.outputs.NonFiniteOutputError` naming them and the likely
        cause, and no file of the request is written.
        """
        validation = self.recipe.validation
        requests = make_requests(prompts, height=height, width=width, frames=frames,
                                 defaults=(validation.frames, validation.height, validation.width))
        guidance = float(validation.guidance if guidance is None else guidance)
        if not math.isfinite(guidance):
            raise GenerateError(f"guidance must be a finite number, got {guidance!r}")
        seed = int(validation.seed if seed is None else seed)
        if max_tokens < 0:
            raise GenerateError(f"max_tokens must be >= 0, got {max_tokens}")
        out_dir = Path(out) if out is not None else None
        if out_dir is not None:
            check_out_dir(out_dir)
        sampler_name, sampler_obj, sampler_options = build_sampler(self.job, sampler, steps)
        sampling = self._sampling_model()
        shapes = [latent_shape_for(self.tokenizer, sampling.patch_spatial, sampling.patch_temporal, r.frames,
                                   r.height, r.width, self.recipe.tokenizer.name) for r in requests]
        need = sampling.memory_need(requests, shapes, max_tokens, guided=guidance != 1.0, model=self.model)
        try:
            check_memory(need, self.device)
        except GenerateError:
            if not self.release_graphs():
                raise
            check_memory(need, self.device)  # the graphs kept from earlier calls held memory this request may use
        prompts = [r.prompt for r in requests]
        texts = self.encode_prompts(prompts)
        self.model.eval()
        latents = sampling.sample(sampler_obj, texts, shapes, guidance=guidance, seed=seed, max_tokens=max_tokens,
                                  cuda_graphs=whole_denoiser_graphs(cuda_graphs, self.recipe.model.options))
        if bad := non_finite(latents):  # every rank holds the latents, so every rank stops here
            cause = non_finite_cause(guidance, self._non_finite_weights())
            raise NonFiniteOutputError(f"{non_finite_message(bad, prompts)}, so no file is written; likely cause: "
                                       f"{cause}", bad)
        rank0 = self.env.rank == 0
        decoded = [decode(self.tokenizer, latent) if rank0 else None for latent in latents]
        if rank0 and (bad := non_finite(decoded)):
            raise NonFiniteOutputError(f"{non_finite_message(bad, prompts)} after decoding, so no file is written: "
                                       f"the '{self.recipe.tokenizer.name}' tokenizer decoded finite latents to NaN "
                                       "or inf", bad)

        common = {
            "source": {k: str(v) if isinstance(v, Path) else v for k, v in self.source.items()},
            "weights": self.weights,
            "model": self.recipe.model.name,
            "tokenizer": self.recipe.tokenizer.name,
            "text_encoder": self.recipe.text_encoder.name,
            **sampler_settings(sampler_name, sampler_options, self.recipe.diffusion),
            "guidance": guidance,
            "base_seed": seed,
            "device": self.device.type,
            "dtype": str(self.model_dtype).removeprefix("torch."),
            "parallel": {"tensor": self.env.tp_size, "context": self.env.cp_size},
            "overrides": self.overrides,
            "dfmkit_version": __version__,
        }
        outputs = []
        for index, (request, shape, latent, pixels) in enumerate(zip(requests, shapes, latents, decoded)):
            sample_seed = seed + index
            settings = jsonable({
                **common, **sample_settings(index, request, sample_seed, shape, fps),
                "command": self._command(request, sampler_name, sampler_options, guidance, sample_seed, fps),
            })
            path = None
            if rank0 and out_dir is not None:
                path = write_output(out_dir, index, pixels, settings, fps)
            outputs.append(Output(index=index, prompt=request.prompt, seed=sample_seed, height=request.height,
                                  width=request.width, frames=request.frames, latent=latent, pixels=pixels, path=path,
                                  settings=settings))
        parallel.barrier()
        return outputs

    def _non_finite_weights(self) -> list[str]:
        """Names of the model's weights (this rank's shards) that hold NaN or inf."""
        return [name for name, tensor in self.model.state_dict().items()
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]

    def _command(self, request: Request, sampler: str, options: Any, guidance: float, seed: int, fps: float) -> str:
        """The ``dfmkit generate`` line that regenerates this output alone (exact when the sampler adds no
        churn noise; the pixels may differ in the last bits, as the pack differs)."""
        parts = ["dfmkit", "generate", "--checkpoint", str(self.source["path"]), "--prompt", request.prompt,
                 "--height", str(request.height), "--width", str(request.width), "--frames", str(request.frames),
                 "--sampler", sampler, "--guidance", f"{guidance:g}", "--seed", str(seed), "--weights", self.weights,
                 "--fps", f"{fps:g}"]
        if hasattr(options, "num_steps"):
            parts += ["--steps", str(options.num_steps)]
        parts += ["--out", "OUT"]
        for override in self.overrides:
            parts += ["--set", override]
        return shlex.join(parts)


def load(
    path: str | os.PathLike[str],
    *,
    weights: str = "ema",
    overrides: Sequence[str] = (),
    recipe: Recipe | None = None,
    plugins: Any = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tensor: int = 1,
    context: int | None = None,
    keep_text_encoder: bool = True,
) -> Generator:
    """A :class:`Generator` for a checkpoint or an export at ``path``.

    ``recipe`` (default: the one stored with the weights) and ``overrides`` (dotted ``key=value``, e.g.
    ``text_encoder.path=/models/t5``) give the components; ``weights`` is "ema" (default) or "model" (the
    raw trained weights); ``precision`` "auto" follows the recipe's ``train.precision`` (auto: bf16 on GPU,
    fp32 on CPU). ``tensor``/``context`` set the parallel layout (default: context parallelism over all
    processes, which splits every sample's tokens over the GPUs under torchrun).
    """
    loaded = load_model(path, layout=generation_parallel(tensor, context), weights=weights, recipe=recipe,
                        overrides=overrides, plugins=plugins, device=device, precision=precision)
    return Generator(loaded.job, loaded.model, source=loaded.source, weights=weights, device=loaded.device,
                     model_dtype=loaded.dtype, env=loaded.env, overrides=overrides,
                     keep_text_encoder=keep_text_encoder)


def generate(
    path: str | os.PathLike[str], prompts: str | Sequence[str | Mapping[str, Any]], **options: Any
) -> list[Output]:
    """:func:`load` the checkpoint or export at ``path`` and :meth:`Generator.generate` ``prompts``.

    ``options`` are split between the two (load: weights, overrides, recipe, plugins, device, precision,
    tensor, context, keep_text_encoder; the rest go to :meth:`Generator.generate`).
    """
    load_keys = {"weights", "overrides", "recipe", "plugins", "device", "precision", "tensor", "context",
                 "keep_text_encoder"}
    generator = load(path, **{k: v for k, v in options.items() if k in load_keys})
    return generator.generate(prompts, **{k: v for k, v in options.items() if k not in load_keys})


def generate_for_job(job: Job, prompts: str | Sequence[str | Mapping[str, Any]], *,
                     checkpoint: str | os.PathLike[str] | None = None, **options: Any) -> list[Output]:
    """Images/videos for ``prompts`` from the trained weights of ``job`` (a :func:`dfmkit.build` result): its
    recipe and plugins, the weights of ``checkpoint`` (a checkpoint or an export; default: the recipe's
    ``checkpoint.load``, else its ``checkpoint.dir``). ``options`` as :func:`generate`."""
    source = checkpoint or job.recipe.checkpoint.load or job.recipe.checkpoint.dir
    return generate(source, prompts, recipe=job.recipe, plugins=job.plugins, **options)
