"""Recipes: the attrs schema of a TOML recipe, loading with cattrs, dotted overrides, and TOML output.

- :mod:`~dfmkit.recipe.sections`: the schema, :class:`Recipe` and its sections;
- :mod:`~dfmkit.recipe.loading`: :func:`load_recipe`, which reports every mistake at once, and the TOML output;
- :mod:`~dfmkit.recipe.overrides`: ``dotted.key=value`` overrides;
- :mod:`~dfmkit.recipe.files`: recipe files and the packaged recipes;
- :mod:`~dfmkit.recipe.trained_with`: a checkpoint's saved objective against a recipe's.
"""

from dfmkit.recipe.files import (
    PACKAGED_RECIPES,
    packaged_recipes,
    read_recipe_file,
    resolve_recipe_path,
)
from dfmkit.recipe.loading import RecipeLoader, dump_recipe, load_recipe, recipe_to_dict
from dfmkit.recipe.overrides import apply_overrides
from dfmkit.recipe.sections import (
    COMPONENT_SECTIONS,
    BackboneSection,
    CheckpointConfig,
    ComponentSection,
    DataConfig,
    DiffusionSection,
    FloatOrInf,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    Recipe,
    SamplerSection,
    TaskEncoderSection,
    TextEncoderSection,
    TokenizerSection,
    TrainConfig,
    ValidationConfig,
)
from dfmkit.recipe.trained_with import objective_mismatch, saved_objective

__all__ = [
    "COMPONENT_SECTIONS", "PACKAGED_RECIPES", "BackboneSection", "CheckpointConfig", "ComponentSection", "DataConfig",
    "DiffusionSection", "FloatOrInf", "LoggingConfig", "OptimConfig", "ParallelConfig", "Recipe", "RecipeLoader",
    "SamplerSection", "TaskEncoderSection", "TextEncoderSection", "TokenizerSection", "TrainConfig",
    "ValidationConfig", "apply_overrides", "dump_recipe", "load_recipe", "objective_mismatch", "packaged_recipes",
    "read_recipe_file", "recipe_to_dict", "resolve_recipe_path", "saved_objective",
]
