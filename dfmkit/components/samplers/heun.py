"""The built-in samplers: Heun (EDM Algorithm 2, second order, with optional churn) and Euler, for any objective.

A sampler integrates the objective's probability-flow ODE ``dx/dsigma = objective.velocity(x, sigma, D)`` on the
objective's grid ``objective.sampling_sigmas(N)`` (EDM: the rho-schedule from sigma_max down to 0; rectified flow:
1 down to 0), starting from ``x = sigma_0 noise``. It only sees ``denoise(x, sigma) -> D`` (already guided, see
:func:`dfmkit.diffusion.guided_denoiser`), so it works on any state shape, packed sequences of several prompts and
sizes included. The state is kept in float64, as in NVlabs/edm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from dfmkit.components.samplers.options import HeunOptions, SamplerOptions
from dfmkit.diffusion.objective import Objective

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class Sampler(Protocol):
    """What every sampler component provides."""

    def sample(self, denoise: Denoiser, noise: torch.Tensor, objective: Objective,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 from unit Gaussian ``noise`` (scaled by the grid's first noise level) in the state's shape."""
        ...


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


class Euler:
    """First-order Euler steps on the objective's grid (N denoiser evaluations)."""

    def __init__(self, options: SamplerOptions):
        self.options = options

    @property
    def num_evaluations(self) -> int:
        return self.options.num_steps

    def sample(self, denoise: Denoiser, noise: torch.Tensor, objective: Objective,
               generator: torch.Generator | None = None) -> torch.Tensor:
        t_steps = objective.sampling_sigmas(self.options.num_steps, noise.device)
        x = noise.to(torch.float64) * t_steps[0]
        for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
            d_cur = objective.velocity(x, t_cur, denoise(x, t_cur).to(torch.float64))
            x = x + (t_next - t_cur) * d_cur
        return x


class Heun(Euler):
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

    def sample(self, denoise: Denoiser, noise: torch.Tensor, objective: Objective,
               generator: torch.Generator | None = None) -> torch.Tensor:
        o = self.options
        t_steps = objective.sampling_sigmas(o.num_steps, noise.device)
        x_next = noise.to(torch.float64) * t_steps[0]
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next

            # Churn (stochastic sampling only): raise the noise level from t_cur to t_hat with fresh noise.
            x_hat, t_hat = x_cur, t_cur
            if o.s_churn > 0:
                x_hat, t_hat = self.churn(x_cur, t_cur, objective, generator)

            # Euler step.
            d_cur = objective.velocity(x_hat, t_hat, denoise(x_hat, t_hat).to(torch.float64))
            x_next = x_hat + (t_next - t_hat) * d_cur

            # Second-order correction at the Euler prediction (x_next, t_next), except at sigma = 0.
            if i < o.num_steps - 1:
                d_prime = objective.velocity(x_next, t_next, denoise(x_next, t_next).to(torch.float64))
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next

    def churn(self, x: torch.Tensor, t: torch.Tensor, objective: Objective,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, t_hat)``: the noise level raised from ``t`` to ``t_hat = (1 + gamma) t`` (at most the objective's
        largest) with fresh noise, where ``s_min <= t <= s_max``.

        Only called with ``s_churn > 0``: its decisions compare the level on the device with numbers on the host, a
        host synchronisation per step (and the noise is drawn on the generator's device and copied over). Stochastic
        sampling accepts that; the deterministic default (``s_churn = 0``) never gets here, so its loop launches
        work without waiting for the device.
        """
        o = self.options
        gamma = min(o.s_churn / o.num_steps, math.sqrt(2) - 1) if o.s_min <= t <= o.s_max else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            t_hat = t_hat.clamp(max=objective.max_sigma)
        if t_hat > t:  # not at the largest level already
            return objective.renoise(x, t, t_hat, o.s_noise * _randn_like(x, generator)), t_hat
        return x, t_hat


def build_euler(options: SamplerOptions, **_context) -> Euler:
    """Euler (first order) on the objective's grid."""
    return Euler(options)


def build_heun(options: HeunOptions, **_context) -> Heun:
    """Heun (EDM Algorithm 2, second order, optional churn) on the objective's grid."""
    return Heun(options)
