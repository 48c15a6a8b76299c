"""Built-in objectives (``edm``, ``rectified-flow``), registered through the ``dfmkit_register`` hook like any plugin.

An objective component is built from its options (``[diffusion]`` in a recipe) and is a
:class:`dfmkit.diffusion.objective.Objective`: training draws and loss, the denoiser, the sampling grid and ODE.
"""

from __future__ import annotations

from dfmkit.components.objectives.options import EDMOptions, RectifiedFlowOptions, TrainingOptions
from dfmkit.hookspecs import hookimpl

__all__ = ["EDMOptions", "RectifiedFlowOptions", "TrainingOptions"]


@hookimpl
def dfmkit_register(registries):
    registries.objective.register(
        "edm", "dfmkit.components.objectives.edm:build", options=EDMOptions,
        summary="EDM (Karras et al. 2022): preconditioned denoiser, log-normal noise levels, rho-schedule",
    )
    registries.objective.register(
        "rectified-flow", "dfmkit.components.objectives.rectified_flow:build", options=RectifiedFlowOptions,
        summary="Rectified flow (SD3): velocity target, logit-normal times with optional shift, uniform grid 1 -> 0",
    )
