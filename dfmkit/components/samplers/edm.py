"""The EDM samplers (Karras et al. 2022): Heun (Algorithm 2, with optional churn) and Euler.

A sampler integrates the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` from
``sigma_max`` down to 0 on the Karras rho-schedule. It only sees ``denoise(x, sigma) -> D`` (already
guided, see :func:`dfmkit.diffusion.guided_denoiser`), so it works on any state shape, packed
sequences of several prompts and sizes included. The state is kept in float64, as in NVlabs/edm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from dfmkit.components.samplers.options import HeunOptions, SamplerOptions

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class Sampler(Protocol):
    """What every sampler component provides."""

    def sample(self, denoise: Denoiser, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 from unit Gaussian ``noise`` (scaled by the sampler's sigma_max) in the state's shape."""
        ...


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """EDM Eq. 5: ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, then 0.

    Returns N + 1 float64 values; for N = 1 it is ``[sigma_max, 0]``.
    """
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + t * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64, device=device)])


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


class EDMEuler:
    """First-order Euler steps on the Karras schedule (N denoiser evaluations)."""

    def __init__(self, options: SamplerOptions):
        self.options = options

    @property
    def num_evaluations(self) -> int:
        return self.options.num_steps

    def sigmas(self, device=None) -> torch.Tensor:
        o = self.options
        return karras_sigmas(o.num_steps, o.sigma_min, o.sigma_max, o.rho, device)

    def sample(self, denoise: Denoiser, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        t_steps = self.sigmas(noise.device)
        x = noise.to(torch.float64) * t_steps[0]
        for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
            d_cur = (x - denoise(x, t_cur).to(torch.float64)) / t_cur
            x = x + (t_next - t_cur) * d_cur
        return x


class EDMHeun(EDMEuler):
    """EDM Algorithm 2: Heun steps (second order, 2N - 1 evaluations), optional stochastic churn.

    The correction evaluates the denoiser at the Euler prediction ``(x_next, t_next)``; the
    reference re-evaluates it at ``(x_hat, t_hat)``, which reduces to Euler at twice the cost.
    """

    options: HeunOptions

    def __init__(self, options: HeunOptions):
        super().__init__(options)

    @property
    def num_evaluations(self) -> int:
        return 2 * self.options.num_steps - 1

    def sample(self, denoise: Denoiser, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        o = self.options
        t_steps = self.sigmas(noise.device)
        x_next = noise.to(torch.float64) * t_steps[0]
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next

            # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
            gamma = min(o.s_churn / o.num_steps, math.sqrt(2) - 1) if o.s_min <= t_cur <= o.s_max else 0.0
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur
            if gamma > 0:
                x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * o.s_noise * _randn_like(x_cur, generator)

            # Euler step.
            d_cur = (x_hat - denoise(x_hat, t_hat).to(torch.float64)) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur

            # Second-order correction at the Euler prediction (x_next, t_next), except at sigma = 0.
            if i < o.num_steps - 1:
                d_prime = (x_next - denoise(x_next, t_next).to(torch.float64)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next


def build_euler(options: SamplerOptions, **_context) -> EDMEuler:
    """EDM Euler sampler (first order) on the Karras rho-schedule."""
    return EDMEuler(options)


def build_heun(options: HeunOptions, **_context) -> EDMHeun:
    """EDM Heun sampler (Algorithm 2, second order, optional churn)."""
    return EDMHeun(options)
