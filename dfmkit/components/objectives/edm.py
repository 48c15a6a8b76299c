"""EDM (Karras et al. 2022, arXiv 2206.00364): preconditioning, training noise levels, loss weight, sampling grid.

Notation as in the paper (Table 1): data ``x0``, noise level ``sigma``, noisy input ``x = x0 + sigma n``
(``alpha = 1``), raw network ``F_theta`` and denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4

Training draws ``ln(sigma) ~ N(P_mean, P_std^2)`` and minimises ``lambda(sigma) |D(x; sigma) - x0|^2``
with ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``. Sampling integrates
``dx/dsigma = (x - D) / sigma`` on the rho-schedule (Eq. 5) from sigma_max to sigma_min, then 0.
"""

from __future__ import annotations

import torch

from dfmkit.batch import PackedBatch
from dfmkit.components.objectives.options import EDMOptions
from dfmkit.diffusion.objective import ModelFn, Objective, Prediction, check_output, sample_levels


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """EDM Eq. 5: ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, then 0.

    Returns N + 1 float64 values; for N = 1 it is ``[sigma_max, 0]``.
    """
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + t * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64, device=device)])


class EDM(Objective):
    """EDM's preconditioning, noise levels and loss; ``EDM()`` has the paper's defaults, ``EDM(p_mean=0)`` others."""

    options: EDMOptions

    def __init__(self, options: EDMOptions | None = None, **fields):
        super().__init__(options if options is not None else EDMOptions(**fields))

    @property
    def sigma_data(self) -> float:
        return self.options.sigma_data

    # -- preconditioning (EDM Table 1) --------------------------------------------------------

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def alpha(self, sigma: torch.Tensor) -> float:
        return 1.0

    def corrupt(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x0 + sigma * noise

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, batch: PackedBatch,
                model_dtype: torch.dtype | None = None) -> torch.Tensor:
        """D(x; sigma): the network sees ``c_in x`` cast to ``model_dtype`` and ``c_noise [N]`` in float32; its output
        is cast back to ``x``'s dtype before the skip connection."""
        sigma = sample_levels(sigma, x, batch)
        s = sigma[batch.token_sample_ids()].unsqueeze(-1)  # [L, 1]
        x_in = self.c_in(s) * x
        f = model_fn(x_in if model_dtype is None else x_in.to(model_dtype), self.c_noise(sigma).float(), batch)
        return self.c_skip(s) * x + self.c_out(s) * check_output(f, x).to(x.dtype)

    # -- training and sampling ----------------------------------------------------------------

    def sample_sigma(self, tokens: torch.Tensor, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """ln(sigma) ~ N(P_mean, P_std^2), one per sample, float32."""
        o, device = self.options, generator.device if generator is not None else device
        return (torch.randn(len(tokens), generator=generator, device=device) * o.p_std + o.p_mean).exp()

    def prediction(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor,
                   noise: torch.Tensor, batch: PackedBatch, model_dtype: torch.dtype | None) -> Prediction:
        """D(x; sigma) against x0, weighted by lambda(sigma)."""
        return Prediction(self.denoise(model_fn, x, sigma, batch, model_dtype), x0, self.loss_weight(sigma))

    def sampling_sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        o = self.options
        return karras_sigmas(num_steps, o.sigma_min, o.sigma_max, o.rho, device)


def build(options: EDMOptions, **_context) -> EDM:
    """EDM (Karras et al. 2022): preconditioned denoiser, log-normal noise levels, the rho-schedule."""
    return EDM(options)
