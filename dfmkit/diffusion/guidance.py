"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser for the samplers.

    D(x; sigma) = D_uncond + w (D_cond - D_uncond)

``w = 1`` is the plain conditional denoiser, ``w = 0`` the unconditional one. The reference
(NeMo DFM) writes ``D_cond + g (D_cond - D_uncond)``, which is the same with ``w = 1 + g``: its
default ``g = 7`` is ``w = 8`` here (:func:`from_reference_scale`).

The conditional and unconditional rows run in ONE forward: the pack followed by its null-text copy
(:func:`dfmkit.batch.with_unconditional`), so several prompts of different sizes are guided together.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from dfmkit.batch import PackedBatch
from dfmkit.diffusion.objective import ModelFn, Objective

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample(sigma: torch.Tensor | float, x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(1).expand(n)


def from_reference_scale(g: float) -> float:
    """Our ``w`` for the reference's guidance scale ``g`` (``cond + g (cond - uncond)``): ``w = 1 + g``."""
    return 1.0 + g


def warn_if_unguidable(guidance: float, condition_dropout: float) -> None:
    """Warn when guiding (``w != 1``) a model that never saw the null condition in training."""
    if guidance != 1.0 and condition_dropout == 0.0:
        warnings.warn(
            f"classifier-free guidance w={guidance:g} with a model trained with diffusion.condition_dropout = 0: "
            "it never learned the unconditional denoiser, so guidance extrapolates from an untrained output. "
            "Use guidance = 1 (no guidance) or train with condition_dropout > 0 (the usual value is 0.2).",
            UserWarning,
            stacklevel=3,
        )


def guided_denoiser(
    model_fn: ModelFn,
    objective: Objective,
    batch: PackedBatch,
    guidance: float = 1.0,
    model_dtype: torch.dtype | None = None,
) -> Denoiser:
    """``denoise(x [L, F], sigma scalar) -> D [L, F]`` for the conditional ``batch``, guided with ``w = guidance``.

    ``objective.condition_dropout`` is taken as the dropout the model was trained with (a warning when it
    is 0 and ``guidance != 1``). ``model_dtype`` is the dtype the network receives (default: the
    batch latents' dtype); D comes back in ``x``'s dtype. D is zero on padding tokens, so padding
    in the sampler state decays to zero.
    """
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    warn_if_unguidable(guidance, objective.condition_dropout)
    model_dtype = model_dtype or batch.latents.dtype
    n = batch.num_samples
    real = batch.token_mask().unsqueeze(-1)

    if guidance == 1.0:

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            d = objective.denoise(model_fn, x, per_sample(sigma, x, n), batch, model_dtype)
            return torch.where(real, d, 0)

        return denoise

    doubled = batch.with_unconditional()  # a context-parallel shard doubles into the doubled pack's shard

    def denoise_guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigmas = per_sample(sigma, x, 2 * n)
        d_cond, d_uncond = objective.denoise(model_fn, torch.cat([x, x]), sigmas, doubled, model_dtype).chunk(2)
        return torch.where(real, d_uncond + guidance * (d_cond - d_uncond), 0)

    return denoise_guided
