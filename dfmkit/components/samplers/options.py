"""Options of the built-in samplers, as the recipe's ``[sampler]`` section sets them (no torch import here).

The grid of noise levels is the objective's (``[diffusion]``); a sampler chooses how many steps it takes. Plugin
samplers subclass :class:`SamplerOptions`.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from dfmkit.recipe import FloatOrInf


def _check(condition: str, test):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not test(value):  # written so that NaN fails too
            raise ValueError(f"'{attribute.name}' must be {condition}, got {value!r}")

    return validate


_positive = _check("a finite number > 0", lambda x: 0 < x < math.inf)
_non_negative = _check("a finite number >= 0", lambda x: 0 <= x < math.inf)
# A bound far past any sampler's use (EDM's converge by a few hundred steps; DDPM's ancestral sampling takes 1000), so
# that a typo such as 10**12 is one message when the recipe is read, not a failed allocation of the noise-level grid
# at the first validation.
MAX_STEPS = 100_000
_steps = _check(f"from 1 to {MAX_STEPS}", lambda x: 1 <= x <= MAX_STEPS)


@attrs.define(kw_only=True)
class SamplerOptions:
    """N steps on the objective's grid of noise levels (``diffusion.*``), down to 0."""

    num_steps: int = attrs.field(default=35, validator=_steps)


@attrs.define(kw_only=True)
class HeunOptions(SamplerOptions):
    """EDM Algorithm 2: Heun steps with optional stochastic churn (s_churn = 0: deterministic); s_min and s_max are
    noise levels of the objective (EDM: sigma; rectified flow: t)."""

    s_churn: float = attrs.field(default=0.0, validator=_non_negative)  # total churn; gamma = min(s_churn/N, sqrt2 - 1)
    s_min: float = attrs.field(default=0.0, validator=_non_negative)  # churn only where s_min <= sigma <= s_max
    s_max: FloatOrInf = attrs.field(default=math.inf, validator=_check("a number >= 0", lambda x: x >= 0))  # inf: none
    s_noise: float = attrs.field(default=1.0, validator=_positive)  # std of the added noise, relative

    def __attrs_post_init__(self) -> None:
        if self.s_min > self.s_max:
            raise ValueError(f"'s_min' must not exceed s_max, got {self.s_min!r} > {self.s_max!r}")
