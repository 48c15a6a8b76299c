"""The diffusion formulation (EDM): preconditioning, training noise levels, loss, guidance. No I/O."""

from dfmkit.diffusion.edm import EDM, LossTerms, NoiseDraw, drop_condition
from dfmkit.diffusion.guidance import from_reference_scale, guided_denoiser, warn_if_unguidable

__all__ = [
    "EDM",
    "LossTerms",
    "NoiseDraw",
    "drop_condition",
    "from_reference_scale",
    "guided_denoiser",
    "warn_if_unguidable",
]
