"""dfmkit: train and sample text-to-image/video Diffusion Transformers (EDM) on megatron-core."""

import importlib.metadata

from dfmkit.errors import DfmkitError, RecipeError, UnknownComponentError
from dfmkit.hookspecs import hookimpl
from dfmkit.job import Job, build
from dfmkit.recipe import Recipe, dump_recipe, load_recipe

try:
    __version__ = importlib.metadata.version("dfmkit")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

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
