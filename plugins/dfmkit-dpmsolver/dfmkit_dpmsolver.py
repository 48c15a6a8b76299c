"""DPM-Solver++(2M) for dfmkit: a sampler plugin in one file.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, multistep, second order) for any objective whose
noisy sample is ``x = alpha(sigma) x0 + sigma n``, on the objective's grid. With the log signal-to-noise ratio
``lambda = ln(alpha / sigma)`` and step ``h = lambda_next - lambda``:

    x_next = (sigma_next / sigma) x + (alpha_next - alpha sigma_next / sigma) D_hat
    D_hat  = D_i                                            first step (first order)
    D_hat  = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h_i    later steps

EDM (``alpha = 1``) gives ``x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D_hat``. Rectified flow
(``alpha = 1 - t``) starts at t = 1, where ``alpha = 0`` and ``lambda = -inf``: its first step is the exact
first-order (DDIM) step ``x_next = t_next x + (1 - t_next) D``, and the second step, whose ``r`` is infinite,
is first order too; from then on the steps are second order. The last step, to sigma = 0, returns the denoiser
output (as dfmkit's samplers do).
"""

from __future__ import annotations

import attrs
import torch

from dfmkit import hookimpl
from dfmkit.components.samplers import SamplerOptions


@attrs.define(kw_only=True)
class DPMSolverOptions(SamplerOptions):
    """DPM-Solver++(2M): num_steps on the objective's grid (``diffusion.*``)."""


class DPMSolverPlusPlus2M:
    """DPM-Solver++(2M) on the objective's grid (N denoiser evaluations)."""

    def __init__(self, options: DPMSolverOptions, **_context):
        self.options = options

    @property
    def num_evaluations(self) -> int:
        return self.options.num_steps

    def sample(self, denoise, noise: torch.Tensor, objective, generator: torch.Generator | None = None) -> torch.Tensor:
        o = self.options
        sigmas = objective.sampling_sigmas(o.num_steps, noise.device)
        x = noise.to(torch.float64) * sigmas[0]
        d_prev = h_prev = None
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            d = denoise(x, sigma).to(torch.float64)
            if i == o.num_steps - 1:  # sigma_next = 0
                return d
            alpha, alpha_next = objective.alpha(sigma), objective.alpha(sigma_next)
            h = torch.as_tensor((alpha_next * sigma) / (alpha * sigma_next), dtype=torch.float64).log()  # inf at alpha = 0
            d_hat = d if d_prev is None else (1 + h / (2 * h_prev)) * d - h / (2 * h_prev) * d_prev
            x = (sigma_next / sigma) * x + (alpha_next - alpha * sigma_next / sigma) * d_hat
            d_prev, h_prev = d, h
        return x


@hookimpl
def dfmkit_register(registries):
    registries.sampler.register(
        "dpm-solver++", DPMSolverPlusPlus2M, options=DPMSolverOptions,
        summary="DPM-Solver++(2M) on the objective's grid, any alpha (N evaluations)",
    )
