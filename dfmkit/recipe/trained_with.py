"""What the recipe saved with a checkpoint says about the objective its network was trained for, against a recipe:
resuming and generating refuse another objective, or other values of the options that fix what the network computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from dfmkit.hookspecs import DEFINES_MODEL
from dfmkit.recipe.sections import DiffusionSection, Recipe


def saved_objective(data: Mapping[str, Any]) -> str:
    """The objective a recipe's data names (``diffusion.name``; recipes from before objectives existed: EDM)."""
    diffusion = data.get("diffusion", {})
    return str(diffusion.get("name", DiffusionSection.default)) if isinstance(diffusion, Mapping) else ""


def objective_mismatch(data: Mapping[str, Any], recipe: Recipe) -> str | None:
    """What of the objective the recipe data of a checkpoint was trained with differs from ``recipe``'s in what the
    network computes: another objective, or another value of an option marked ``DEFINES_MODEL``
    (:mod:`dfmkit.hookspecs`); None when they agree. Options the data does not name had their defaults."""
    saved = saved_objective(data)
    if saved != recipe.diffusion.name:
        return f"the objective '{saved}', the recipe names '{recipe.diffusion.name}' (diffusion.name)"
    section = data.get("diffusion", {})
    section = section if isinstance(section, Mapping) else {}
    options = recipe.diffusion.options
    differences = []
    for field in attrs.fields(type(options)):
        if not field.metadata.get(DEFINES_MODEL):
            continue
        current = getattr(options, field.name)
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
        trained = section.get(field.name, current if default is attrs.NOTHING else default)
        if trained != current:
            differences.append(f"diffusion.{field.name} {trained!r}, the recipe {current!r}")
    return "; ".join(differences) or None


