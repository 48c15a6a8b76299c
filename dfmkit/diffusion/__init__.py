"""What diffusion objectives share (the training draws and loss, the ODE samplers integrate) and guidance. No I/O.

The objectives themselves (EDM, rectified flow) are components: :mod:`dfmkit.components.objectives`.
"""

from dfmkit.diffusion.objective import LossTerms, NoiseDraw, Objective, drop_condition
from dfmkit.diffusion.guidance import GuidedDenoiser, from_reference_scale, guided_denoiser, warn_if_unguidable

__all__ = [
    "GuidedDenoiser",
    "LossTerms",
    "NoiseDraw",
    "Objective",
    "drop_condition",
    "from_reference_scale",
    "guided_denoiser",
    "warn_if_unguidable",
]
