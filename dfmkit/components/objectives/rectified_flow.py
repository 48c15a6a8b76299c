"""Rectified flow (Liu et al. 2022, arXiv 2209.03003; as trained by SD3, Esser et al. 2024, arXiv 2403.03206).

A straight path from data to noise, ``t`` in [0, 1]:

    x_t = (1 - t) x0 + t eps                    (the common form with sigma = t, alpha(t) = 1 - t)

The network predicts the velocity ``v_theta(x_t, t) ~ v = dx_t/dt = eps - x0`` from ``x_t`` itself and
``c_noise = time_scale t``, and is trained on ``|v_theta - v|^2`` (weight 1, normalised per sample as every
objective). Its prediction of x0 is ``D(x_t; t) = x_t - t v_theta``, so the probability-flow ODE that the
samplers integrate, ``dx/dt = (x - D) / t``, is ``v_theta`` itself.

Training times (SD3 Sec. 3.1): ``logit(t) ~ N(p_mean, p_std^2)``, then shifted towards noise,
``t' = s t / (1 + (s - 1) t)``, with ``s`` fixed (``shift``) or growing with the sample's token count
(``shift_by_tokens``: ``s = exp(mu)``, ``mu`` linear from ``log_shift[0]`` at ``shift_tokens[0]`` tokens to
``log_shift[1]`` at ``shift_tokens[1]``, as Flux and Wan do for larger images). Each sample of a pack draws its own
``t`` (and its shift reads its own token count). Sampling runs a uniform grid from 1 to 0 shifted by
``sample_shift``, or with ``sample_shift_by_tokens`` by each size's shift of ``shift_by_tokens`` (Flux's sampling:
a call's sizes are sampled in packs of their own, :meth:`RectifiedFlow.for_tokens`).
"""

from __future__ import annotations

import math

import attrs
import torch

from dfmkit.batch import PackedBatch
from dfmkit.components.objectives.options import RectifiedFlowOptions
from dfmkit.diffusion.objective import ModelFn, Objective, Prediction, check_output, sample_levels


def shift_times(t: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: more time near t = 1 (noise) for s > 1; the ends stay where they are."""
    return shift * t / (1 + (shift - 1) * t)


class RectifiedFlow(Objective):
    """Rectified flow with the velocity as the target; ``RectifiedFlow()`` has SD3's defaults."""

    options: RectifiedFlowOptions

    def __init__(self, options: RectifiedFlowOptions | None = None, **fields):
        super().__init__(options if options is not None else RectifiedFlowOptions(**fields))

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 - sigma

    @property
    def max_sigma(self) -> float:
        return 1.0

    def velocity_of(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, batch: PackedBatch,
                    model_dtype: torch.dtype | None) -> torch.Tensor:
        """v_theta(x_t, t) in ``x``'s dtype, ``t`` [N] one time per sample."""
        c_noise = (self.options.time_scale * t).float()
        v = model_fn(x if model_dtype is None else x.to(model_dtype), c_noise, batch)
        return check_output(v, x).to(x.dtype)

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, batch: PackedBatch,
                model_dtype: torch.dtype | None = None) -> torch.Tensor:
        """D(x_t; t) = x_t - t v_theta(x_t, t)."""
        t = sample_levels(sigma, x, batch)
        return x - t[batch.token_sample_ids()].unsqueeze(-1) * self.velocity_of(model_fn, x, t, batch, model_dtype)

    def sample_sigma(self, tokens: torch.Tensor, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """t = shift(sigmoid(u)), u ~ N(p_mean, p_std^2), one per sample, float32."""
        o, device = self.options, generator.device if generator is not None else device
        t = torch.sigmoid(torch.randn(len(tokens), generator=generator, device=device) * o.p_std + o.p_mean)
        if not o.shift_by_tokens:
            return shift_times(t, o.shift) if o.shift != 1.0 else t
        return shift_times(t, self.shift_of(tokens.to(device=device, dtype=torch.float32)))

    def shift_of(self, tokens: torch.Tensor | float) -> torch.Tensor | float:
        """The shift of samples of ``tokens`` tokens: ``exp(mu)``, ``mu`` linear from ``log_shift[0]`` at
        ``shift_tokens[0]`` tokens to ``log_shift[1]`` at ``shift_tokens[1]`` (extended past them)."""
        (n0, n1), (mu0, mu1) = self.options.shift_tokens, self.options.log_shift
        mu = mu0 + (mu1 - mu0) * (tokens - n0) / (n1 - n0)
        return mu.exp() if isinstance(mu, torch.Tensor) else math.exp(mu)

    def prediction(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor,
                   noise: torch.Tensor, batch: PackedBatch, model_dtype: torch.dtype | None) -> Prediction:
        """v_theta(x_t, t) against v = eps - x0, weight 1."""
        v = self.velocity_of(model_fn, x, sigma, batch, model_dtype)
        return Prediction(v, noise - x0, torch.ones_like(sigma))

    def sampling_sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        """``1 - i / N`` for i = 0..N, shifted by ``sample_shift``: N + 1 float64 times from 1 to 0. With
        ``sample_shift_by_tokens``, the grid of :meth:`for_tokens`' objective of each size."""
        if self.options.sample_shift_by_tokens:
            raise ValueError("sample_shift_by_tokens: the grid depends on the samples' size; sample with "
                             "for_tokens(tokens)'s objective")
        t = 1 - torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
        return shift_times(t, self.options.sample_shift)

    @property
    def grid_by_tokens(self) -> bool:
        return self.options.sample_shift_by_tokens

    def for_tokens(self, tokens: int) -> RectifiedFlow:
        """With ``sample_shift_by_tokens``: this objective with ``sample_shift`` the shift of ``tokens`` tokens."""
        if not self.options.sample_shift_by_tokens:
            return self
        return RectifiedFlow(attrs.evolve(self.options, sample_shift=float(self.shift_of(float(tokens))),
                                          sample_shift_by_tokens=False))


def build(options: RectifiedFlowOptions, **_context) -> RectifiedFlow:
    """Rectified flow (SD3): velocity target, logit-normal times with an optional shift, a uniform grid 1 -> 0."""
    return RectifiedFlow(options)
