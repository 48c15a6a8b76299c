"""Data with a closed-form denoiser, for testing samplers and losses without a trained network.

Every element of the data is drawn independently from a 1-D mixture of Gaussians
``sum_k w_k N(mu_k, s_k^2)`` (one component: a Gaussian). For ``x = a x0 + sigma n`` (``a = alpha(sigma)`` of the
objective: 1 for EDM, ``1 - sigma`` for rectified flow) the exact denoiser ``D(x; sigma) = E[x0 | x]`` is

    D(x; sigma) = sum_k r_k(x) (mu_k + a s_k^2 / (a^2 s_k^2 + sigma^2) (x - a mu_k)),
    r_k(x) proportional to w_k N(x; a mu_k, a^2 s_k^2 + sigma^2),

and for one Gaussian the probability-flow ODE keeps ``(x - a mu) / sqrt(a^2 s^2 + sigma^2)`` constant. Plugin
authors can check a sampler's order under any objective with :func:`convergence_order`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import numpy as np
import torch

from dfmkit.diffusion.objective import Objective


@attrs.frozen
class GaussianMixture:
    """Elementwise data ``sum_k w_k N(mu_k, s_k^2)``; weights default to equal."""

    means: tuple[float, ...] = attrs.field(converter=tuple)
    stds: tuple[float, ...] = attrs.field(converter=tuple)
    weights: tuple[float, ...] = attrs.field(converter=tuple, default=())

    def __attrs_post_init__(self) -> None:
        if not self.weights:
            object.__setattr__(self, "weights", (1.0 / len(self.means),) * len(self.means))
        if not (len(self.means) == len(self.stds) == len(self.weights)) or not self.means:
            raise ValueError("means, stds and weights must be non-empty and of one length")
        if min(self.stds) <= 0 or min(self.weights) <= 0 or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError("stds must be > 0 and weights > 0 summing to 1")

    @classmethod
    def gaussian(cls, mean: float, std: float) -> GaussianMixture:
        return cls(means=(mean,), stds=(std,))

    @property
    def mean(self) -> float:
        return sum(w * m for w, m in zip(self.weights, self.means))

    @property
    def variance(self) -> float:
        second = sum(w * (s * s + m * m) for w, m, s in zip(self.weights, self.means, self.stds))
        return second - self.mean**2

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        as_tensor = lambda values: torch.tensor(values, dtype=x.dtype, device=x.device)  # noqa: E731
        return as_tensor(self.means), as_tensor(self.stds), as_tensor(self.weights)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float,
                alpha: torch.Tensor | float = 1.0) -> torch.Tensor:
        """The exact ``D(x; sigma)`` for ``x = alpha x0 + sigma n``; ``sigma`` and ``alpha`` are scalars or broadcast
        against ``x``."""
        mu, s, w = self._params(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).unsqueeze(-1)
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).unsqueeze(-1)
        xk = x.unsqueeze(-1)
        var = (a * s) ** 2 + sigma**2
        log_r = w.log() - 0.5 * var.log() - (xk - a * mu) ** 2 / (2 * var)
        posterior_means = mu + a * s**2 / var * (xk - a * mu)
        return (torch.softmax(log_r, dim=-1) * posterior_means).sum(-1)

    def denoiser(self, objective: Objective) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``denoise(x, sigma)`` under ``objective``'s ``alpha``, as a sampler calls it."""
        return lambda x, sigma: self.denoise(x, sigma, objective.alpha(sigma))

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None, dtype=torch.float64):
        """Independent draws of the data, in ``dtype``."""
        mu, s, w = self._params(torch.empty(0, dtype=dtype))
        k = torch.multinomial(w, math.prod(shape), replacement=True, generator=generator).reshape(shape)
        return mu[k] + s[k] * torch.randn(shape, generator=generator, dtype=dtype)

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float,
             alpha: Callable[[float], float] = lambda sigma: 1.0) -> torch.Tensor:
        """The exact probability-flow ODE solution from ``sigma_from`` to ``sigma_to`` (one Gaussian only), for
        ``x = alpha(sigma) x0 + sigma n``."""
        if len(self.means) != 1:
            raise ValueError("the flow has a closed form for a single Gaussian only")
        mu, s = self.means[0], self.stds[0]
        a_from, a_to = alpha(sigma_from), alpha(sigma_to)
        scale = math.sqrt(((a_to * s) ** 2 + sigma_to**2) / ((a_from * s) ** 2 + sigma_from**2))
        return a_to * mu + (x - a_from * mu) * scale

    def denoising_mse(self, sigma: float, nodes: int = 96, alpha: float = 1.0) -> float:
        """``E[(D(alpha x0 + sigma n; sigma) - x0)^2]`` per element, by Gauss-Hermite quadrature over (x0, n)."""
        z, gw = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-z^2/2), sum sqrt(2 pi)
        gw = torch.tensor(gw / math.sqrt(2 * math.pi), dtype=torch.float64)
        z = torch.tensor(z, dtype=torch.float64)
        total = 0.0
        for w_k, mu_k, s_k in zip(self.weights, self.means, self.stds):
            x0 = (mu_k + s_k * z)[:, None]
            x = alpha * x0 + sigma * z[None, :]
            err = (self.denoise(x, sigma, alpha) - x0) ** 2
            total += w_k * float((gw[:, None] * gw[None, :] * err).sum())
        return total


def convergence_order(
    make_sampler: Callable[[int], object],
    data: GaussianMixture,
    objective: Objective,
    steps: Sequence[int] = (16, 32, 64),
    reference_steps: int = 1024,
    num_points: int = 256,
    seed: int = 0,
    make_reference: Callable[[int], object] | None = None,
) -> tuple[list[float], list[float]]:
    """Errors of a deterministic sampler integrating ``objective``'s ODE for ``data`` against a very fine solution,
    and the measured orders.

    ``make_sampler(num_steps)`` builds the sampler; the fine solution comes from
    ``make_reference(reference_steps)`` (default: the same sampler). The error is the largest absolute difference
    over ``num_points`` float64 starting points; order ``log2(e_N / e_2N)`` between consecutive
    ``steps`` (so doubling steps should cut the error by about ``2**order``).
    """
    noise = torch.randn(num_points, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    denoise = data.denoiser(objective)
    reference = (make_reference or make_sampler)(reference_steps).sample(denoise, noise, objective)
    errors = [float((make_sampler(n).sample(denoise, noise, objective) - reference).abs().max()) for n in steps]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    return errors, orders
