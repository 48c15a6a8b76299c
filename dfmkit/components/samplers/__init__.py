"""Built-in samplers (``edm-heun``, ``edm-euler``), registered through the ``dfmkit_register`` hook like any plugin.

A sampler component is built from its options (``[sampler]`` in a recipe) and provides
``sample(denoise, noise, generator=None) -> x0`` (see :class:`dfmkit.components.samplers.edm.Sampler`).
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
    registries.sampler.register(
        "edm-heun", "dfmkit.components.samplers.edm:build_heun", options=HeunOptions,
        summary="EDM Heun (Algorithm 2, 2nd order, optional churn) on the Karras schedule",
    )
    registries.sampler.register(
        "edm-euler", "dfmkit.components.samplers.edm:build_euler", options=SamplerOptions,
        summary="EDM Euler (1st order) on the Karras schedule",
    )


def make_sampler(name: str = "edm-heun", *, registries=None, **options: Any):
    """A sampler by registry name with keyword options, e.g. ``make_sampler("edm-heun", num_steps=18)``.

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
