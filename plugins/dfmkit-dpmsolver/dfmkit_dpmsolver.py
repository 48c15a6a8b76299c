"""DPM-Solver++(2M) for dfmkit: a sampler plugin in one file.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, multistep, second order) in the
EDM parametrisation ``x = x0 + sigma n``, with ``lambda = -ln sigma`` and step ``h = ln(sigma / sigma_next)``:

    x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D_hat
    D_hat  = D_i                                            first step (first order)
    D_hat  = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h_i    later steps

The last step, to sigma = 0, returns the denoiser output (as EDM's samplers do).
"""

from __future__ import annotations

import attrs
import torch

from dfmkit import hookimpl
from dfmkit.components.samplers import SamplerOptions
from dfmkit.components.samplers.edm import karras_sigmas


@attrs.define(kw_only=True)
class DPMSolverOptions(SamplerOptions):
    """DPM-Solver++(2M): num_steps, sigma_min, sigma_max, rho as for the EDM samplers."""


class DPMSolverPlusPlus2M:
    """DPM-Solver++(2M) on the Karras rho-schedule (N denoiser evaluations)."""

    def __init__(self, options: DPMSolverOptions, **_context):
        self.options = options

    @property
    def num_evaluations(self) -> int:
        return self.options.num_steps

    def sample(self, denoise, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        o = self.options
        sigmas = karras_sigmas(o.num_steps, o.sigma_min, o.sigma_max, o.rho, noise.device)
        x = noise.to(torch.float64) * sigmas[0]
        d_prev = h_prev = None
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            d = denoise(x, sigma).to(torch.float64)
            if i == o.num_steps - 1:  # sigma_next = 0
                return d
            h = (sigma / sigma_next).log()
            d_hat = d if d_prev is None else (1 + h / (2 * h_prev)) * d - h / (2 * h_prev) * d_prev
            x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * d_hat
            d_prev, h_prev = d, h
        return x


@hookimpl
def dfmkit_register(registries):
    registries.sampler.register(
        "dpm-solver++", DPMSolverPlusPlus2M, options=DPMSolverOptions,
        summary="DPM-Solver++(2M) on the EDM sigma schedule (N evaluations)",
    )
