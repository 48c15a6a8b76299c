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


class GuidedDenoiser:
    """``denoise(x [L, F], sigma scalar) -> D [L, F]`` for a conditional pack, guided with ``w = guidance``; see
    :func:`guided_denoiser`.

    ``pack`` is what the network sees at every call, made once: the denoiser's own copy of the pack, followed by
    its null-text copy when guiding. Every call hands the network this same object, so whatever the network derives
    from the pack (the DiT's layout) is derived once, and a CUDA graph captured from one call stays valid for the
    next: a call launches work on the device and never waits for it.
    """

    def __init__(self, model_fn: ModelFn, objective: Objective, batch: PackedBatch, guidance: float,
                 model_dtype: torch.dtype | None):
        self.model_fn = model_fn
        self.objective = objective
        self.batch = batch
        self.guidance = guidance
        self.model_dtype = model_dtype or batch.latents.dtype
        self.num_samples = batch.num_samples
        self.real = batch.token_mask().unsqueeze(-1)
        # A context-parallel shard doubles into the doubled pack's shard. Unguided: a copy of the text, so that
        # condition_on() never writes into the caller's batch.
        self.pack = batch.with_unconditional() if self.guided else batch.with_text(batch.text.clone())

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = self.num_samples
        if not self.guided:
            d = self.objective.denoise(self.model_fn, x, per_sample(sigma, x, n), self.pack, self.model_dtype)
            return torch.where(self.real, d, 0)
        sigmas = per_sample(sigma, x, 2 * n)
        d_cond, d_uncond = self.objective.denoise(self.model_fn, torch.cat([x, x]), sigmas, self.pack,
                                                  self.model_dtype).chunk(2)
        return torch.where(self.real, d_uncond + self.guidance * (d_cond - d_uncond), 0)

    def condition_on(self, text: torch.Tensor) -> None:
        """Condition on other text states, of the shape of the pack's (the conditional rows), written in place: a
        CUDA graph captured from this denoiser then samples other prompts of the same sizes."""
        conditional = self.pack.text[: self.batch.text.shape[0]]
        if text.shape != conditional.shape:
            raise ValueError(f"text states of shape {tuple(text.shape)} for a pack of {tuple(conditional.shape)}")
        conditional.copy_(text)
        refresh = getattr(self.model_fn, "refresh_text", None)  # what the network keeps of the text (NetworkFn)
        if refresh is not None:
            refresh(self.pack)


def guided_denoiser(
    model_fn: ModelFn,
    objective: Objective,
    batch: PackedBatch,
    guidance: float = 1.0,
    model_dtype: torch.dtype | None = None,
) -> GuidedDenoiser:
    """``denoise(x [L, F], sigma scalar) -> D [L, F]`` for the conditional ``batch``, guided with ``w = guidance``.

    ``objective.condition_dropout`` is taken as the dropout the model was trained with (a warning when it
    is 0 and ``guidance != 1``). ``model_dtype`` is the dtype the network receives (default: the
    batch latents' dtype); D comes back in ``x``'s dtype. D is zero on padding tokens, so padding
    in the sampler state decays to zero. Give ``batch`` on the device and in the network's dtype: the network
    then gets it as it is at every call (:func:`dfmkit.diffusion.objective.as_model_fn` converts it otherwise).
    """
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    warn_if_unguidable(guidance, objective.condition_dropout)
    return GuidedDenoiser(model_fn, objective, batch, guidance, model_dtype)
