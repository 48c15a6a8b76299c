"""Options of the built-in objectives, as the recipe's ``[diffusion]`` section sets them (no torch import here).

Each options class names the noise levels at which validation measures the loss by default (``LOSS_SIGMAS``, when
``validation.loss_sigmas`` is empty), and may answer ``sigma_problem(sigma)``: what is wrong with a level the recipe
names there, in the objective's units.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from attrs import validators as v

from dfmkit.hookspecs import DEFINES_MODEL

LOSS_NORMALIZATIONS = ("sample", "token")
_fraction = [v.ge(0.0), v.le(1.0)]


def _increasing_pair(instance, attribute: attrs.Attribute, value: tuple) -> None:
    if not value[0] < value[1]:
        raise ValueError(f"'{attribute.name}' must be two increasing values, got {list(value)}")


@attrs.define(kw_only=True)
class TrainingOptions:
    """What every objective's training takes: condition dropout and the loss normalisation. Switching the objective
    (``diffusion.name=...``) keeps only these; other fields of one name (p_mean, p_std) mean other things."""

    KEPT_ON_SWITCH: ClassVar[tuple[str, ...]] = ("condition_dropout", "loss_normalization")

    condition_dropout: float = attrs.field(default=0.2, validator=_fraction)  # null text for this share of samples
    loss_normalization: str = attrs.field(default="sample", validator=v.in_(LOSS_NORMALIZATIONS))


@attrs.define(kw_only=True)
class EDMOptions(TrainingOptions):
    """EDM (Karras et al. 2022): preconditioning, training noise levels ln(sigma) ~ N(p_mean, p_std^2), loss weight
    and the sampling grid (the rho-schedule from sigma_max to sigma_min, then 0)."""

    sigma_data: float = attrs.field(default=0.5, validator=v.gt(0), metadata={DEFINES_MODEL: True})
    p_mean: float = -1.2  # the EDM paper's; the reference uses 0 / 1
    p_std: float = attrs.field(default=1.2, validator=v.gt(0))
    sigma_min: float = attrs.field(default=0.002, validator=v.gt(0))  # the sampling grid (EDM Eq. 5)
    sigma_max: float = attrs.field(default=80.0, validator=v.gt(0))
    rho: float = attrs.field(default=7.0, validator=v.gt(0))

    def __attrs_post_init__(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"'sigma_min' must be less than sigma_max, got {self.sigma_min!r} >= {self.sigma_max!r}")

    LOSS_SIGMAS: ClassVar[tuple[float, ...]] = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


@attrs.define(kw_only=True)
class RectifiedFlowOptions(TrainingOptions):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): ``x_t = (1 - t) x0 + t eps``, the velocity as the
    target, ``t`` logit-normal with an optional shift (fixed, or growing with the sample's tokens), and a uniform
    sampling grid from 1 to 0 with its own shift."""

    p_mean: float = 0.0  # logit(t) ~ N(p_mean, p_std^2); SD3's 0 / 1
    p_std: float = attrs.field(default=1.0, validator=v.gt(0))
    shift: float = attrs.field(default=1.0, validator=v.gt(0))  # t -> s t / (1 + (s - 1) t); 1: none
    shift_by_tokens: bool = False  # instead of `shift`: s = exp(mu), mu linear in the sample's tokens (SD3, Flux)
    shift_tokens: tuple[int, int] = attrs.field(default=(256, 4096), validator=_increasing_pair)
    log_shift: tuple[float, float] = (0.5, 1.15)  # mu at those token counts (Flux's)
    sample_shift: float = attrs.field(default=1.0, validator=v.gt(0))  # the sampling grid's shift
    # Instead of sample_shift: each sample's grid shifted by the shift its token count has in training's
    # shift_by_tokens (s = exp(mu), shift_tokens, log_shift), as Flux samples; a call's sizes are sampled apart.
    sample_shift_by_tokens: bool = False
    time_scale: float = attrs.field(default=1000.0, validator=v.gt(0),  # c_noise = time_scale t
                                    metadata={DEFINES_MODEL: True})

    LOSS_SIGMAS: ClassVar[tuple[float, ...]] = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __attrs_post_init__(self) -> None:
        if self.sample_shift_by_tokens and self.sample_shift != 1.0:  # one of them would be ignored
            raise ValueError(f"'sample_shift' ({self.sample_shift!r}) and 'sample_shift_by_tokens' are both set: "
                             "set sample_shift = 1 to shift by tokens, or sample_shift_by_tokens = false")

    def sigma_problem(self, sigma: float) -> str | None:
        return None if sigma <= 1 else f"rectified-flow noise levels (times t) are at most 1, got {sigma:g}"
