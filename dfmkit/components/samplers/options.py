"""Options of the EDM samplers, as the recipe's ``[sampler]`` section sets them (no torch import here).

Plugin samplers on the same noise schedule subclass :class:`SamplerOptions`.
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
_at_least_one = _check("at least 1", lambda x: x >= 1)


@attrs.define(kw_only=True)
class SamplerOptions:
    """N steps on the Karras rho-schedule from sigma_max down to sigma_min, then to 0."""

    num_steps: int = attrs.field(default=35, validator=_at_least_one)
    sigma_min: float = attrs.field(default=0.002, validator=_positive)
    sigma_max: float = attrs.field(default=80.0, validator=_positive)
    rho: float = attrs.field(default=7.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"'sigma_min' must be less than sigma_max, got {self.sigma_min!r} >= {self.sigma_max!r}")


@attrs.define(kw_only=True)
class HeunOptions(SamplerOptions):
    """EDM Algorithm 2: Heun steps with optional stochastic churn (s_churn = 0: deterministic)."""

    s_churn: float = attrs.field(default=0.0, validator=_non_negative)  # total churn; gamma = min(s_churn/N, sqrt2 - 1)
    s_min: float = attrs.field(default=0.0, validator=_non_negative)  # churn only where s_min <= sigma <= s_max
    s_max: FloatOrInf = attrs.field(default=math.inf, validator=_check("a number >= 0", lambda x: x >= 0))  # inf: none
    s_noise: float = attrs.field(default=1.0, validator=_positive)  # std of the added noise, relative

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.s_min > self.s_max:
            raise ValueError(f"'s_min' must not exceed s_max, got {self.s_min!r} > {self.s_max!r}")
