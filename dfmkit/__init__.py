"""dfmkit: train and sample text-to-image/video Diffusion Transformers (EDM, rectified flow) on megatron-core."""

from dfmkit.errors import DfmkitError, RecipeError, UnknownComponentError
from dfmkit.hookspecs import hookimpl
from dfmkit.job import Job, build
from dfmkit.recipe import Recipe, dump_recipe, load_recipe
from dfmkit.version import __version__

__all__ = [
    "DfmkitError",
    "Job",
    "Recipe",
    "RecipeError",
    "UnknownComponentError",
    "__version__",
    "build",
    "dump_recipe",
    "hookimpl",
    "load_recipe",
]
