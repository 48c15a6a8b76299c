"""Built-in samplers (``heun``, ``euler``), registered through the ``dfmkit_register`` hook like any plugin.

A sampler component is built from its options (``[sampler]`` in a recipe) and provides
``sample(denoise, noise, objective, generator=None) -> x0`` (see :class:`dfmkit.components.samplers.heun.Sampler`).
``edm-heun`` and ``edm-euler`` are their earlier names, kept for existing recipes.
"""

from __future__ import annotations

from typing import Any

import attrs

from dfmkit.components.samplers.options import HeunOptions, SamplerOptions
from dfmkit.errors import DfmkitError, did_you_mean
from dfmkit.hookspecs import hookimpl

__all__ = ["HeunOptions", "SamplerOptions", "make_sampler"]


@hookimpl
def dfmkit_register(registries):
    heun, euler = "dfmkit.components.samplers.heun:build_heun", "dfmkit.components.samplers.heun:build_euler"
    registries.sampler.register("heun", heun, options=HeunOptions,
                                summary="Heun (EDM Algorithm 2, 2nd order, optional churn) on the objective's grid")
    registries.sampler.register("euler", euler, options=SamplerOptions, summary="Euler (1st order) on the objective's grid")
    registries.sampler.register("edm-heun", heun, options=HeunOptions, summary="the earlier name of 'heun'")
    registries.sampler.register("edm-euler", euler, options=SamplerOptions, summary="the earlier name of 'euler'")


def make_sampler(name: str = "heun", *, registries=None, **options: Any):
    """A sampler by registry name with keyword options, e.g. ``make_sampler("heun", num_steps=18)``.

    Unknown names and options raise a :class:`~dfmkit.errors.DfmkitError` with the closest match.
    """
    if registries is None:
        from dfmkit.plugins import default_plugins

        registries = default_plugins().registries
    component = registries.sampler.get(name)
    known = [f.name for f in attrs.fields(component.options)]
    for key in options:
        if key not in known:
            guess = did_you_mean(key, known)
            hint = f"did you mean '{guess}'?" if guess else f"known options: {', '.join(known)}"
            raise DfmkitError(f"sampler '{name}' has no option '{key}'; {hint}")
    try:
        return component.build(component.options(**options))
    except ValueError as exc:
        raise DfmkitError(f"sampler '{name}': {exc}") from None
